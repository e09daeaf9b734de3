#!/usr/bin/env bash
# A real cluster on one machine: SeaweedFS (`weed mini`, S3 on loopback), N sink instances with their own
# data directories and instance ids shipping to one bucket, and HAProxy in front (round-robin, health
# checks on /readyz). Everything listens on 127.0.0.1 only, on free ports. See docs/cluster.md.
#
#   scripts/cluster.sh start DIR [N]     start everything (N sinks, default 3); writes DIR/cluster.env
#   scripts/cluster.sh start-sink DIR I  (re)start sink I (1..N) alone, e.g. after it was killed
#   scripts/cluster.sh stop-sink DIR I   SIGTERM sink I (it drains, seals and ships its last segment)
#   scripts/cluster.sh stop DIR          SIGTERM everything by PID: balancer, sinks, then the store
#   scripts/cluster.sh status DIR        which processes run, and HAProxy's view of the sinks
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=$root/.venv/bin/python
[ -x "$py" ] || { echo "cluster: run scripts/bootstrap.sh first" >&2; exit 1; }

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '6,10p' "$0" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
running() {  # PID: alive and not a zombie (a killed sink stays one when no init process reaps orphans)
    [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}
alive() { [ -f "$1" ] && running "$(cat "$1")"; }
wait_http() {  # URL, what: until it answers 200 (at most ~30 s)
    for _ in $(seq 300); do
        if "$py" -c 'import sys, httpx; sys.exit(httpx.get(sys.argv[1], timeout=1).status_code != 200)' "$1" \
            2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "cluster: $2 not ready at $1" >&2
    return 1
}

stop_pid() {  # PIDFILE: SIGTERM, wait up to 30 s for the exit
    [ -f "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    if running "$pid"; then
        kill -TERM "$pid"
        for _ in $(seq 300); do running "$pid" || break; sleep 0.1; done
    fi
    rm -f "$1"
}

start_sink() {  # I: start sink I from its config (written by `start`)
    local i=$1 sd=$dir/sink-$1
    # shellcheck disable=SC1091
    source "$dir/cluster.env"
    if alive "$sd/pid"; then echo "cluster: sink-$i already runs (pid $(cat "$sd/pid"))"; return 0; fi
    # Credentials only through the environment (the standard AWS variables), never in config.ini.
    AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$S3_SECRET_ACCESS_KEY \
        nohup "$py" -m telemetry_sink serve --config "$sd/config.ini" >>"$sd/server.log" 2>&1 &
    echo $! >"$sd/pid"
    local port_var="SINK_${i}_PORT"
    wait_http "http://127.0.0.1:${!port_var}/healthz" "sink-$i"
    echo "sink-$i: pid $(cat "$sd/pid"), http://127.0.0.1:${!port_var}, data $sd/data"
}

case "$cmd" in
start)
    n=${3:-3}
    command -v haproxy >/dev/null || { echo "cluster: haproxy missing (apt-get install haproxy)" >&2; exit 1; }
    [ -f "$dir/sink.key" ] || "$py" -m telemetry_sink keygen --out "$dir/sink.key" 2>/dev/null
    if ! alive "$dir/seaweed/pid"; then
        "$py" tests/s3_support.py "$dir/seaweed" >/dev/null
        "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$dir/seaweed/seaweed.json" \
            >"$dir/seaweed/pid"
    fi
    s3() { "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
        "$dir/seaweed/seaweed.json" "$1"; }
    lb_port=$(free_port)
    {
        echo "SINKS=$n"
        echo "LB_URL=http://127.0.0.1:$lb_port"
        echo "S3_ENDPOINT=$(s3 endpoint)"
        echo "S3_BUCKET=$(s3 bucket)"
        echo "S3_ACCESS_KEY_ID=$(s3 access_key_id)"
        echo "S3_SECRET_ACCESS_KEY=$(s3 secret_access_key)"
        echo "S3_READ_ONLY_ACCESS_KEY_ID=$(s3 read_only_access_key_id)"
        echo "S3_READ_ONLY_SECRET_ACCESS_KEY=$(s3 read_only_secret_access_key)"
        for i in $(seq "$n"); do echo "SINK_${i}_PORT=$(free_port)"; done
    } >"$dir/cluster.env"
    # shellcheck disable=SC1091
    source "$dir/cluster.env"
    servers=""
    for i in $(seq "$n"); do
        sd=$dir/sink-$i
        mkdir -p "$sd"
        port_var="SINK_${i}_PORT"
        cat >"$sd/config.ini" <<EOF
[server]
host = 127.0.0.1
port = ${!port_var}
[ingest]
ack = durable
[rate_limit]
bytes_per_second = 0
[writer]
directory = ./data
flush_interval_ms = 20
max_segment_bytes = 1048576
max_segment_age_s = 10
[crypto]
key_file = $dir/sink.key
[ship]
destination = s3://$S3_BUCKET/cluster
endpoint_url = $S3_ENDPOINT
region = us-east-1
allow_http = true
instance_id = sink-$i
retry_initial_ms = 200
retry_max_ms = 5000
unhealthy_after_s = 30
EOF
        servers+="    server sink-$i 127.0.0.1:${!port_var} check"$'\n'
        start_sink "$i"
    done
    cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn 2048
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A connection refused by a dead sink is retried on another one (the request never reached it).
    retries 2
    option redispatch
frontend ingest
    bind 127.0.0.1:$lb_port
    default_backend sinks
backend sinks
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
$servers
EOF
    haproxy -c -q -f "$dir/haproxy.cfg"
    haproxy -D -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid"
    wait_http "$LB_URL/readyz" "haproxy"
    echo "cluster up: POST $LB_URL/telemetry; bucket s3://$S3_BUCKET/cluster at $S3_ENDPOINT"
    echo "read it:  AWS_ACCESS_KEY_ID=$S3_READ_ONLY_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=$S3_ENDPOINT" \
        "AWS_ALLOW_HTTP=true $py -m telemetry_sink read --key-file $dir/sink.key s3://$S3_BUCKET/cluster"
    echo "stop it:  scripts/cluster.sh stop $dir"
    ;;
start-sink)
    start_sink "${3:?sink number}"
    ;;
stop-sink)
    stop_pid "$dir/sink-${3:?sink number}/pid"
    ;;
stop)
    # The balancer first (no new requests), then the sinks (each drains and ships), then the store.
    for pidfile in "$dir/haproxy.pid" "$dir"/sink-*/pid "$dir/seaweed/pid"; do stop_pid "$pidfile"; done
    echo "cluster stopped"
    ;;
status)
    for pidfile in "$dir/haproxy.pid" "$dir"/sink-*/pid "$dir/seaweed/pid"; do
        [ -f "$pidfile" ] || continue
        if alive "$pidfile"; then echo "$pidfile: running ($(cat "$pidfile"))"; else echo "$pidfile: dead"; fi
    done
    ;;
*)
    sed -n '6,10p' "$0" >&2
    exit 2
    ;;
esac

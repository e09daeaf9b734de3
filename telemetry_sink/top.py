"""`telemetry-sink top`: a live terminal view of one or more running servers, from their /metrics.

Every interval each server's Prometheus text is fetched (stdlib urllib, prometheus_client's parser)
and compared with the previous sample: rates come from counter differences, latencies from
histogram differences (mean and an upper bound of the 99th percentile from the buckets). Drawn with
rich (also used for progress bars), `q` or Ctrl-C quits.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from rich.table import Table

PREFIX = "telemetry_sink_"

Sample = dict[str, float]  # "name{label=value,...}" -> value


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def parse_metrics(text: str) -> Sample:
    """Flatten Prometheus text into {"name{labels}": value} (names without the common prefix)."""
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix(PREFIX)
            out[_key(name, dict(s.labels))] = float(s.value)
    return out


def fetch(url: str, timeout: float = 2.0) -> Sample:
    """One scrape of `url`/metrics; OSError (or ValueError for a non-metrics answer) on failure."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
        return parse_metrics(response.read().decode("utf-8", "replace"))


def _labelled(sample: Sample, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of one labelled family."""
    head = name + "{"
    out: dict[str, float] = {}
    for key, value in sample.items():
        if key.startswith(head):
            for part in key[len(head):-1].split(","):
                k, _, v = part.partition("=")
                if k == label:
                    out[v] = value
    return out


def _histogram(now: Sample, before: Sample, name: str) -> tuple[float, float] | None:
    """(mean, p99 upper bound) in seconds of what `name` observed between two samples."""
    count = now.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if count <= 0:
        return None
    mean = (now.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / count
    buckets = sorted(((float(le), n - _labelled(before, f"{name}_bucket", "le").get(le, 0.0))
                      for le, n in _labelled(now, f"{name}_bucket", "le").items()), key=lambda b: b[0])
    p99 = math.inf
    for upper, cumulative in buckets:
        if cumulative >= 0.99 * count:
            p99 = upper
            break
    return mean, p99


@dataclass
class View:
    """What one server's row shows, computed from two samples `elapsed` seconds apart."""

    url: str
    error: str | None = None
    rows: dict[str, str] = field(default_factory=dict)


def _ms(seconds: float) -> str:
    return "inf" if math.isinf(seconds) else f"{seconds * 1000:.1f} ms"


def compute_view(url: str, now: Sample, before: Sample, elapsed: float) -> View:
    """The figures `top` shows for one server."""
    view = View(url)
    rows = view.rows

    def rate(name: str) -> float:
        return max(0.0, now.get(name, 0.0) - before.get(name, 0.0)) / elapsed if elapsed > 0 else 0.0

    statuses = _labelled(now, "requests_total", "status")
    rows["requests/s"] = f"{sum(rate(f'requests_total{{status={s}}}') for s in statuses):,.0f}"
    rows["records/s"] = f"{rate('records_accepted_total'):,.0f}"
    rows["written/s"] = f"{rate('records_written_total'):,.0f}"
    rows["answers (total)"] = " ".join(f"{s}:{n:,.0f}" for s, n in sorted(statuses.items())) or "-"
    reasons = _labelled(now, "rejected_requests_total", "reason")
    rows["rejected (total)"] = " ".join(f"{r}:{n:,.0f}" for r, n in sorted(reasons.items())) or "-"
    held, cap = now.get("buffer_records", 0.0), now.get("buffer_max_records", 0.0)
    rows["buffer"] = f"{held:,.0f} records" + (f" ({100 * held / cap:.0f}% full)" if cap else "")
    for label, name in (("write", "flush_seconds"), ("fsync", "fsync_seconds")):
        stats = _histogram(now, before, name)
        rows[f"{label} latency"] = f"mean {_ms(stats[0])}, p99 <= {_ms(stats[1])}" if stats else "-"
    rows["segments"] = (f"{now.get('segments', 0.0):,.0f} ({now.get('segment_bytes', 0.0) / 2**20:,.1f} MiB), "
                        f"{now.get('write_errors_total', 0.0):,.0f} write errors")
    ship = {k: v for k, v in now.items() if k.startswith("ship_") and "{" not in k and not k.endswith("_created")}
    if ship:
        rows["shipping"] = ", ".join(f"{k.removeprefix('ship_')}={v:,.0f}" for k, v in sorted(ship.items()))
    return view


def render(views: Sequence[View], interval: float) -> Table:
    """A rich Table: one column per server."""
    from rich.table import Table

    table = Table(title=f"telemetry-sink top (every {interval:g} s; q quits)", expand=False)
    table.add_column("")
    for view in views:
        table.add_column(view.url)
    names: list[str] = []
    for view in views:
        names.extend(n for n in view.rows if n not in names)
    for name in names:
        table.add_row(name, *(view.rows.get(name, "") for view in views))
    if any(view.error for view in views):
        table.add_row("error", *(view.error or "" for view in views))
    return table


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Single key presses on a terminal stdin (yields whether there is one to read from)."""
    if not sys.stdin.isatty():
        yield False
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(wait: float, tty_in: bool) -> bool:
    """Wait up to `wait` seconds for a key; True if it was q (or Q)."""
    if not tty_in:
        time.sleep(wait)
        return False
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"):
            return True
    return False


def run(urls: Sequence[str], interval: float = 1.0, iterations: int | None = None) -> int:
    """Show the view until q, Ctrl-C or `iterations` refreshes; return the exit status."""
    from rich.console import Console
    from rich.live import Live

    previous: dict[str, tuple[float, Sample]] = {}

    def sample_all() -> list[View]:
        views = []
        for url in urls:
            at = time.monotonic()
            try:
                now = fetch(url)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                views.append(View(url, error=f"cannot scrape: {reason}"))
                continue
            before_at, before = previous.get(url, (at, now))
            previous[url] = (at, now)
            views.append(compute_view(url, now, before, at - before_at))
        return views

    console = Console(stderr=False)
    done = 0
    with _keys() as tty_in, Live(render(sample_all(), interval), console=console, auto_refresh=False) as live:
        try:
            while iterations is None or done < iterations:
                if _quit_pressed(interval, tty_in):
                    break
                live.update(render(sample_all(), interval), refresh=True)
                done += 1
        except KeyboardInterrupt:
            pass
    return 0

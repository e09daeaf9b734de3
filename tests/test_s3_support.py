"""The SeaweedFS fixture itself: identities, create-only semantics and stop by PID."""

from __future__ import annotations

import os
from collections.abc import Callable

import obstore
import pytest
from obstore.store import S3Store
from s3_support import RO, RW, SeaweedS3


def _store(s3: SeaweedS3, identity: tuple[str, str]) -> S3Store:
    return S3Store(s3.bucket, config={"endpoint": s3.endpoint, "region": "us-east-1",
                                      "access_key_id": identity[0], "secret_access_key": identity[1]},
                   client_options={"allow_http": True}, retry_config={"max_retries": 0})


def test_read_write_and_read_only_identities(s3_server: SeaweedS3) -> None:
    rw, ro = _store(s3_server, RW), _store(s3_server, RO)
    obstore.put(rw, "fixture/a", b"hello", mode="create")
    with pytest.raises(obstore.exceptions.AlreadyExistsError):
        obstore.put(rw, "fixture/a", b"other", mode="create")
    assert bytes(obstore.get(ro, "fixture/a").bytes()) == b"hello"
    with pytest.raises(obstore.exceptions.PermissionDeniedError):
        obstore.put(ro, "fixture/b", b"x", mode="create")
    with pytest.raises(obstore.exceptions.PermissionDeniedError):
        obstore.put(_store(s3_server, (RW[0], "wrong-secret")), "fixture/c", b"x", mode="create")


def test_stop_and_start_keeps_ports_and_data(start_s3: Callable[[], SeaweedS3]) -> None:
    s3 = start_s3()
    obstore.put(_store(s3, RW), "kept", b"data", mode="create")
    assert s3.proc is not None
    pid, port = s3.proc.pid, s3.ports["s3"]
    s3.stop()
    assert s3.proc is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    s3.start()
    assert s3.ports["s3"] == port
    assert bytes(obstore.get(_store(s3, RW), "kept").bytes()) == b"data"

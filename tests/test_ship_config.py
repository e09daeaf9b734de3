"""[ship] settings: one-line errors at start-up, and nothing secret in the effective config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from telemetry_sink.config import ConfigError, load_config
from telemetry_sink.testing import ServerProcess


@pytest.mark.parametrize(("text", "message"), [
    ("[ship]\ndestination = http://bucket/p\n", "[ship] destination: must be an s3://bucket/prefix URL"),
    ("[ship]\nafter_upload = archive\n", "[ship] after_upload: must be one of keep, delete"),
    ("[ship]\nallow_http = maybe\n", "[ship] allow_http: must be true or false"),
    ("[ship]\ndestination = s3://telemetry/p\n[writer]\nmax_segment_bytes = 6442450944\n",
     "[writer] max_segment_bytes: 6442450944 exceeds 5 GiB"),
])
def test_bad_ship_settings_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_server_refuses_a_bad_bucket_or_instance_id_with_one_line(start_server: Callable[..., ServerProcess],
                                                                   tmp_path: Path) -> None:
    bad_bucket = start_server({"ship": {"destination": "s3://UPPER/p"}}, wait=False)
    assert bad_bucket.wait() == 2
    assert "[ship] destination: 's3://UPPER/p': 'UPPER' is not a valid bucket name" in bad_bucket.log()
    bad_id = start_server({"ship": {"destination": "s3://telemetry/p", "instance_id": "a/b"}}, wait=False)
    assert bad_id.wait() == 2
    assert "error: [ship] instance_id: instance id 'a/b' must be" in bad_id.log()
    assert "Traceback" not in bad_bucket.log() + bad_id.log()

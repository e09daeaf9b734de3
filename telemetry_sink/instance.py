"""Instance identity: the stable name of one sink instance, part of every object key it ships.

Configured (`[ship] instance_id`), or generated once and kept in `<data directory>/instance_id`, so a
restarted instance keeps its name and two instances (own data directories) never share one.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from .objstore import INSTANCE_ID
from .segment_format import fsync_dir, write_durably

ID_FILE = "instance_id"


class InstanceIdError(ValueError):
    """A configured or stored instance id that cannot be part of an object key."""


def check_instance_id(value: str, where: str) -> str:
    if not INSTANCE_ID.match(value):
        raise InstanceIdError(f"{where}: instance id {value!r} must be 1-63 letters, digits, '.', '_' or '-', "
                              f"starting with a letter or digit")
    return value


def _generated() -> str:
    """Host name (for people reading keys) plus random bits (for uniqueness when host names repeat)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40].strip("-._")
    return f"{host or 'sink'}-{secrets.token_hex(4)}"


def resolve_instance_id(configured: str, directory: Path) -> str:
    """The configured id, else the one stored in `directory`, else a new one stored there atomically."""
    path = directory / ID_FILE
    if configured:
        return check_instance_id(configured, "[ship] instance_id")
    try:
        return check_instance_id(path.read_text().strip(), str(path))
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    value = _generated()
    tmp = path.with_name(f".{ID_FILE}.{os.getpid()}.tmp")
    write_durably(path, (value + "\n").encode(), tmp, 0o644, replace=False)
    try:
        # link, not rename: if another worker process stored an id first, keep that one.
        os.link(tmp, path)
    except FileExistsError:
        value = check_instance_id(path.read_text().strip(), str(path))
    finally:
        tmp.unlink()
    fsync_dir(directory)
    return value

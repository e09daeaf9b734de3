"""`python -m telemetry_sink.client`: `telemetry-sink send` without loading the server's modules."""

from __future__ import annotations

import sys

from .send_cmd import main

sys.exit(main())

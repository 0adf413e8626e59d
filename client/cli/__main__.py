"""`python -m protoserve.client.cli ...` runs the `protoserve` command (used by `protoserve up` for its children)."""

from __future__ import annotations

import sys

from protoserve.client.cli.main import main

sys.exit(main())

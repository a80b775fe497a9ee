"""Paths of the development checkout (tests, benchmarks, scripts); the library never reads them.

``SHARED_DATA`` is the real data beside the clone (``../shared/data``, or ``RSJAX_SHARED_DATA``);
tests and scripts pass it on (``--data-dir`` or ``RSJAX_DATA_DIR``), ``rsjax.data`` has no default.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RSJAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

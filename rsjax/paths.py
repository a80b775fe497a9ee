"""Where rsjax finds the shared real data (tests, examples, benchmarks)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RSJAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

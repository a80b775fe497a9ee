"""Shared test configuration: CPU JAX, the real data location, a skip for missing data.

The library has no default data directory; the tests (and the ``rsjax`` subprocesses they start,
which inherit the environment) find the development layout ``../shared/data`` through
``RSJAX_DATA_DIR``.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rsjax.paths import SHARED_DATA  # noqa: E402

os.environ.setdefault("RSJAX_DATA_DIR", str(SHARED_DATA))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; the real-data tests need it (CI has it beside the clone)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (set RSJAX_SHARED_DATA)")
    return SHARED_DATA

"""Shared test configuration: CPU JAX, the real data location, a skip for missing data."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from rsjax.paths import SHARED_DATA  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; the real-data tests need it (CI has it beside the clone)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (set RSJAX_SHARED_DATA)")
    return SHARED_DATA

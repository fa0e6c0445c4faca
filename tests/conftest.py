"""Shared fixtures: a small EMT data set written once per test module."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def emt_h5(tmp_path_factory):
    """An HDF5 data set of 24 EMT-labelled rattled Cu/Au cells (distmlip.data.examples)."""
    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import write_dataset

    p = tmp_path_factory.mktemp("emt") / "emt.h5"
    write_dataset(p, rattled_cu_au(24))
    return p

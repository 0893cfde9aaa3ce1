"""Shared test set-up: the project root on sys.path, small thread counts, offline wandb."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (small models are faster so on 2 cores), then restore."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

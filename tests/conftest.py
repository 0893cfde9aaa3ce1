"""Shared test set-up: the project root on sys.path, small thread counts, offline wandb."""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"

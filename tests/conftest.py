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


def write_unlabelled_phantoms(root: pathlib.Path, png_cases=(0, 1)) -> dict:
    """Two phantom CT cases of 48 x 48 x 8 windowed to [0, 1] as the preprocessing does: the
    cases in ``png_cases`` as 8 PNG slices each under ``root/2d``, both as NIfTI volumes under
    ``root/3d``. Returns ``{"2d": folder, "3d": folder}``."""
    import nibabel as nib
    import numpy as np

    from data import encode_png_2d
    from make_phantoms import make_case

    (root / "2d").mkdir()
    (root / "3d").mkdir()
    for case in range(2):
        img, _, affine = make_case(case, size_xy=48, n_slices=8, labelled=False)
        v = np.clip((img.astype(np.float32) + 500.0) / 1000.0, 0.0, 1.0)
        if case in png_cases:
            for z in range(v.shape[2]):
                (root / "2d" / f"Case_{case:05d}_{z:04d}.png").write_bytes(encode_png_2d(v[:, :, z]))
        nib.save(nib.Nifti1Image(v, affine), str(root / "3d" / f"Case_{case:05d}.nii.gz"))
    return {"2d": root / "2d", "3d": root / "3d"}

"""Shared test set-up: the project root on sys.path, small thread counts, offline wandb,
the real CT (``real_ct`` fixture), the phantom writer of the pretraining tests and the helpers
several test modules use (running a script's command line, hashing a folder, the independent
FLARE 2022 scores, a tiny fine-tuned model file, a free TCP port, waiting for a condition).

Markers: ``slow`` (over about 10 s on a 2-core CPU; ``pytest -m "not slow"`` for a quick
pass, ``make test`` runs everything).
"""

import hashlib
import os
import pathlib
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# imported after the set-up above: the project's modules need ROOT on sys.path, and torch
# reads OMP_NUM_THREADS when it loads
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.metrics import compute_surface_dice  # noqa: E402

import finetune  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from data import encode_png_2d  # noqa: E402
from make_phantoms import make_case  # noqa: E402
from transforms import preprocessing_record  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"


@dataclass(frozen=True)
class RealCT:
    """The real abdominal CT of ``../shared/data/real_ct/`` (its README): one labelled case
    in the FLARE layout and the same subject's unlabelled scan."""

    root: pathlib.Path
    labelled_dir: pathlib.Path  # FLARE layout: images/<case>_0000.nii.gz, labels/<case>.nii.gz
    case: str
    image: pathlib.Path
    label: pathlib.Path
    unlabelled_image: pathlib.Path


@pytest.fixture(scope="session")
def real_ct() -> RealCT:
    """The real CT's paths; the test is skipped when the folder is absent (a user's clone)."""
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT folder {REAL_CT} is absent (only the project workspace has it)")
    labelled = REAL_CT / "flare_layout" / "labelled"
    case = "FLARE22_Tr_9001"
    return RealCT(
        root=REAL_CT,
        labelled_dir=labelled,
        case=case,
        image=labelled / "images" / f"{case}_0000.nii.gz",
        label=labelled / "labels" / f"{case}.nii.gz",
        unlabelled_image=REAL_CT / "flare_layout" / "unlabelled" / "Case_09001_0000.nii.gz",
    )


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (small models are faster so on 2 cores), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_unlabelled_phantoms(root: pathlib.Path, png_cases=(0, 1)) -> dict:
    """Two phantom CT cases of 48 x 48 x 8 windowed to [0, 1] as the preprocessing does: the
    cases in ``png_cases`` as 8 PNG slices each under ``root/2d``, both as NIfTI volumes under
    ``root/3d``. Returns ``{"2d": folder, "3d": folder}``."""
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


def run_main(mod, argv):
    """Run a script's ``main`` on its parsed ``argv`` (items turned to strings) in this process."""
    return mod.main(mod.get_args_parser().parse_args([str(a) for a in argv]))


def cli_errors(mod, argv, capsys, monkeypatch) -> tuple[int, list[str]]:
    """Run a script's command line in this process: (exit code, its ``error:`` lines)."""
    monkeypatch.setattr(utils, "setup_logging", lambda **kw: None)  # leave pytest's logging alone
    capsys.readouterr()
    code = 0
    try:
        utils.run_cli(mod.main, mod.get_args_parser(), [str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("error:")]


def tree_hashes(folder: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, keyed by its path relative to ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


#: NSD tolerances (mm) of FLARE22_DSC_NSD_Eval.py, written out from the script (not imported)
OFFICIAL_TOLERANCE = {1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3}


def monai_nsd(label_mask: np.ndarray, pred_mask: np.ndarray, spacing, tol: float) -> float:
    """MONAI's ``compute_surface_dice(use_subvoxels=True)``: DeepMind's surfels weighted by area (2D: length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks and its own deprecations
        nsd = compute_surface_dice(
            torch.from_numpy(np.ascontiguousarray(pred_mask))[None, None],
            torch.from_numpy(np.ascontiguousarray(label_mask))[None, None],
            class_thresholds=[float(tol)],
            include_background=True,
            spacing=[float(s) for s in spacing],
            use_subvoxels=True,
        )
    return float(nsd[0, 0])


def flare22_reference(pred, label, spacing, tolerances=OFFICIAL_TOLERANCE, z_restricted=(5, 6, 10)):
    """Per organ (Dice, NSD) by the rules of the official FLARE22_DSC_NSD_Eval.py, with MONAI's NSD:

    organ absent from both volumes: 1 / 1; absent from one: 0 / 0; aorta, IVC and esophagus
    on ``[..., z_lower:z_upper]``, z_lower / z_upper the first / last slice of the organ in
    the label (so the last labelled slice is left out; an organ on one slice only, where the
    script fails, is scored on that slice); Dice below 0.2: NSD 0 without computing it.
    """
    out = {}
    for organ, tol in tolerances.items():
        g_all, p_all = label == organ, pred == organ
        if not g_all.any() and not p_all.any():
            out[organ] = (1.0, 1.0)
            continue
        if not g_all.any() or not p_all.any():
            out[organ] = (0.0, 0.0)
            continue
        g, p = g_all, p_all
        if organ in z_restricted:
            zs = np.flatnonzero(g_all.any(axis=tuple(range(g_all.ndim - 1))))
            lo, hi = int(zs.min()), int(zs.max())
            hi = hi if hi > lo else lo + 1
            g, p = g_all[..., lo:hi], p_all[..., lo:hi]
        dice = 2.0 * np.count_nonzero(g & p) / (np.count_nonzero(g) + np.count_nonzero(p))
        out[organ] = (dice, 0.0 if dice < 0.2 else monai_nsd(g, p, spacing, tol))
    return out


def save_model(
    path: pathlib.Path,
    spatial_dims: int = 2,
    pixdim=(1.0, 1.0, 2.5),
    png_bits: int | None = 8,
    seed: int = 0,
    min_xy: int = 96,
    dice_paper: float = 0.5,
):
    """A tiny Swin-UNETR (random weights) saved as a fine-tuned checkpoint with a preprocessing record
    (``dice_paper``: the validation Dice it records)."""
    cfg = models.encoder_config("swin", spatial_dims, 12, low_resource_mode=True, crop_size=64)
    torch.manual_seed(seed)
    model = models.build_segmenter(cfg, 14)
    bits = png_bits if spatial_dims == 2 else None
    rec = preprocessing_record(spatial_dims, -500.0, 500.0, pixdim, min_xy, bits, "test")
    args = {"crop_size": 64, "spatial_dims": spatial_dims}
    torch.save(finetune.finetuned_checkpoint(model, cfg, 14, args, 1, dice_paper, rec), path)
    return path


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of the call (for a launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, poll: float = 0.05) -> None:
    """Call ``cond`` every ``poll`` s until it is true; fail the test after ``timeout`` s, naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")

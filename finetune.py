"""Fine-tuning pieces used by ``main_finetune.py``: data, crops, sliding-window evaluation, scores.

Data (2D, the paper's setting): the output of ``preprocess_flare_labelled.py``
(``imgs/<case>_<zzzz>.png``, ``labels/<case>_<zzzz>.png``, ``manifest.json``). Training
items are single slices; each gives ``n_crops_per_ct`` crops from MONAI's
``RandCropByPosNegLabeld`` (centred on an organ voxel with p 0.5, on a background voxel
otherwise), then the paper's fine-tuning augmentations. For evaluation the slices of a
case, stacked in slice order, are the case volume (X, Y, Z); its voxel size comes from
``manifest.json``.

Data (3D): the raw labelled FLARE NIfTI (``images/`` or ``imgs/``, ``labels/``),
preprocessed on the fly with :func:`transforms.preprocessing_transforms` and cached on disk
with MONAI's ``PersistentDataset``; crops are ``crop_size``^3.

The training data sets and the 3D cache folders are built here (:func:`train_dataset_2d`,
:func:`train_dataset_3d`, :func:`preprocessed_dataset_3d`, :func:`cache_folder_3d`); the
chains they run are ``transforms.py``'s (``LoadSliceAndLabel2d``, ``random_crop_transforms``,
``preprocess_steps_3d``) and the evaluation cases are read by ``data.py`` (``CaseRef``,
``load_case_2d``, ``CaseCache``).

Evaluation (:func:`evaluate`): sliding-window inference (``roi = crop_size``), then two
scores that must not be confused:

* ``dice_paper``: :class:`metrics.PaperDice`, what the paper reported (per 2D slice
  MONAI ``DiceMetric`` including background, averaged over slices);
* challenge-grade scores: :func:`metrics.organ_scores` per case and organ
  (volumetric Dice and normalized surface Dice, FLARE conventions).

With several processes (torchrun) each rank evaluates every ``world_size``-th case;
per-case results are gathered and put back in case order, so the scores equal those of
one process exactly (no sample is padded or counted twice).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset, PersistentDataset
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from tqdm import tqdm

import data
import engine
import metrics
from data import CaseRef, check_label_ids
from models import build_segmenter, torch_load
from transforms import LoadSliceAndLabel2d, preprocess_steps_3d, random_crop_transforms
from utils import UserError, atomic_write

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "ioupos-finetune-v1"


# ---------------------------------------------------------------------------------------
# Errors raised inside MONAI transforms
# ---------------------------------------------------------------------------------------


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that MONAI wrapped (``applying transform ...``), if any."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# ---------------------------------------------------------------------------------------
# Cases on the device
# ---------------------------------------------------------------------------------------


def _device_image(image: np.ndarray, device: torch.device) -> Callable[[slice | None], torch.Tensor]:
    """``take(z)``: slices ``z`` of ``image`` (all with None) as float32 on ``device``; stored
    PNG values travel as integers and are divided there by a tensor (a true division, the
    bits of :func:`data.stored_to_float`; a Python-number divisor may become a multiplication
    by its reciprocal on CUDA)."""
    scale = data.stored_scale(image.dtype)
    if image.dtype == np.uint16:  # torch has few uint16 kernels; int32 holds the same values
        image = image.astype(np.int32)
    vol = torch.from_numpy(np.ascontiguousarray(image))
    divisor = torch.full((), scale or 1.0, dtype=torch.float32, device=device)

    def take(z: slice | None) -> torch.Tensor:
        t = (vol if z is None else vol[..., z]).to(device, non_blocking=True)
        return t.float() / divisor if scale else t.float()

    return take


# ---------------------------------------------------------------------------------------
# Transforms and data sets
# ---------------------------------------------------------------------------------------


def train_dataset_2d(items: Sequence[dict[str, Any]], crop_size: int, n_crops: int, augment: bool = True,
                     cache: data.SliceCache | None = None) -> Dataset:
    """The 2D training set: one item per labelled slice, ``n_crops`` crops each (``augment``
    and ``cache``: see :func:`transforms.random_crop_transforms` and
    :class:`transforms.LoadSliceAndLabel2d`)."""
    steps = [LoadSliceAndLabel2d(cache), *random_crop_transforms(2, crop_size, n_crops, augment)]
    return Dataset(list(items), transform=Compose(steps))


def preprocess_config_3d(a_min: float = -500.0, a_max: float = 500.0, pixdim: Sequence[float] = (1.0, 1.0, 2.5), min_xy: int = 96) -> dict[str, Any]:
    """The 3D preprocessing settings (they name the cache folder, so changed settings never reuse a stale cache)."""
    return {"a_min": float(a_min), "a_max": float(a_max), "pixdim": [float(p) for p in pixdim], "min_xy": int(min_xy), "version": 1}


def cache_folder_3d(cache_dir: str, config: Mapping[str, Any]) -> str:
    """``<cache_dir>/flare3d_<hash of the preprocessing settings>``."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(cache_dir), f"flare3d_{h}")


def preprocessed_dataset_3d(items: Sequence[dict[str, Any]], cache_folder: str, config: Mapping[str, Any]) -> PersistentDataset:
    """Preprocessed (deterministic) 3D volumes (:func:`transforms.preprocess_steps_3d`),
    cached on disk in ``cache_folder``."""
    return PersistentDataset(list(items), transform=Compose(preprocess_steps_3d(config)), cache_dir=cache_folder)


def train_dataset_3d(items: Sequence[dict[str, Any]], cache_folder: str, config: Mapping[str, Any], crop_size: int, n_crops: int,
                     augment: bool = True) -> PersistentDataset:
    """3D training set: the cached preprocessing (same cache files), then random crops and
    (unless ``augment`` is False) augmentations."""
    steps = preprocess_steps_3d(config) + random_crop_transforms(3, crop_size, n_crops, augment)
    return PersistentDataset(list(items), transform=Compose(steps), cache_dir=cache_folder)


def prepare_cache_3d(cache_dir: str, config: Mapping[str, Any]) -> str:
    """Create (if needed) the cache folder for ``config``; returns its path."""
    folder = cache_folder_3d(cache_dir, config)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--cache_dir {cache_dir!r} cannot be created ({e.strerror})") from None
    return folder


def load_preprocessed_3d(ds, index: int, item: Mapping[str, Any], n_classes: int) -> dict[str, Any]:
    """Item ``index`` of a :func:`preprocessed_dataset_3d`, with its label ids checked.

    Raises:
        UserError: the files cannot be read or preprocessed, or the label has ids out of range.
    """
    try:
        d = ds[index]
    except Exception as e:
        ue = find_user_error(e)
        if ue is not None:
            raise ue from None
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise UserError(f"cannot preprocess {item['image']} / {item['label']}: {type(root).__name__}: {str(root).strip()[:300]}") from None
    check_label_ids(d["label"], n_classes, item["label"])
    return d


# ---------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------


def windows_per_item(shape: Sequence[int], roi: int, overlap: float) -> int:
    """How many sliding windows MONAI places on an item of ``shape`` (spatial)."""
    n = 1
    step = max(int(roi * (1 - overlap)), 1)
    for s in shape:
        n *= 1 if s <= roi else math.ceil((s - roi) / step) + 1
    return n


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    spatial_dims: int,
    crop_size: int,
    sw_batch_size: int,
    sw_overlap: float,
    device: torch.device,
    autocast: Callable[[], Any],
    on_device: bool = False,
) -> np.ndarray | torch.Tensor:
    """Class ids (X, Y, Z) uint8 for an image volume (X, Y, Z) by sliding-window inference.

    ``image``: float32, or stored 8-/16-bit PNG values (converted on the device, same bits
    as :func:`data.stored_to_float`). 2D: the slices are the batch; as many slices go through one
    call as fill ``sw_batch_size`` windows, so each forward pass sees a full batch of windows.
    3D: the volume is one item with windows of ``crop_size``^3. ``on_device``: return the
    prediction as a tensor on ``device`` (no copy to the host) instead of a numpy array.
    """
    model.eval()
    roi = (int(crop_size),) * spatial_dims
    take = _device_image(image, device)
    if spatial_dims == 3:
        with autocast():
            logits = sliding_window_inference(take(None)[None, None], roi, sw_batch_size, model, overlap=sw_overlap)
        out = logits.argmax(1)[0].to(torch.uint8)
        return out if on_device else out.cpu().numpy()
    n_z = image.shape[-1]
    per = max(1, sw_batch_size // windows_per_item(image.shape[:2], crop_size, sw_overlap))
    out = []
    for s in range(0, n_z, per):
        x = take(slice(s, s + per)).permute(2, 0, 1)[:, None]  # (z, 1, X, Y)
        with autocast():
            logits = sliding_window_inference(x, roi, sw_batch_size, model, overlap=sw_overlap)
        out.append(logits.argmax(1).to(torch.uint8))
    pred = torch.cat(out).permute(1, 2, 0)
    return pred if on_device else pred.contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------


def paper_dice_values(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, spatial_dims: int, n_classes: int,
                      chunk: int = 16) -> list[float]:
    """``dice_paper`` values of one case: one per slice (2D; volumes (X, Y, Z)) or one for the
    volume (3D). Computed where ``pred`` lies (the GPU during training), ``chunk`` slices at a time."""
    acc = metrics.PaperDice()
    p = torch.as_tensor(pred)
    g = torch.as_tensor(label).to(p.device)
    if spatial_dims == 3:
        acc.update(p[None], g[None], n_classes)
        return acc.values()
    p, g = p.movedim(-1, 0), g.movedim(-1, 0)
    for s in range(0, p.shape[0], chunk):
        acc.update(p[s : s + chunk], g[s : s + chunk], n_classes)
    return acc.values()


def vis_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> int:
    """The z index with the most labelled organ voxels (the first one on ties)."""
    return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(axis=0)))


def save_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` as a gzipped NIfTI with ``affine``, atomically."""
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    with atomic_write(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))


@dataclass
class EvalResult:
    """What :func:`evaluate` returns (identical on every rank).

    Attributes:
        dice_paper: the paper's score (mean over all slices / volumes of all cases).
        n_items: slices (2D) or volumes (3D) scored.
        paper_per_case: ``{case: mean dice_paper over its slices}``.
        per_case: ``{case: metrics.organ_scores(...)}`` (only with ``full``).
        vis: ``[(image, label, pred, title)]`` slices for the figure (only with ``full``).
    """

    dice_paper: float
    n_items: int
    paper_per_case: dict[str, float]
    per_case: dict[str, dict[int, dict[str, float]]] | None = None
    vis: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    cases: Sequence[CaseRef],
    load_case: Callable[[CaseRef], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    spatial_dims: int,
    n_classes: int,
    crop_size: int,
    sw_batch_size: int,
    sw_overlap: float,
    device: torch.device,
    autocast: Callable[[], Any],
    info: engine.DistInfo,
    full: bool = False,
    tolerance_mm: float | Mapping[int, float] = metrics.FLARE22_TOLERANCE_MM,
    n_vis: int = 0,
    save_dir: str | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Predict every case and score it; cases are split across ranks and gathered exactly.

    Args:
        model: the segmenter (not DDP-wrapped); put in eval mode here.
        cases: the cases, in the order their results are reported.
        load_case: ``CaseRef -> (image (X, Y, Z) float32, label (X, Y, Z) uint8, affine 4x4)``.
        full: also compute the challenge-grade per-organ scores and the figure's slices.
        tolerance_mm: NSD tolerance (one value, or per organ id).
        n_vis: slices for the figure (cases spread evenly over ``cases``; the slice with most organ voxels).
        save_dir: write ``<case>.nii.gz`` (prediction), ``labels/<case>.nii.gz`` and
            ``images/<case>_0000.nii.gz`` there, with the preprocessed geometry.

    Raises:
        UserError: no case to evaluate.
    """
    if not cases:
        raise UserError("no validation cases to evaluate (empty validation set)")
    vis_idx = set(np.unique(np.linspace(0, len(cases) - 1, num=min(n_vis, len(cases))).round().astype(int)).tolist()) if full and n_vis > 0 else set()
    mine = list(range(info.rank, len(cases), info.world_size))
    local = []
    bar = tqdm(mine, desc=desc, disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    for i in bar:
        ref = cases[i]
        image, label, affine = load_case(ref)
        pred_t = predict_volume(model, image, spatial_dims, crop_size, sw_batch_size, sw_overlap, device, autocast, on_device=True)
        rec: dict[str, Any] = {"index": i, "case": ref.case, "paper": paper_dice_values(pred_t, label, spatial_dims, n_classes)}
        if not (full or i in vis_idx or save_dir is not None):
            local.append(rec)  # the scores of a routine evaluation need nothing on the host
            continue
        pred = pred_t.cpu().numpy()
        if i in vis_idx or save_dir is not None:  # the figure and the saved image want floats
            image = data.stored_to_float(image)
        if full:
            rec["scores"] = metrics.organ_scores(pred, label, ref.spacing, n_classes=n_classes, tolerance_mm=tolerance_mm, z_axis=-1)
        if i in vis_idx:
            z = vis_slice(image, label, pred)
            z_name = ref.slices[z]["slice"] if ref.slices else z
            rec["vis"] = (image[..., z].copy(), label[..., z].copy(), pred[..., z].copy(), f"{ref.case} slice {z_name}")
        if save_dir is not None:
            save_nifti(os.path.join(save_dir, f"{ref.case}.nii.gz"), pred.astype(np.uint8), affine)
            save_nifti(os.path.join(save_dir, "labels", f"{ref.case}.nii.gz"), label.astype(np.uint8), affine)
            save_nifti(os.path.join(save_dir, "images", f"{ref.case}_0000.nii.gz"), image.astype(np.float32), affine)
        local.append(rec)
    bar.close()
    gathered = sorted((r for part in engine.all_gather_objects(local, info) for r in part), key=lambda r: r["index"])
    if [r["index"] for r in gathered] != list(range(len(cases))):  # pragma: no cover - a broken gather
        raise RuntimeError("evaluation results of some cases are missing or duplicated after gathering")
    acc = metrics.PaperDice()
    for r in gathered:
        acc.extend(r["paper"])
    return EvalResult(
        dice_paper=acc.mean(),
        n_items=acc.count(),
        paper_per_case={r["case"]: float(np.mean(r["paper"])) for r in gathered},
        per_case={r["case"]: r["scores"] for r in gathered} if full else None,
        vis=[r["vis"] for r in gathered if "vis" in r],
    )


# ---------------------------------------------------------------------------------------
# The fine-tuned model file
# ---------------------------------------------------------------------------------------


def finetuned_checkpoint(model: nn.Module, cfg: Mapping[str, Any], n_classes: int, args: Mapping[str, Any], epoch: int, dice_paper: float) -> dict[str, Any]:
    """The self-describing best-model file ``<run>.pt`` (format ``ioupos-finetune-v1``)."""
    return {
        "format": FINETUNE_FORMAT,
        "model_config": dict(cfg),
        "n_classes": int(n_classes),
        "args": dict(args),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "dice_paper": float(dice_paper),
    }


def load_finetuned(path: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild the segmenter stored in a fine-tuned file; returns (model, model config, file).

    Raises:
        UserError: unreadable file, not a fine-tuned model of this project, or weights that
            do not fit the stored configuration.
    """
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FINETUNE_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"--chkpt_path {path!r} is not a fine-tuned model of this project (format {fmt!r}, expected {FINETUNE_FORMAT!r})")
    cfg = dict(ckpt["model_config"])
    model = build_segmenter(cfg, int(ckpt["n_classes"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"weights in {path!r} do not fit its model configuration: {str(e).splitlines()[0]}") from None
    return model, cfg, ckpt

"""Fine-tuning pieces used by ``main_finetune.py``: data, crops, sliding-window evaluation, scores.

Data (2D, the paper's setting): the output of ``preprocess_flare_labelled.py``
(``imgs/<case>_<zzzz>.png``, ``labels/<case>_<zzzz>.png``, ``manifest.json``), or of the
original code's script (``imgs/<case>_0000_<i>.png``, ``labels/<case>_<i>.png``, no manifest:
the voxel size comes from ``--size_x/y/z``; ``data.SLICE_LAYOUTS``). Training
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

import argparse
import gzip
import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset, PersistentDataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose
from tqdm import tqdm

import data
import engine
import metrics
import models
from batch_augment import BatchFinetuneAugment
from data import (
    CaseCache,
    CaseRef,
    SliceCache,
    check_label_ids,
    check_label_slices,
    group_cases_2d,
    load_case_2d,
    read_manifest_spacing,
)
from transforms import (
    LoadSliceAndLabel2d,
    check_preprocessing_record,
    preprocess_steps_3d,
    preprocessing_record,
    random_crop_transforms,
)
from utils import (
    TrainingError,
    UserError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    check_fits_in_memory,
    check_outputs_apart,
    claim_outputs,
    file_sha256,
    prepare_output_dir,
    root_cause,
    torch_load,
    user_error_in,
)

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "ioupos-finetune-v1"
METHOD = "finetune"  # the "method" of fine-tuning's training states
#: flags that must be equal to resume a run (anything that changes the model, data or schedule)
RESUME_KEYS = engine.COMMON_RESUME_KEYS + (
    "split_path",
    "n_train_cases",
    "n_classes",
    "n_crops_per_ct",
    "wd",
    "chkpt_path",
    "checkpoint_key",
    "eval_every",
    "eval_every_from",
    "patience",
    "drop_last",
    "slice_layout",
    "a_min",
    "a_max",
    "size_x",
    "size_y",
    "size_z",
)


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


def train_dataset_2d(
    items: Sequence[dict[str, Any]],
    crop_size: int,
    n_crops: int,
    augment: bool = True,
    cache: data.SliceCache | None = None,
    layout: str = "ioupos",
) -> Dataset:
    """The 2D training set: one item per labelled slice, ``n_crops`` crops each (``augment``,
    ``cache`` and ``layout``: see :func:`transforms.random_crop_transforms` and
    :class:`transforms.LoadSliceAndLabel2d`)."""
    steps = [LoadSliceAndLabel2d(cache, layout), *random_crop_transforms(2, crop_size, n_crops, augment)]
    return Dataset(list(items), transform=Compose(steps))


def preprocess_config_3d(
    a_min: float = -500.0, a_max: float = 500.0, pixdim: Sequence[float] = (1.0, 1.0, 2.5), min_xy: int = 96
) -> dict[str, Any]:
    """The 3D preprocessing settings (they name the cache folder, so changed settings never reuse a stale cache)."""
    return {
        "a_min": float(a_min),
        "a_max": float(a_max),
        "pixdim": [float(p) for p in pixdim],
        "min_xy": int(min_xy),
        "version": 1,
    }


def cache_folder_3d(cache_dir: str, config: Mapping[str, Any]) -> str:
    """``<cache_dir>/flare3d_<hash of the preprocessing settings>``."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(cache_dir), f"flare3d_{h}")


def preprocessed_dataset_3d(
    items: Sequence[dict[str, Any]], cache_folder: str, config: Mapping[str, Any]
) -> PersistentDataset:
    """Preprocessed (deterministic) 3D volumes (:func:`transforms.preprocess_steps_3d`),
    cached on disk in ``cache_folder``."""
    return PersistentDataset(list(items), transform=Compose(preprocess_steps_3d(config)), cache_dir=cache_folder)


def train_dataset_3d(
    items: Sequence[dict[str, Any]],
    cache_folder: str,
    config: Mapping[str, Any],
    crop_size: int,
    n_crops: int,
    augment: bool = True,
) -> PersistentDataset:
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
        ue = user_error_in(e)
        if ue is not None:
            raise ue from None
        root = root_cause(e)
        raise UserError(
            f"cannot preprocess {item['image']} / {item['label']}: {type(root).__name__}: {str(root).strip()[:300]}"
        ) from None
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
    probabilities: bool = False,
) -> np.ndarray | torch.Tensor | tuple[np.ndarray | torch.Tensor, torch.Tensor]:
    """Class ids (X, Y, Z) uint8 for an image volume (X, Y, Z) by sliding-window inference.

    ``image``: float32, or stored 8-/16-bit PNG values (converted on the device, same bits
    as :func:`data.stored_to_float`). 2D: the slices are the batch; as many slices go through one
    call as fill ``sw_batch_size`` windows, so each forward pass sees a full batch of windows.
    3D: the volume is one item with windows of ``crop_size``^3. ``on_device``: return the
    prediction as a tensor on ``device`` (no copy to the host) instead of a numpy array.
    ``probabilities``: return ``(ids, probs)``, ``probs`` the softmax per class as a float16
    CPU tensor (C, X, Y, Z) (the ids are its argmax, taken in float32 before rounding).
    """
    model.eval()
    roi = (int(crop_size),) * spatial_dims
    take = _device_image(image, device)
    probs: list[torch.Tensor] = []
    if spatial_dims == 3:
        with autocast():
            logits = sliding_window_inference(take(None)[None, None], roi, sw_batch_size, model, overlap=sw_overlap)
        out = logits.argmax(1)[0].to(torch.uint8)
        if probabilities:
            probs.append(torch.softmax(logits[0].float(), dim=0).half().cpu())
        out = out if on_device else out.cpu().numpy()
        return (out, probs[0]) if probabilities else out
    n_z = image.shape[-1]
    per = max(1, sw_batch_size // windows_per_item(image.shape[:2], crop_size, sw_overlap))
    out = []
    for s in range(0, n_z, per):
        x = take(slice(s, s + per)).permute(2, 0, 1)[:, None]  # (z, 1, X, Y)
        with autocast():
            logits = sliding_window_inference(x, roi, sw_batch_size, model, overlap=sw_overlap)
        out.append(logits.argmax(1).to(torch.uint8))
        if probabilities:
            probs.append(torch.softmax(logits.float(), dim=1).half().cpu())  # (z, C, X, Y)
    pred = torch.cat(out).permute(1, 2, 0)
    pred = pred if on_device else pred.contiguous().cpu().numpy()
    if probabilities:
        return pred, torch.cat(probs).permute(1, 2, 3, 0)
    return pred


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------


def paper_dice_values(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spatial_dims: int,
    n_classes: int,
    chunk: int = 16,
) -> list[float]:
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
    z_axis: int | None = -1,
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
        z_axis: FLARE 2022's slice-range rule for aorta, IVC and esophagus along this axis; None
            for any other label set (:func:`metrics.scoring_rules`).
        n_vis: slices for the figure (cases spread evenly over ``cases``; the slice with most organ voxels).
        save_dir: write :func:`prediction_files` there (prediction, reference label and image
            of each case, with the preprocessed geometry).

    Raises:
        UserError: no case to evaluate.
    """
    if not cases:
        raise UserError("no validation cases to evaluate (empty validation set)")
    vis_idx = (
        set(np.unique(np.linspace(0, len(cases) - 1, num=min(n_vis, len(cases))).round().astype(int)).tolist())
        if full and n_vis > 0
        else set()
    )
    mine = list(range(info.rank, len(cases), info.world_size))
    local = []
    bar = tqdm(mine, desc=desc, disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    for i in bar:
        ref = cases[i]
        image, label, affine = load_case(ref)
        pred_t = predict_volume(
            model, image, spatial_dims, crop_size, sw_batch_size, sw_overlap, device, autocast, on_device=True
        )
        rec: dict[str, Any] = {
            "index": i,
            "case": ref.case,
            "paper": paper_dice_values(pred_t, label, spatial_dims, n_classes),
        }
        if not (full or i in vis_idx or save_dir is not None):
            local.append(rec)  # the scores of a routine evaluation need nothing on the host
            continue
        pred = pred_t.cpu().numpy()
        if i in vis_idx or save_dir is not None:  # the figure and the saved image want floats
            image = data.stored_to_float(image)
        if full:
            rec["scores"] = metrics.organ_scores(
                pred, label, ref.spacing, n_classes=n_classes, tolerance_mm=tolerance_mm, z_axis=z_axis
            )
        if i in vis_idx:
            z = vis_slice(image, label, pred)
            z_name = ref.slices[z]["slice"] if ref.slices else z
            rec["vis"] = (image[..., z].copy(), label[..., z].copy(), pred[..., z].copy(), f"{ref.case} slice {z_name}")
        if save_dir is not None:
            files = prediction_files(save_dir, ref.case)
            save_nifti(files["prediction"], pred.astype(np.uint8), affine)
            save_nifti(files["label"], label.astype(np.uint8), affine)
            save_nifti(files["image"], image.astype(np.float32), affine)
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


def finetuned_checkpoint(
    model: nn.Module,
    cfg: Mapping[str, Any],
    n_classes: int,
    args: Mapping[str, Any],
    epoch: int,
    dice_paper: float,
    preprocessing: Mapping[str, Any],
    labels: data.LabelSet = data.FLARE_LABELS,
) -> dict[str, Any]:
    """The self-describing best-model file ``<run>.pt`` (format ``ioupos-finetune-v1``).

    ``preprocessing``: how the training data was preprocessed
    (:func:`transforms.preprocessing_record`, from :func:`data_preprocessing`); ``predict.py``
    applies exactly that to new CT, and ``export_model.py`` writes it into the model card.
    ``labels``: the label set it was trained on (``"labels": {"0": "background", ...}``;
    ``predict.py`` and the model card name the classes with it).
    """
    return {
        "format": FINETUNE_FORMAT,
        "model_config": dict(cfg),
        "n_classes": int(n_classes),
        "args": dict(args),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "dice_paper": float(dice_paper),
        "preprocessing": dict(preprocessing),
        "labels": labels.to_json(),
    }


def _record_from_manifest(data_dir: str) -> dict[str, Any]:
    """The preprocessing record of a ``preprocess_flare_labelled.py`` output (its ``manifest.json`` args).

    Raises:
        UserError: no readable manifest, or not 2D labelled slices.
    """
    manifest = data.read_manifest(data_dir)
    where = os.path.join(data_dir, data.MANIFEST_NAME)
    a = manifest["args"]
    if a.get("kind") != "labelled" or a.get("spatial_dims") != 2:
        raise UserError(
            f"{where} describes {a.get('kind')} {a.get('spatial_dims')}D data, not the labelled 2D slices of fine-tuning"
        )
    try:
        q = a.get("png_quantization", "round")  # folders written before the flag existed: rounded
        return preprocessing_record(2, a["a_min"], a["a_max"], a["pixdim"], a["min_xy"], a["png_bits"], where, q)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: the preprocessing arguments are incomplete ({type(e).__name__}: {e})") from None


def data_preprocessing(args: argparse.Namespace, layout: str = "ioupos") -> dict[str, Any]:
    """How the fine-tuning data of ``--data_dir`` is preprocessed (:func:`transforms.preprocessing_record`).

    2D: the arguments recorded in the folder's ``manifest.json`` by ``preprocess_flare_labelled.py``
    (HU window, voxel size, padding, PNG bits and quantization); a given ``--a_min ... --size_z``
    must agree with them. A folder of the original code's preprocessing (``layout`` "original")
    records nothing: the flags (default the paper's values, the original's defaults) state it,
    with the original's 96-pixel padding and truncated 8-bit PNGs. 3D: the raw NIfTI go through
    :func:`preprocess_config_3d`'s chain on the fly, with the flags' window and voxel size.

    Raises:
        UserError: 2D and the manifest is missing or incomplete, or a flag differs from it.
    """
    flags = engine.preprocessing_from_flags(args)
    if args.spatial_dims == 2 and layout == "original":
        return preprocessing_record(
            2,
            flags["a_min"],
            flags["a_max"],
            flags["pixdim"],
            96,
            8,
            f"{args.data_dir}: slices of the original code's preprocess_flare_labelled.py (no manifest.json); "
            "HU window and voxel size from --a_min --a_max --size_x --size_y --size_z",
            "truncate",
        )
    if args.spatial_dims == 2:
        record = _record_from_manifest(args.data_dir)
        where = os.path.join(args.data_dir, data.MANIFEST_NAME)
        engine.check_preprocessing_flags(args, record, where)
        return record
    c = preprocess_config_3d(flags["a_min"], flags["a_max"], flags["pixdim"])
    return preprocessing_record(
        3,
        c["a_min"],
        c["a_max"],
        c["pixdim"],
        c["min_xy"],
        None,
        "main_finetune.py --spatial_dims 3: raw NIfTI preprocessed on the fly (finetune.preprocess_config_3d, "
        "--a_min --a_max --size_x --size_y --size_z)",
    )


def checkpoint_preprocessing(ckpt: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The preprocessing a fine-tuned model expects: its checkpoint's ``"preprocessing"`` record.

    A checkpoint written before the record existed (2D) falls back to the ``manifest.json``
    of the data folder it records as ``args["data_dir"]``, when that folder still holds one
    (logged); nothing is ever assumed.

    Raises:
        UserError: no record and no manifest to read it from (the message says what to do),
            or a record this code cannot apply.
    """
    rec = ckpt.get("preprocessing")
    if rec is not None:
        return check_preprocessing_record(rec, path)
    saved = ckpt.get("args") or {}
    data_dir = saved.get("data_dir")
    if saved.get("spatial_dims") == 2 and data_dir:
        where = os.path.join(data_dir, data.MANIFEST_NAME)
        if os.path.isfile(where):
            logger.warning(
                "%s has no preprocessing record (written by an older version); using the settings in %s, "
                "the manifest of the data it was trained on",
                path,
                where,
            )
            return _record_from_manifest(data_dir)
        raise UserError(
            f"{path} records no preprocessing (written by an older version) and the manifest of its training data "
            f"{where} is gone; restore that folder, or fine-tune again to get a model that records it"
        )
    raise UserError(
        f"{path} records no preprocessing (written by an older version; 3D or without a recorded data folder); "
        "fine-tune again to get a model that records it"
    )


def checkpoint_labels(ckpt: Mapping[str, Any], path: str) -> data.LabelSet:
    """The label set a fine-tuned model was trained on: its ``"labels"`` record; a checkpoint
    written before the record existed predicts FLARE 2022's organs when it has 14 classes
    (the only label set fine-tuning took then), else classes named ``class <id>`` (logged).

    Raises:
        UserError: a record that is not a label set, or one that disagrees with ``n_classes``.
    """
    n_classes = int(ckpt["n_classes"])
    rec = ckpt.get("labels")
    if rec is None:
        if n_classes == data.N_CLASSES:
            return data.FLARE_LABELS
        logger.warning("%s records no label names (an older version); its classes are named 'class <id>'", path)
        return data.LabelSet(("background", *(f"class {i}" for i in range(1, n_classes))), path)
    labels = data.parse_label_set(rec, f"{path} ('labels')")
    if labels.n_classes != n_classes:
        raise UserError(f"{path} predicts {n_classes} classes but records {labels.n_classes} label names")
    return data.LabelSet(labels.names, path)


def load_finetuned(path: str, ckpt: Any = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild the segmenter stored in a fine-tuned file; returns (model, model config, file).

    ``ckpt``: the file's contents when the caller has already read ``path`` (None: read it here).

    Raises:
        UserError: unreadable file, not a fine-tuned model of this project, or weights that
            do not fit the stored configuration.
    """
    if ckpt is None:
        ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FINETUNE_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"--chkpt_path {path!r} is not a fine-tuned model of this project (format {fmt!r}, expected {FINETUNE_FORMAT!r})"
        )
    cfg = dict(ckpt["model_config"])
    model = models.build_segmenter(cfg, int(ckpt["n_classes"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"weights in {path!r} do not fit its model configuration: {str(e).splitlines()[0]}") from None
    return model, cfg, ckpt


# ---------------------------------------------------------------------------------------
# Flags and their checks
# ---------------------------------------------------------------------------------------


def default_sw_batch_size(spatial_dims: int) -> int:
    """``--sw_batch_size``'s default (windows per forward pass): 512 in 2D, 64 in 3D."""
    return 512 if spatial_dims == 2 else 64


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flag values with one line each (UserError); fill ``--sw_batch_size``'s default."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    if args.eval_only:  # the model's own crop size and architecture count, not the flags'
        need(bool(args.data_dir), "--data_dir is required (a folder of preprocessed data)")
    else:
        engine.check_training_args(args, min_crop_windows=2)
    need(args.n_classes is None or args.n_classes >= 2, f"--n_classes must be at least 2, got {args.n_classes}")
    need(args.n_train_cases >= 0, f"--n_train_cases must be 0 (all) or positive, got {args.n_train_cases}")
    need(
        args.split_path is None or args.val_fraction is None,
        "--split_path names the split; --val_fraction makes one: give one of them",
    )
    need(
        args.fold is None or args.val_fraction is None,
        "--fold picks a fold of nnU-Net's splits_final.json; --val_fraction makes a split: give one of them",
    )
    if args.val_fraction is not None:
        need(0 < args.val_fraction < 1, f"--val_fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    need(args.n_crops_per_ct >= 1, f"--n_crops_per_ct must be at least 1, got {args.n_crops_per_ct}")
    need(args.wd >= 0, f"--wd must not be negative, got {args.wd}")
    need(
        float(args.patience).is_integer() and args.patience >= 1,
        f"--patience must be a whole number of evaluations, at least 1, got {args.patience:g}",
    )
    args.patience = int(args.patience)
    need(args.eval_every >= 1, f"--eval_every must be at least 1, got {args.eval_every}")
    if args.sw_batch_size is None:
        args.sw_batch_size = default_sw_batch_size(args.spatial_dims)
    need(args.sw_batch_size >= 1, f"--sw_batch_size must be at least 1, got {args.sw_batch_size}")
    need(0 <= args.sw_overlap < 1, f"--sw_overlap must be in [0, 1), got {args.sw_overlap}")
    need(args.n_vis >= 0, f"--n_vis must be 0 or positive, got {args.n_vis}")
    if args.eval_only:
        need(args.chkpt_path is not None, "--eval_only needs --chkpt_path, the fine-tuned model to evaluate")
        need(args.resume is None, "--eval_only and --resume cannot be used together")
        need(
            not args.cache_images,
            "--cache_images caches the training slices; --eval_only does not train "
            "(--cache_eval caches evaluated cases)",
        )
        engine.check_speed_args(args)


def default_run_name(args: argparse.Namespace) -> str:
    """``finetune_<pretrained file or 'scratch'>_<arch><dims>d_seed<seed>``; ``<model>_eval`` with ``--eval_only``."""
    stem = "scratch"
    if args.chkpt_path:
        stem = os.path.basename(args.chkpt_path)
        stem = stem[:-3] if stem.endswith(".pt") else stem.rsplit(".", 1)[0]
    if args.eval_only:
        return f"{stem}_eval"
    return f"finetune_{stem}_{args.arch}{args.spatial_dims}d_seed{args.seed}"


def should_evaluate(epoch: int, args: argparse.Namespace) -> bool:
    """Evaluate after ``epoch`` (1-based): every ``eval_every`` epochs, every epoch from ``eval_every_from``, and the last."""
    return epoch % args.eval_every == 0 or epoch >= args.eval_every_from or epoch == args.n_epochs


# ---------------------------------------------------------------------------------------
# What a run reads
# ---------------------------------------------------------------------------------------


class FinetuneData:
    """Everything a run reads: the training set, the evaluation cases and how to load them.

    2D: slice items from ``data.list_finetune_pairs``; every label is read once at start-up
    and ids outside ``0..n_classes-1`` are refused (file named); ``--cache_images`` and
    ``--cache_eval`` are sized before anything is decoded. 3D: the raw volumes, preprocessed
    once into MONAI's PersistentDataset cache (``--cache_dir``), labels checked likewise.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        info: engine.DistInfo,
        need_train: bool,
        labels: data.LabelSet | None = None,
        rules: metrics.ScoringRules | None = None,
    ):
        #: the label set of the data (its manifest's; FLARE 2022's when it declares none)
        self.labels = labels if labels is not None else data_labels(args)
        #: how the challenge-grade scores are computed (tolerances, FLARE's slice-range rule)
        self.rules = rules if rules is not None else run_scoring_rules(args, self.labels)
        #: how the 2D slices lie on disk: this project's preprocessing or the original code's
        self.layout = (
            data.labelled_slice_layout(args.data_dir, args.slice_layout) if args.spatial_dims == 2 else "ioupos"
        )
        if self.layout == "original":
            logger.info("%s: slices written by the original code's preprocessing (imgs/<stem>_<i>.png)", args.data_dir)
        split = run_split(args, info, self.layout)
        if not split["val"]:
            raise UserError(f"the split {args.split_path} has no validation cases ('val' is empty)")
        if args.n_train_cases:  # the label budget: the first N training cases of the split, in its order
            if args.n_train_cases > len(split["train"]):
                raise UserError(
                    f"--n_train_cases {args.n_train_cases}, but the split {args.split_path} has "
                    f"{len(split['train'])} training cases"
                )
            split = {**split, "train": split["train"][: args.n_train_cases]}
            logger.info("--n_train_cases %d: training on %s", args.n_train_cases, ", ".join(split["train"]))
        pairs = data.list_finetune_pairs(args.data_dir, split, args.spatial_dims, self.layout)
        n = args.max_images
        train_items = pairs["train"][:n] if n else pairs["train"]
        val_items = pairs["val"][:n] if n else pairs["val"]
        if not val_items:
            raise UserError(f"no validation slices in {args.data_dir} for the split {args.split_path}")
        if need_train and not train_items:
            raise UserError(f"no training slices in {args.data_dir} for the split {args.split_path} ('train' is empty)")
        self.spatial_dims = args.spatial_dims
        #: output classes including background (``--n_classes``, else the label set's)
        self.n_classes = run_n_classes(args, self.labels)
        #: how the data was preprocessed; stored in the fine-tuned checkpoint for predict.py
        self.preprocessing = data_preprocessing(args, self.layout)
        self.split = split
        self.val_items = val_items
        self.train_items = train_items if need_train else []
        self.case_cache: CaseCache | None = None
        self.train_ds = None
        progress = args.progress and info.is_main
        if args.spatial_dims == 2:
            self._init_2d(args, info, train_items, val_items, need_train, progress)
        else:
            self._init_3d(args, train_items, val_items, need_train, progress)

    def _init_2d(self, args, info, train_items, val_items, need_train: bool, progress: bool) -> None:
        lay = self.layout
        if lay == "original":  # no manifest: every case has the voxel size of the preprocessing flags
            pixdim = tuple(self.preprocessing["pixdim"])
            spacing = {it["case"]: pixdim for it in list(train_items) + list(val_items)}
        else:
            spacing = read_manifest_spacing(args.data_dir)
        checked = list(val_items) + (train_items if need_train or args.eval_train else [])
        check_label_slices(checked, self.n_classes, progress=progress, layout=lay)
        self.val_cases = group_cases_2d(val_items, spacing, args.data_dir, lay)
        self.train_cases = group_cases_2d(train_items, spacing, args.data_dir, lay) if args.eval_train else []
        if need_train:
            cache = None
            if args.cache_images:
                paths = [p for it in self.train_items for p in (it["image"], it["label"])]
                cache = SliceCache.build(
                    paths,
                    f"{len(self.train_items):,} training slices and their labels",
                    "--cache_images",
                    copies=info.local_world_size,
                    progress=progress,
                    layout=lay,
                )
            self.train_ds = train_dataset_2d(
                self.train_items,
                args.crop_size,
                args.n_crops_per_ct,
                augment=not args.batch_augment,
                cache=cache,
                layout=lay,
            )
        if args.cache_eval:  # filled at the first evaluation; refused now if it cannot fit
            self.case_cache = CaseCache(lambda ref: load_case_2d(ref, self.n_classes, stored=True))
            evaluated = list(val_items) + (list(train_items) if args.eval_train else [])
            need = SliceCache.planned_nbytes(
                [p for it in evaluated for p in (it["image"], it["label"])], progress=progress
            )
            check_fits_in_memory(
                need,
                f"--cache_eval: {len(evaluated):,} evaluated slices and their labels",
                "pass --no-cache_eval to read them from the PNGs at every evaluation",
            )

    def _init_3d(self, args, train_items, val_items, need_train: bool, progress: bool) -> None:
        rec = self.preprocessing
        config = preprocess_config_3d(rec["a_min"], rec["a_max"], rec["pixdim"], rec["min_xy"])
        folder = prepare_cache_3d(args.cache_dir, config)
        logger.info("3D preprocessing cache: %s", folder)
        eval_train_items = train_items if args.eval_train else []
        all_items = list(
            {it["case"]: it for it in (list(self.train_items) + eval_train_items + list(val_items))}.values()
        )
        self.pre_ds = preprocessed_dataset_3d(all_items, folder, config)
        index = {it["case"]: i for i, it in enumerate(all_items)}
        for i, it in enumerate(tqdm(all_items, desc="preprocessing (cached)", disable=not progress, leave=False)):
            load_preprocessed_3d(self.pre_ds, i, it, self.n_classes)  # fills the cache, checks labels
        pixdim = tuple(config["pixdim"])
        self._items = all_items
        self.val_cases = [CaseRef(case=it["case"], spacing=pixdim, index=index[it["case"]]) for it in val_items]
        self.train_cases = [
            CaseRef(case=it["case"], spacing=pixdim, index=index[it["case"]]) for it in eval_train_items
        ]
        if need_train:
            self.train_ds = train_dataset_3d(
                self.train_items, folder, config, args.crop_size, args.n_crops_per_ct, augment=not args.batch_augment
            )

    def load_case(self, ref: CaseRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image (X, Y, Z), label (X, Y, Z) uint8, affine)`` of an evaluation case."""
        if self.spatial_dims == 2:
            if self.case_cache is not None:
                return self.case_cache.load(ref)
            return load_case_2d(ref, self.n_classes)
        d = load_preprocessed_3d(self.pre_ds, ref.index, self._items[ref.index], self.n_classes)
        image = np.asarray(d["image"][0], dtype=np.float32)
        label = np.asarray(d["label"][0]).round().astype(np.uint8)
        return image, label, np.asarray(d["affine"], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Evaluation during and after training
# ---------------------------------------------------------------------------------------


def evaluate_cases(
    model: nn.Module,
    cases: Sequence[CaseRef],
    dat: FinetuneData,
    args: argparse.Namespace,
    info: engine.DistInfo,
    amp: engine.Amp,
    full: bool,
    desc: str,
    save_dir: str | None = None,
) -> EvalResult:
    """:func:`evaluate` with the run's flags (tolerances, sliding window, figure slices)."""
    n_cached = len(dat.case_cache.cases) if dat.case_cache is not None else 0
    res = evaluate(
        model,
        cases,
        dat.load_case,
        spatial_dims=args.spatial_dims,
        n_classes=dat.n_classes,
        crop_size=args.crop_size,
        sw_batch_size=args.sw_batch_size,
        sw_overlap=args.sw_overlap,
        device=info.device,
        autocast=amp.autocast,
        info=info,
        full=full,
        tolerance_mm=dat.rules.tolerance_mm,
        z_axis=dat.rules.z_axis,
        n_vis=args.n_vis if desc == "val" else 0,
        save_dir=save_dir,
        progress=args.progress,
        desc=desc,
    )
    if dat.case_cache is not None and len(dat.case_cache.cases) > n_cached:
        logger.info(
            "--cache_eval: %d cases in memory (%.2f GB)", len(dat.case_cache.cases), dat.case_cache.nbytes / 1e9
        )
    return res


#: Sub-folders of ``--save_predictions`` for the reference label and image of each case. Not
#: the raw FLARE layout's ``images/<case>_0000.nii.gz`` and ``labels/<case>.nii.gz``: a
#: prediction folder pointed at a raw data set can never take its files' names.
PRED_LABEL_DIR = "reference_labels"
PRED_IMAGE_DIR = "reference_images"


def prediction_files(save_dir: str, case: str) -> dict[str, str]:
    """The files ``--save_predictions`` writes for ``case``: ``<case>.nii.gz`` (the prediction),
    ``reference_labels/<case>.nii.gz`` and ``reference_images/<case>.nii.gz`` (label and image in
    the same preprocessed geometry; ``metrics.py --pred_dir DIR --label_dir DIR/reference_labels``)."""
    return {
        "prediction": os.path.join(save_dir, f"{case}.nii.gz"),
        "label": os.path.join(save_dir, PRED_LABEL_DIR, f"{case}.nii.gz"),
        "image": os.path.join(save_dir, PRED_IMAGE_DIR, f"{case}.nii.gz"),
    }


def run_inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """``{flag: path}`` of what a fine-tuning run reads (no output may overlap them); a split made
    with ``--val_fraction`` is the run's own file, not an input."""
    split = None if getattr(args, "val_fraction", None) is not None else args.split_path
    return {"--data_dir": args.data_dir, "--split_path": split, "--chkpt_path": args.chkpt_path}


def data_labels(args: argparse.Namespace) -> data.LabelSet:
    """The label set of ``--data_dir``: in 2D the one its ``manifest.json`` records (FLARE 2022's
    when it records none, or when there is no manifest: reading the data then says what is
    wrong); in 3D the ``dataset.json`` of a raw nnU-Net / Decathlon data set, else FLARE's.

    Raises:
        UserError: a recorded label set that cannot be read.
    """
    if args.spatial_dims == 2:
        if os.path.isfile(os.path.join(args.data_dir, data.MANIFEST_NAME)):
            manifest = data.read_manifest(args.data_dir)
            return data.manifest_labels(manifest, os.path.join(args.data_dir, data.MANIFEST_NAME))
        return data.FLARE_LABELS
    if os.path.isfile(os.path.join(args.data_dir, data.DATASET_JSON)):
        return data.dataset_labels(args.data_dir)
    return data.FLARE_LABELS


def run_n_classes(args: argparse.Namespace, labels: data.LabelSet) -> int:
    """The number of output classes: ``--n_classes``, or the label set's when it is not given.

    Raises:
        UserError: ``--n_classes`` differs from the label set of ``--data_dir``.
    """
    if args.n_classes is None:
        return labels.n_classes
    if args.n_classes != labels.n_classes:
        raise UserError(
            f"--n_classes {args.n_classes}, but the label set of --data_dir ({labels.source}) has "
            f"{labels.n_classes} classes: {labels.describe()}"
        )
    return args.n_classes


def run_scoring_rules(args: argparse.Namespace, labels: data.LabelSet) -> metrics.ScoringRules:
    """:func:`metrics.scoring_rules` for ``--nsd_tolerance_mm`` and the data's label set."""
    return metrics.scoring_rules(labels, metrics.parse_tolerance_mm(args.nsd_tolerance_mm), "--nsd_tolerance_mm")


def _is_flare_data(args: argparse.Namespace) -> bool:
    """Data of the FLARE layout (its preprocessing recorded no other layout; 3D: no dataset.json)."""
    if args.spatial_dims == 3:
        return not os.path.isfile(os.path.join(args.data_dir, data.DATASET_JSON))
    path = os.path.join(args.data_dir, data.MANIFEST_NAME)
    return not os.path.isfile(path) or data.read_manifest(args.data_dir)["args"].get("layout") is None


def resolve_split_path(args: argparse.Namespace) -> str:
    """The split file of the run: ``--split_path``; with ``--val_fraction`` the file the run
    writes (``<run>_files/split.json``); else ``<data_dir>/split.json`` written by the
    preprocessing; a 3D nnU-Net data set's ``splits_final.json`` (fold ``--fold``, default 0);
    FLARE data: the paper's split. Sets ``args.fold`` to 0 for ``splits_final.json`` without one.

    Raises:
        UserError: data of another layout with no split to read (what to pass is said).
    """
    if args.split_path:
        return args.split_path
    if args.val_fraction is not None:
        return os.path.join(engine.run_paths(args.chkpt_dir, args.run_name)["dir"], data.SPLIT_NAME)
    own = os.path.join(args.data_dir, data.SPLIT_NAME)
    if os.path.isfile(own):
        return own
    nn = os.path.join(args.data_dir, data.NNUNET_SPLITS)
    if args.spatial_dims == 3 and os.path.isfile(nn):
        args.fold = 0 if args.fold is None else args.fold
        return nn
    if _is_flare_data(args):
        return data.DEFAULT_SPLIT_PATH
    raise UserError(
        f"--data_dir {args.data_dir} holds no {data.SPLIT_NAME}: pass --split_path, or --val_fraction F to split its "
        "cases here (preprocess_labelled.py writes one for nnU-Net and Decathlon data)"
    )


def run_split(args: argparse.Namespace, info: engine.DistInfo, layout: str) -> dict[str, list[str]]:
    """The split of the run: read from ``args.split_path`` (``--fold`` for nnU-Net's folds), or
    with ``--val_fraction`` made over the cases of ``--data_dir`` (the same on every rank; 2D
    slices listed in ``layout``) and written by rank 0 to ``args.split_path`` in the run's folder.

    Raises:
        UserError: an unreadable split, or too few cases to split.
    """
    if args.val_fraction is None:
        return data.load_split(args.split_path, args.fold)
    cases = data.finetune_cases(args.data_dir, args.spatial_dims, layout)
    split = data.make_split(cases, args.val_fraction, args.split_seed)
    if info.is_main:
        made_by = {"val_fraction": args.val_fraction, "split_seed": args.split_seed, "n_cases": len(cases)}
        os.makedirs(os.path.dirname(args.split_path), exist_ok=True)
        atomic_write_json(args.split_path, data.split_file_record(split, made_by))
    logger.info(
        "split of %d cases (--val_fraction %g --split_seed %d): %d train / %d val -> %s",
        len(cases),
        args.val_fraction,
        args.split_seed,
        len(split["train"]),
        len(split["val"]),
        args.split_path,
    )
    return split


def check_predictions_dir(args: argparse.Namespace, cases: Sequence[str], info: engine.DistInfo) -> None:
    """``--save_predictions``, checked at start-up (not after the training): the folder is
    created and tested for writing, it keeps apart from the inputs, and none of the files it
    will receive exists unless this project wrote it (or ``--overwrite``); rank 0 records them.

    Raises:
        UserError: a folder that cannot be written, overlaps an input, or holds foreign files.
    """
    if not args.save_predictions:
        return
    check_outputs_apart({"--save_predictions": args.save_predictions}, run_inputs(args))
    files = [f for c in cases for f in prediction_files(args.save_predictions, c).values()]
    if info.is_main:
        for sub in ("", PRED_LABEL_DIR, PRED_IMAGE_DIR):
            prepare_output_dir(os.path.join(args.save_predictions, sub), "--save_predictions")
        claim_outputs(files, args.overwrite, "--save_predictions")
    if info.distributed:
        torch.distributed.barrier()


def final_outputs(
    model: nn.Module,
    dat: FinetuneData,
    args: argparse.Namespace,
    info: engine.DistInfo,
    amp: engine.Amp,
    paths: dict[str, str],
    val_result: EvalResult | None = None,
) -> dict[str, Any]:
    """Challenge-grade scores, figure and summary of ``model`` on the validation (and train) cases.

    ``val_result``: a full evaluation of this very model done during training (the last
    epoch's, when it was the best; it also wrote ``--save_predictions``), used instead of
    predicting the validation cases again.
    """
    res = val_result
    if res is None or res.per_case is None:
        res = evaluate_cases(
            model, dat.val_cases, dat, args, info, amp, full=True, desc="val", save_dir=args.save_predictions
        )
    names = dat.labels.names
    scoring = dat.rules.record()
    out: dict[str, Any] = {"dice_paper": res.dice_paper, "n_val_items": res.n_items, "scoring": scoring}
    summary = metrics.summarize_case_scores(res.per_case, names)
    out["summary"] = {k: v for k, v in summary.items() if k != "per_case"}
    out["summary"]["dice_paper"] = res.dice_paper
    if info.is_main:
        files = metrics.write_scores(res.per_case, paths["dir"], prefix="val", label_names=names, scoring=scoring)
        out["scores"], out["scores_csv"] = files["json"], files["csv"]
        if res.vis:
            img, lab, prd, titles = zip(*res.vis)
            out["figure"] = metrics.plot_predictions(
                img,
                lab,
                prd,
                os.path.join(paths["dir"], "predictions.png"),
                titles=titles,
                n_classes=args.n_classes,
                label_names=names,
            )
        # the scores are the command's result: stdout (progress and messages go to the log on stderr)
        print(
            f"dice_paper (the paper's score: per-slice Dice incl. background, mean over {res.n_items} slices/volumes): "
            f"{res.dice_paper:.4f}"
        )
        print(metrics.format_summary(summary))
    else:
        out["scores"] = os.path.join(paths["dir"], "val_scores.json")
    if args.eval_train and dat.train_cases:
        tr = evaluate_cases(model, dat.train_cases, dat, args, info, amp, full=True, desc="train")
        out["train_dice_paper"] = tr.dice_paper
        train_summary = metrics.summarize_case_scores(tr.per_case, names)
        out["train_summary"] = {k: v for k, v in train_summary.items() if k != "per_case"}
        if info.is_main:
            out["train_scores"] = metrics.write_scores(
                tr.per_case, paths["dir"], prefix="train", label_names=names, scoring=scoring
            )["json"]
    if args.save_predictions:
        out["predictions_dir"] = os.path.abspath(args.save_predictions)
    return out


class EarlyStopping:
    """The best validation ``dice_paper`` so far, its epoch, and the evaluations since:
    the run stops after ``patience`` evaluations without a better score."""

    def __init__(self, patience: int):
        self.patience = patience
        self.dice_paper = -math.inf
        self.epoch = 0
        self.bad_evals = 0

    @property
    def stopped(self) -> bool:
        return self.bad_evals >= self.patience

    def update(self, epoch: int, dice_paper: float) -> bool:
        """Record an evaluation after ``epoch``; return whether it is the best so far."""
        if dice_paper > self.dice_paper:
            self.dice_paper, self.epoch, self.bad_evals = dice_paper, epoch, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "dice_paper": self.dice_paper,
            "epoch": self.epoch,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,  # derived from bad_evals; kept for readers of older versions
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dice_paper, self.epoch = float(state["dice_paper"]), int(state["epoch"])
        self.bad_evals = int(state["bad_evals"])  # "stopped" follows from it (--patience is a resume key)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


class Segmentation:
    """What fine-tuning trains, like a pretraining method: the segmenter (DDP-wrapped and
    compiled for the training forward as asked), DiceCE loss, AdamW with the per-iteration
    cosine schedule (weight decay except on biases and norms), AMP, and ``--batch_augment``'s
    device augmentations (seeded per (seed, epoch, rank) by :meth:`start_epoch`)."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, info: engine.DistInfo, iters_per_epoch: int):
        self.args = args
        self.info = info
        self.model = model
        self.optimizer = engine.make_optimizer(
            torch.optim.AdamW, engine.param_groups(model), args.fused_optimizer, lr=args.base_lr
        )
        self.amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)
        self.lr_schedule = engine.cosine_schedule(
            args.base_lr, args.end_lr, args.n_epochs, iters_per_epoch, args.warmup_epochs
        )
        self.wd_schedule = np.full(args.n_epochs * iters_per_epoch, args.wd)
        self.criterion = DiceCELoss(to_onehot_y=True, softmax=True)
        # --compile: the training forward only (evaluation stays eager)
        self.train_module = engine.maybe_compile(engine.wrap_ddp(model, info), args)
        self.aug: BatchFinetuneAugment | None = None

    def start_epoch(self, epoch: int) -> None:
        """Seed the model's randomness (drop path) and the device augmentations from (seed, epoch, rank)."""
        engine.fix_random_seeds(engine.derived_seed(self.args.seed, epoch, self.info.rank))
        if self.args.batch_augment:
            gen = torch.Generator(device=self.info.device)
            gen.manual_seed(engine.derived_seed(self.args.seed, epoch, self.info.rank, 2))
            self.aug = BatchFinetuneAugment(self.args.spatial_dims, gen)

    def loss_fn(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"].to(self.info.device, non_blocking=True)
        y = batch["label"].to(self.info.device, non_blocking=True)
        if self.aug is not None:
            with torch.no_grad(), torch.autocast(device_type=self.info.device.type, enabled=False):
                x, y = self.aug(x, y)
        return self.criterion(self.train_module(x), y), {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "amp": self.amp.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.amp.load_state_dict(state.get("amp", {}))


def run_finetuning(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or with ``--eval_only`` evaluate) and return the run's result dict.

    Returns:
        ``{"run_name", "weights", "log", "epochs_done", "best_dice_paper", "best_epoch",
        "scores", "summary": {"dice_mean", "nsd_mean", "dice_paper", ...}, ...}``, also
        written to ``<run>_files/result.json``.

    Raises:
        UserError: bad input (exit code 2 from the command line).
        TrainingError: a non-finite loss.
    """
    args = argparse.Namespace(**vars(args))  # never change the caller's namespace
    check_args(args)
    for key in ("data_dir", "split_path", "chkpt_path", "chkpt_dir", "save_predictions", "cache_dir"):
        if getattr(args, key, None):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.chkpt_dir, "cache")
    if args.run_name is None:
        args.run_name = default_run_name(args)
    # the label set, the scoring and the split, fixed before the run's arguments are recorded
    labels = data_labels(args)
    args.n_classes = run_n_classes(args, labels)
    rules = run_scoring_rules(args, labels)
    args.split_path = resolve_split_path(args)
    with warnings.catch_warnings():
        if args.ignore_user_warning:
            warnings.simplefilter("ignore", UserWarning)
        with engine.distributed(args.device) as info:
            if args.eval_only:
                return _evaluate_only(args, info, labels, rules)
            return _train(args, info, labels, rules)


def _evaluate_only(
    args: argparse.Namespace, info: engine.DistInfo, labels: data.LabelSet, rules: metrics.ScoringRules
) -> dict[str, Any]:
    """``--eval_only``: the fine-tuned model of ``--chkpt_path`` on the validation cases."""
    run = engine.RunFiles(args.chkpt_dir, args.run_name, METHOD, info)  # for its paths and result only: not opened
    paths = run.paths
    logger.info("evaluating %s; outputs in %s", args.chkpt_path, paths["dir"])
    model, cfg, ckpt = load_finetuned(args.chkpt_path)
    if cfg["spatial_dims"] != args.spatial_dims:
        raise UserError(
            f"--chkpt_path {args.chkpt_path!r} is a {cfg['spatial_dims']}D model but --spatial_dims is {args.spatial_dims}"
        )
    if int(ckpt["n_classes"]) != args.n_classes:
        raise UserError(
            f"--chkpt_path {args.chkpt_path!r} predicts {ckpt['n_classes']} classes but --n_classes is "
            f"{args.n_classes} (the label set of --data_dir: {labels.describe()})"
        )
    trained_on = checkpoint_labels(ckpt, args.chkpt_path)
    if trained_on != labels:
        raise UserError(
            f"--chkpt_path {args.chkpt_path!r} was trained on the classes {trained_on.describe()}; "
            f"--data_dir holds {labels.describe()}"
        )
    saved_crop = int(ckpt.get("args", {}).get("crop_size", args.crop_size))
    if saved_crop != args.crop_size:
        logger.info(
            "using the model's training crop size %d for the sliding window (not --crop_size %d)",
            saved_crop,
            args.crop_size,
        )
        args.crop_size = saved_crop
    check_outputs_apart({"the run's folder": paths["dir"]}, run_inputs(args))
    if info.is_main:
        prepare_output_dir(paths["dir"], "--chkpt_dir")
    model.to(info.device)
    amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)
    dat = FinetuneData(args, info, need_train=False, labels=labels, rules=rules)
    check_predictions_dir(args, [c.case for c in dat.val_cases], info)
    out = final_outputs(model, dat, args, info, amp, paths)
    result = {
        "run_name": args.run_name,
        "weights": args.chkpt_path,
        "log": None,
        "epochs_done": 0,
        "best_dice_paper": out["dice_paper"],
        "best_epoch": int(ckpt.get("epoch", 0)),
        **out,
    }
    run.write_result(result)
    return result


def input_fingerprints(args: argparse.Namespace, dat: "FinetuneData") -> dict[str, str | None]:
    """What defines a fine-tuning run, pinned for ``--resume`` (:meth:`engine.RunFiles.pin_inputs`):
    the data folder's listing of the slices / volumes used and its ``manifest.json``, the split's
    case lists, and the checkpoint the run started from (SHA-256; when it is gone on a resume
    it is not checked: the state holds the model)."""
    paths = [it[k] for it in list(dat.train_items) + list(dat.val_items) for k in ("image", "label")]
    out: dict[str, str | None] = {
        **data.data_fingerprints(args.data_dir, paths),
        "split --split_path": data.split_fingerprint(dat.split),
    }
    if args.chkpt_path:
        key = "checkpoint --chkpt_path the run started from"
        out[key] = "sha256 " + file_sha256(args.chkpt_path)[:16] if os.path.isfile(args.chkpt_path) else None
    return out


def _build_model(
    args: argparse.Namespace, cfg: dict[str, Any], state: dict[str, Any] | None, info: engine.DistInfo
) -> tuple[nn.Module, int | None]:
    """The segmenter, with the pretrained encoder of ``--chkpt_path`` in a new run (the count
    of loaded tensors is returned; a resumed run restores everything from its state)."""
    engine.fix_random_seeds(args.seed)
    model = models.build_segmenter(cfg, args.n_classes)
    n_loaded = None
    if args.chkpt_path and state is None:
        n_loaded = models.load_pretrained_encoder(model, args.chkpt_path, cfg, args.checkpoint_key)
        logger.info(
            "loaded %d encoder tensors from %s (--checkpoint_key %s)", n_loaded, args.chkpt_path, args.checkpoint_key
        )
    elif state is not None and args.chkpt_path:
        n_loaded = state.get("pretrained_tensors")
    return model.to(info.device), n_loaded


def _train(
    args: argparse.Namespace, info: engine.DistInfo, labels: data.LabelSet, rules: metrics.ScoringRules
) -> dict[str, Any]:
    """The run in its steps: files and resume, model, data, then epochs of training with
    evaluations and early stopping, then the best model's final scores."""
    run = engine.RunFiles(args.chkpt_dir, args.run_name, METHOD, info)
    paths = run.paths
    logger.info("run %r: files in %s", args.run_name, paths["chkpt_dir"])
    args_d = engine.args_dict(args)
    inputs = run_inputs(args)
    check_outputs_apart({"--cache_dir": args.cache_dir if args.spatial_dims == 3 else None}, inputs)
    state = run.open(args.resume, args_d, RESUME_KEYS, inputs=inputs)
    cfg = models.encoder_config_from_args(args)
    model, n_loaded = _build_model(args, cfg, state, info)
    dat = FinetuneData(args, info, need_train=True, labels=labels, rules=rules)
    run.pin_inputs(state, input_fingerprints(args, dat))
    check_predictions_dir(args, [c.case for c in dat.val_cases], info)
    n_batches, iters_per_epoch = epoch_steps(
        len(dat.train_ds), args.batch_size, info.world_size, args.accum_iters, args.drop_last
    )
    if iters_per_epoch == 0:
        per_step = args.batch_size * info.world_size * args.accum_iters
        raise UserError(
            f"{len(dat.train_ds)} training slices are fewer than one optimizer step needs with --drop_last "
            f"({per_step} = batch_size x processes x accum_iters)"
        )
    n_workers = engine.resolve_num_workers(args.num_workers, state, dat.train_ds, args.batch_size)
    logger.info(
        "%d training slices/volumes (x %d crops), %d validation cases, %d steps per epoch",
        len(dat.train_ds),
        args.n_crops_per_ct,
        len(dat.val_cases),
        iters_per_epoch,
    )

    seg = Segmentation(args, model, info, iters_per_epoch)
    best = EarlyStopping(args.patience)
    best_result: EvalResult | None = None  # the best evaluation, when it was a full one
    start_epoch, wandb_id = 0, None
    if state is not None:
        seg.load_state_dict(state)
        engine.set_rng_state(state["rng"])
        best.load_state_dict(state["best"])
        start_epoch, wandb_id = int(state["epoch"]), state.get("wandb_id")
        run.restore_log(state)
        logger.info(
            "resumed %s after epoch %d (best dice_paper %.4f at epoch %d)",
            run.resume_path,
            start_epoch,
            best.dice_paper,
            best.epoch,
        )
    engine.write_args(paths, {**args_d, "inputs": run.inputs}, info)

    elog = engine.EpochLogger(paths, info, args.use_wandb, args.wandb_project, args_d, wandb_id)
    try:
        epoch = start_epoch
        while epoch < args.n_epochs and not best.stopped:
            t0 = time.time()
            stats = _train_epoch(args, seg, dat, n_workers, epoch, info, iters_per_epoch, n_batches)
            epoch += 1
            record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "lr": stats["lr"]}
            if should_evaluate(epoch, args):
                res = _evaluate_epoch(args, seg, dat, best, epoch, info, cfg, paths, record)
                if res is not None:
                    best_result = res
            record["time_s"] = round(time.time() - t0, 3)
            run.end_epoch(
                {
                    "epoch": epoch,
                    **seg.state_dict(),
                    "rng": engine.rng_state(),
                    "best": best.state_dict(),
                    "wandb_id": elog.wandb_id,
                    "args": args_d,
                    "pretrained_tensors": n_loaded,
                    "num_workers": n_workers,
                },
                record,
                elog,
            )
            if best.stopped:
                logger.info("early stopping after epoch %d: %d evaluations without improvement", epoch, best.bad_evals)
        out = _final_scores(args, seg, dat, best, best_result, info, paths)
        result = {
            "run_name": args.run_name,
            "weights": paths["weights"],
            "log": paths["log"],
            "epochs_done": epoch,
            "best_dice_paper": best.dice_paper,
            "best_epoch": best.epoch,
            "stopped_early": bool(best.stopped),
            "train_cases": list(dat.split["train"]),
            "split": args.split_path,
            "pretrained": args.chkpt_path,
            "pretrained_tensors": n_loaded,
            **out,
        }
        run.write_result(result)
        return result
    finally:
        elog.finish()


def _train_epoch(
    args: argparse.Namespace,
    seg: Segmentation,
    dat: FinetuneData,
    n_workers: int,
    epoch: int,
    info: engine.DistInfo,
    iters_per_epoch: int,
    n_batches: int,
) -> dict[str, float]:
    """One epoch of training on a fresh loader seeded from (seed, epoch, rank)."""
    seg.start_epoch(epoch)
    loader = engine.build_loader(
        dat.train_ds,
        args.batch_size,
        n_workers,
        args.seed,
        epoch,
        info,
        drop_last=args.drop_last,
        pin_memory=info.device.type == "cuda",
    )
    try:
        return engine.train_one_epoch(
            seg.train_module,
            loader,
            seg.optimizer,
            seg.loss_fn,
            epoch=epoch,
            n_epochs=args.n_epochs,
            iters_per_epoch=iters_per_epoch,
            lr_schedule=seg.lr_schedule,
            base_lr=args.base_lr,
            wd_schedule=seg.wd_schedule,
            amp=seg.amp,
            accum_iters=args.accum_iters,
            info=info,
            progress=args.progress,
            check_every=args.check_every,
            n_batches=n_batches,
        )
    finally:
        del loader


def epoch_steps(n_items: int, batch_size: int, world_size: int, accum_iters: int, drop_last: bool) -> tuple[int, int]:
    """``(batches per process, optimizer steps)`` of a fine-tuning epoch over ``n_items`` slices.

    As the original (``drop_last`` False): every slice is used, the last batch may be smaller
    (``DistributedSampler`` gives every process ``ceil(n_items / world_size)`` items), and a
    last step may hold fewer than ``accum_iters`` batches: ``ceil(n_items / (batch_size x
    processes))`` batches, ``ceil(batches / accum_iters)`` steps. ``drop_last``: only full
    batches and full steps (``n_items // (batch_size x processes x accum_iters)`` steps).

    Example: 1,515 slices, batch 32, one process: 48 steps (the last of 11 slices); 47 with ``drop_last``.
    """
    if drop_last:
        steps = n_items // world_size // batch_size // accum_iters
        return steps * accum_iters, steps
    batches = math.ceil(math.ceil(n_items / world_size) / batch_size)
    return batches, math.ceil(batches / accum_iters)


def _evaluate_epoch(
    args: argparse.Namespace,
    seg: Segmentation,
    dat: FinetuneData,
    best: EarlyStopping,
    epoch: int,
    info: engine.DistInfo,
    cfg: dict[str, Any],
    paths: dict[str, str],
    record: dict[str, Any],
) -> EvalResult | None:
    """Evaluate after ``epoch``, save the model when it is the best so far, and add the
    scores to ``record``. The last epoch gets the full scores at once (if it is the best,
    they are the final ones): returns that result when it is the new best, else None."""
    full = epoch == args.n_epochs
    res = evaluate_cases(
        seg.model,
        dat.val_cases,
        dat,
        args,
        info,
        seg.amp,
        full=full,
        desc="val",
        save_dir=args.save_predictions if full else None,
    )
    record["val_dice_paper"] = res.dice_paper
    if args.eval_train and dat.train_cases:
        record["train_dice_paper"] = evaluate_cases(
            seg.model, dat.train_cases, dat, args, info, seg.amp, full=False, desc="train"
        ).dice_paper
    improved = best.update(epoch, res.dice_paper)
    if improved and info.is_main:
        atomic_torch_save(
            finetuned_checkpoint(
                seg.model,
                cfg,
                args.n_classes,
                engine.args_dict(args),
                epoch,
                res.dice_paper,
                dat.preprocessing,
                dat.labels,
            ),
            paths["weights"],
        )
    record.update(best_dice_paper=best.dice_paper, best_epoch=best.epoch)
    logger.info(
        "epoch %d: val dice_paper %.4f (best %.4f at epoch %d)", epoch, res.dice_paper, best.dice_paper, best.epoch
    )
    return res if improved and full else None


def _final_scores(
    args: argparse.Namespace,
    seg: Segmentation,
    dat: FinetuneData,
    best: EarlyStopping,
    best_result: EvalResult | None,
    info: engine.DistInfo,
    paths: dict[str, str],
) -> dict[str, Any]:
    """The best model reloaded from ``<run>.pt`` and scored (:func:`final_outputs`)."""
    if info.distributed:
        torch.distributed.barrier()
    if not os.path.isfile(paths["weights"]):
        raise TrainingError(f"the best model {paths['weights']!r} is missing; the run cannot be evaluated")
    seg.model.load_state_dict(torch_load(paths["weights"])["model"])
    out = final_outputs(seg.model, dat, args, info, seg.amp, paths, val_result=best_result)
    if abs(out["dice_paper"] - best.dice_paper) > 1e-6:
        logger.warning(
            "the final dice_paper %.6f differs from the best one during training %.6f",
            out["dice_paper"],
            best.dice_paper,
        )
    return out

"""Segment new CT with a fine-tuned model: one label map per scan, in the scan's own geometry.

Each input NIfTI goes through the preprocessing its model was trained with (orient RAS,
resample to the training voxel size, HU window, crop to the body, pad; the settings come
from the checkpoint's record, never from flags), the model (2D: axial slices in batches;
3D: sliding window), and then the exact inverse of that preprocessing (MONAI's
``Invertd``: un-pad, un-crop, resample back with nearest neighbour, re-orient). The output
has the input's shape, affine, qform and sform, so it overlays the scan in any viewer::

    # one scan, or a folder of them (FLARE's "_0000" channel suffix is dropped from the names)
    python predict.py -i FLARE22_Tr_0001_0000.nii.gz -o preds/ --chkpt_path runs/finetune_simsiam_swin2d_seed0.pt
    python predict.py -i FLARE22Train/images/ -o preds/ --chkpt_path runs/<run>.pt --device cuda --use_amp

    # challenge-grade scores in each label's own geometry (FLARE 2022 DSC and NSD)
    python metrics.py --pred_dir preds/ --label_dir FLARE22Train/labels/ --out_dir preds/scores

    # also the per-class probabilities (float16), and a loader with 4 processes
    python predict.py -i scans/ -o preds/ --chkpt_path runs/<run>.pt --save_probabilities --num_workers 4

Output (``-o OUT``): ``OUT/<case>.nii.gz``, uint8 label ids of the model (those of the label
set it was trained on, recorded in the checkpoint; FLARE 2022: 0 background, 1 liver, ..., 13
left kidney), the input's header (geometry, qform / sform
codes) with the data type set to uint8; with ``--save_probabilities``
``OUT/<case>_probabilities.npz`` holding ``probabilities`` (float16, (C, X, Y, Z) in the
input's voxel order, resampled back with the preprocessing's bilinear interpolation),
``label_ids``, ``label_names`` and ``affine``. Files are written atomically; cases whose
output exists are skipped (``--overwrite`` redoes them), so a killed run resumes.

A case that cannot be read (corrupt, not 3D, NaN voxels, nothing above the HU window) is
named on one line and skipped; the others are written and the command ends with exit
code 1 and the list. Exit code 2 when nothing can run: bad flags, a missing input, a
checkpoint that is not a fine-tuned model of this project.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data
import engine
import finetune
import models
from transforms import invert_preprocessing, load_nifti_image, preprocessing_from_record
from utils import (
    TrainingError,
    UserError,
    atomic_write,
    check_outputs_apart,
    claim_outputs,
    prepare_output_dir,
    root_cause,
    run_cli,
    torch_load,
    user_error_in,
)

logger = logging.getLogger(__name__)

#: Suffix of the optional probability file of a case.
PROBABILITIES_SUFFIX = "_probabilities.npz"
#: Largest allowed difference (mm) between the input's affine and that of the inverted prediction.
_AFFINE_ATOL_MM = 1e-3


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseInput:
    """One scan to segment: its case id (file name without extension and ``_0000``), path and output path."""

    case: str
    path: str
    output: str

    @property
    def probabilities(self) -> str:
        return self.output[: -len(".nii.gz")] + PROBABILITIES_SUFFIX


def list_inputs(inp: str, out_dir: str) -> list[CaseInput]:
    """The scans named by ``-i``: one ``.nii.gz`` / ``.nii`` file, or every such file in a folder
    (not recursive, hidden files skipped), sorted by name.

    Raises:
        UserError: the input does not exist, is not a NIfTI file, holds no NIfTI file, two
            files give the same case id, or an output would overwrite an input.
    """
    inp = os.path.abspath(os.path.expanduser(inp))
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.isdir(inp):
        paths = data._list_files(inp, data._NIFTI_EXTS)
        if not paths:
            raise UserError(f"-i {inp} holds no .nii.gz or .nii file")
    elif os.path.isfile(inp):
        if not data.is_nifti(inp):
            raise UserError(f"-i {inp} is not a NIfTI file (.nii.gz or .nii)")
        paths = [inp]
    else:
        raise UserError(f"-i {inp} does not exist")
    cases: dict[str, str] = {}
    for p in paths:
        c = data.case_id_from_path(p)
        if c in cases:
            raise UserError(f"{cases[c]} and {p} both give case {c!r}: the output {c}.nii.gz would be written twice")
        cases[c] = p
    items = [CaseInput(c, p, os.path.join(out_dir, c + ".nii.gz")) for c, p in cases.items()]
    real_inputs = {os.path.realpath(p) for p in paths}
    for it in items:
        for out in (it.output, it.probabilities):
            if os.path.realpath(out) in real_inputs:
                raise UserError(f"the output {out} would overwrite the input of the same name; choose another -o")
    return items


def _first_line(e: BaseException) -> str:
    e = root_cause(e)  # MONAI wraps the reader's and the transforms' errors
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def load_scan(path: str) -> tuple[MetaTensor, Any]:
    """Read a scan: (channel-first MetaTensor (1, X, Y, Z) float32 in the file's voxel order,
    nibabel image of the file, for its header).

    Raises:
        UserError: unreadable or corrupt, not 3D, empty, or NaN / infinite voxels (names the file).
    """
    try:
        ref = nib.load(path)
    except Exception as e:  # nibabel raises many types for broken files
        raise UserError(f"cannot read {path}: {_first_line(e)}") from None
    if len(ref.shape) != 3:
        raise UserError(f"{path} is not a 3D volume (shape {tuple(ref.shape)})")
    if min(ref.shape) < 1:
        raise UserError(f"{path} is empty (shape {tuple(ref.shape)})")
    try:  # read in full, the gzip checksum checked: a flipped bit is refused, not segmented
        image = load_nifti_image(image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as e:
        found = user_error_in(e)
        if found is not None:
            raise found from None
        raise UserError(f"corrupt or truncated {path}: {_first_line(e)}") from None
    if not bool(torch.isfinite(image).all()):
        raise UserError(f"{path} has {int((~torch.isfinite(image)).sum())} NaN or infinite voxels")
    return image, ref


def preprocess_scan(path: str, pipeline: Compose, a_min: float) -> tuple[MetaTensor, Any]:
    """:func:`load_scan` + the model's preprocessing: (preprocessed (1, X', Y', Z') MetaTensor
    with its applied operations, nibabel image of the file).

    Raises:
        UserError: as :func:`load_scan`, or no voxel above ``a_min`` HU (nothing to segment).
    """
    image, ref = load_scan(path)
    if not bool((image > a_min).any()):
        raise UserError(f"{path} has no voxel above {a_min:g} HU (the model's HU window): nothing to segment")
    try:
        pre = pipeline({"image": image})["image"]
    except Exception as e:
        raise UserError(f"cannot preprocess {path}: {_first_line(e)}") from None
    return pre, ref


class _Scans(Dataset):
    """Loading and preprocessing of the cases, for a DataLoader (``--num_workers``); a case
    that fails yields ``{"error": message}`` instead of stopping the others."""

    def __init__(self, items: Sequence[CaseInput], record: dict[str, Any]):
        self.items = list(items)
        self.record = record
        self.pipeline = preprocessing_from_record(record)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        t0 = time.perf_counter()
        try:
            pre, ref = preprocess_scan(it.path, self.pipeline, self.record["a_min"])
        except UserError as e:
            return {"index": i, "error": str(e)}
        except Exception as e:  # an unexpected error in one case must not stop the others
            return {"index": i, "error": f"{it.path}: unexpected {_first_line(e)}"}
        return {
            "index": i,
            "image": pre,
            "header": ref.header,
            "affine": np.asarray(ref.affine, dtype=np.float64),
            "nifti_class": type(ref),
            "load_s": time.perf_counter() - t0,
        }


def _one(batch: Any) -> Any:
    """collate_fn of the loader: items pass unchanged (one case at a time)."""
    return batch


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A fine-tuned model ready to segment scans (:meth:`from_checkpoint`).

    Attributes:
        model: the segmenter, in eval mode on ``device``.
        path: the checkpoint file.
        n_classes, spatial_dims, crop_size: from the checkpoint.
        preprocessing: the record of the training preprocessing (:func:`transforms.preprocessing_record`).
        label_names: one name per label id.
    """

    model: nn.Module
    path: str
    n_classes: int
    spatial_dims: int
    crop_size: int
    preprocessing: dict[str, Any]
    label_names: list[str]
    device: torch.device
    amp: engine.Amp
    sw_batch_size: int
    sw_overlap: float

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        device: torch.device,
        use_amp: bool = False,
        amp_dtype: str = "fp16",
        sw_batch_size: int | None = None,
        sw_overlap: float = 0.25,
    ) -> "Predictor":
        """Load a fine-tuned ``<run>.pt`` (``main_finetune.py``).

        ``sw_batch_size`` None: 512 windows per pass in 2D, 64 in 3D (as fine-tuning).

        Raises:
            UserError: missing or unreadable file, a pretrained encoder or any other kind of
                checkpoint, weights that do not fit, no preprocessing record (see
                :func:`finetune.checkpoint_preprocessing`).
        """
        path = os.path.abspath(os.path.expanduser(path))
        ckpt = torch_load(path)
        if isinstance(ckpt, dict) and ckpt.get("format") == models.ENCODER_FORMAT:
            raise UserError(
                f"--chkpt_path {path} is a pretrained {ckpt.get('method')} encoder, not a segmentation model; "
                "fine-tune it with main_finetune.py and pass the fine-tuned <run>.pt"
            )
        model, cfg, ckpt = finetune.load_finetuned(path, ckpt)
        record = finetune.checkpoint_preprocessing(ckpt, path)
        if record["spatial_dims"] != cfg["spatial_dims"]:
            raise UserError(
                f"{path}: a {cfg['spatial_dims']}D model with a {record['spatial_dims']}D preprocessing record"
            )
        crop = (ckpt.get("args") or {}).get("crop_size")
        if not isinstance(crop, int) or crop < 1:
            raise UserError(f"{path} records no training crop size (args.crop_size), which sets the sliding window")
        n_classes = int(ckpt["n_classes"])
        names = list(finetune.checkpoint_labels(ckpt, path).names)  # the label set it was trained on
        if sw_batch_size is None:
            sw_batch_size = finetune.default_sw_batch_size(cfg["spatial_dims"])
        model.to(device).eval()
        return cls(
            model=model,
            path=path,
            n_classes=n_classes,
            spatial_dims=int(cfg["spatial_dims"]),
            crop_size=int(crop),
            preprocessing=record,
            label_names=names,
            device=device,
            amp=engine.Amp(device, use_amp, amp_dtype),
            sw_batch_size=int(sw_batch_size),
            sw_overlap=float(sw_overlap),
        )

    @functools.cached_property
    def pipeline(self) -> Compose:
        """The training preprocessing chain (``load=False``, key ``"image"``), built once."""
        return preprocessing_from_record(self.preprocessing)

    def model_input(self, pre: torch.Tensor) -> np.ndarray:
        """The preprocessed image (1, X', Y', Z') as the model saw its training data: in 2D
        the values the slice PNGs stored (``v * 255`` truncated or rounded as the record says,
        for 8 bits; converted to [0, 1] on the device), in 3D float32."""
        arr = (pre.as_tensor() if isinstance(pre, MetaTensor) else torch.as_tensor(pre)).numpy()[0]
        bits = self.preprocessing["png_bits"]
        if not bits:
            return np.ascontiguousarray(arr, dtype=np.float32)
        return data.float_to_stored(arr, bits, self.preprocessing["png_quantization"])

    @torch.no_grad()
    def segment(self, pre: torch.Tensor, probabilities: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        """Label ids (X', Y', Z') uint8 on the preprocessed grid (and the float16 softmax
        (C, X', Y', Z') with ``probabilities``)."""
        out = finetune.predict_volume(
            self.model,
            self.model_input(pre),
            self.spatial_dims,
            self.crop_size,
            self.sw_batch_size,
            self.sw_overlap,
            self.device,
            self.amp.autocast,
            probabilities=probabilities,
        )
        return out if probabilities else (out, None)  # type: ignore[return-value]

    def invert(self, ids: np.ndarray, pre: MetaTensor, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """Label ids from the preprocessed grid back to the scan's: (X, Y, Z) uint8 of ``shape``.

        Raises:
            RuntimeError: the inverse did not land on the scan's grid (a bug, never expected).
        """
        inv = invert_preprocessing(torch.from_numpy(ids[None].astype(np.float32)), pre, self.pipeline, nearest=True)
        _check_grid(inv, shape, affine)
        return inv.as_tensor()[0].round().to(torch.uint8).numpy()

    def invert_probabilities(
        self, probs: torch.Tensor, pre: MetaTensor, shape: Sequence[int], affine: np.ndarray
    ) -> np.ndarray:
        """Per-class maps (C, X', Y', Z') back to the scan's grid with the chain's bilinear
        interpolation: (C, X, Y, Z) float16, one class at a time to bound the memory.

        The inverse fills what the crop removed with zeros; the background map goes through
        it as ``p0 - 1`` (and gets its 1 back after), so outside the crop it is 1 and, the
        resampling being linear, the maps still sum to 1 everywhere (to float16 rounding)."""
        out = np.empty((probs.shape[0], *shape), dtype=np.float16)
        for c in range(probs.shape[0]):
            m = probs[c : c + 1].float()
            inv = invert_preprocessing(m - 1.0 if c == 0 else m, pre, self.pipeline, nearest=False)
            _check_grid(inv, shape, affine)
            v = inv.as_tensor()[0]
            out[c] = (v + 1.0 if c == 0 else v).clamp_(0, 1).numpy()
        return out


def _check_grid(inv: MetaTensor, shape: Sequence[int], affine: np.ndarray) -> None:
    if tuple(inv.shape[1:]) != tuple(shape):
        raise RuntimeError(f"the inverse preprocessing gave shape {tuple(inv.shape[1:])}, the scan has {tuple(shape)}")
    diff = float(np.abs(np.asarray(inv.affine, dtype=np.float64) - np.asarray(affine, dtype=np.float64)).max())
    if diff > _AFFINE_ATOL_MM:
        raise RuntimeError(f"the inverse preprocessing gave an affine {diff:.3g} mm away from the scan's")


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def label_image(ids: np.ndarray, header: Any, nifti_class: type = nib.Nifti1Image) -> Any:
    """A NIfTI image of ``ids`` with the scan's ``header`` (dimensions, voxel size, qform and
    sform with their codes, units): data type uint8, no intensity scaling, display range
    0..max id."""
    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"], hdr["cal_max"] = 0, float(ids.max()) if ids.size else 0.0
    hdr["descrip"] = b"label ids by predict.py"
    return nifti_class(np.asarray(ids, dtype=np.uint8), None, header=hdr)


def write_label(path: str, ids: np.ndarray, header: Any, nifti_class: type = nib.Nifti1Image) -> None:
    """Write :func:`label_image` to ``path`` (``.nii.gz``) atomically."""
    img = label_image(ids, header, nifti_class)
    with atomic_write(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))


def write_probabilities(path: str, probs: np.ndarray, affine: np.ndarray, label_names: Sequence[str]) -> None:
    """Write the per-class maps as a compressed ``.npz`` atomically (see the module docstring)."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        probabilities=probs,
        label_ids=np.arange(probs.shape[0]),
        label_names=np.asarray(list(label_names)),
        affine=np.asarray(affine, dtype=np.float64),
    )
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def _is_done(it: CaseInput, probabilities: bool) -> bool:
    return os.path.isfile(it.output) and (not probabilities or os.path.isfile(it.probabilities))


# ---------------------------------------------------------------------------------------
# Many cases
# ---------------------------------------------------------------------------------------


def _loaded(items: Sequence[CaseInput], record: dict[str, Any], num_workers: int) -> Iterator[dict[str, Any]]:
    ds = _Scans(items, record)
    if num_workers == 0:
        yield from (ds[i] for i in range(len(ds)))
        return
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_one, shuffle=False)
    yield from loader


def predict_cases(
    predictor: Predictor,
    items: Sequence[CaseInput],
    overwrite: bool = False,
    save_probabilities: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment ``items`` and write their outputs; a failing case is logged and skipped.

    Returns:
        ``{"n_cases", "n_written", "n_skipped", "n_failed", "failed": {case: message},
        "written": [paths], "seconds", "seconds_per_case", "timing": {stage: seconds}}``.
    """
    t_start = time.perf_counter()
    todo = [it for it in items if overwrite or not _is_done(it, save_probabilities)]
    n_skipped = len(items) - len(todo)
    if n_skipped:
        logger.info(
            "%d of %d cases already have their output (skipped; --overwrite redoes them)", n_skipped, len(items)
        )
    for d in {os.path.dirname(it.output) for it in todo}:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise UserError(f"output folder {d} cannot be created ({e.strerror})") from None
    failed: dict[str, str] = {}
    written: list[str] = []
    timing = {"load_and_preprocess": 0.0, "model": 0.0, "inverse": 0.0, "write": 0.0}
    with logging_redirect_tqdm():
        bar = tqdm(total=len(todo), desc="cases", unit="case", disable=not progress, dynamic_ncols=True)
        for item in _loaded(todo, predictor.preprocessing, num_workers):
            it = todo[item["index"]]
            bar.set_postfix_str(it.case, refresh=False)
            if "error" in item:
                failed[it.case] = item["error"]
                logger.error("%s skipped: %s", it.case, item["error"])
                bar.update(1)
                continue
            try:
                _predict_one(predictor, it, item, save_probabilities, timing)
                written.append(it.output)
            except Exception as e:  # one case must not stop the others; the message names it
                msg = f"{it.path}: {_first_line(e)}"
                failed[it.case] = msg
                logger.error("%s skipped: %s", it.case, msg)
            bar.update(1)
        bar.close()
    seconds = time.perf_counter() - t_start
    return {
        "n_cases": len(items),
        "n_written": len(written),
        "n_skipped": n_skipped,
        "n_failed": len(failed),
        "failed": dict(sorted(failed.items())),
        "written": written,
        "seconds": seconds,
        "seconds_per_case": seconds / len(written) if written else None,
        "timing": timing,
    }


def _predict_one(
    predictor: Predictor, it: CaseInput, item: dict[str, Any], save_probabilities: bool, timing: dict[str, float]
) -> None:
    pre, header = item["image"], item["header"]
    timing["load_and_preprocess"] += item["load_s"]
    shape = tuple(int(s) for s in header.get_data_shape())
    affine = item["affine"]
    t = time.perf_counter()
    ids, probs = predictor.segment(pre, probabilities=save_probabilities)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    t1 = time.perf_counter()
    timing["model"] += t1 - t
    native = predictor.invert(ids, pre, shape, affine)
    native_probs = predictor.invert_probabilities(probs, pre, shape, affine) if probs is not None else None
    t2 = time.perf_counter()
    timing["inverse"] += t2 - t1
    if native_probs is not None:  # the label file is written last: it marks the case as done
        write_probabilities(it.probabilities, native_probs, affine, predictor.label_names)
    write_label(it.output, native, header, item["nifti_class"])
    timing["write"] += time.perf_counter() - t2
    logger.debug("%s: %s -> %s", it.case, it.path, it.output)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "predict.py",
        description="Segment CT scans with a fine-tuned model; label maps in each scan's own geometry.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument(
        "-i",
        "--input",
        required=True,
        help="A CT scan (.nii.gz / .nii, in HU) or a folder of them. FLARE's '_0000' channel suffix is dropped "
        "from the output name. Required.",
    )
    g.add_argument(
        "-o",
        "--output_dir",
        required=True,
        help="Folder for <case>.nii.gz (uint8 label ids in the input's geometry); created if needed. Required.",
    )
    g.add_argument(
        "--chkpt_path",
        required=True,
        help="The fine-tuned model: <run>.pt written by main_finetune.py. Its record of the training "
        "preprocessing is applied to every scan. Required.",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="Predict cases whose output exists again (default: skip them, so a stopped run resumes).",
    )
    g.add_argument(
        "--save_probabilities",
        action="store_true",
        help="Also write <case>_probabilities.npz: the softmax per class as float16 (C, X, Y, Z) in the input's "
        "geometry. About 2 bytes x classes per voxel before compression; slower.",
    )
    g = p.add_argument_group("inference")
    g.add_argument(
        "--sw_batch_size",
        type=int,
        default=None,
        help="Windows per forward pass. Default: 512 in 2D (about ten 512 x 512 slices), 64 in 3D. Lower it "
        "when the device runs out of memory; the labels do not depend on it.",
    )
    g.add_argument(
        "--sw_overlap",
        type=float,
        default=0.25,
        help="Overlap of neighbouring sliding windows (0..1); 0.25 as in the paper's evaluation.",
    )
    g = p.add_argument_group("hardware")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="Where the model runs (auto: CUDA when available).",
    )
    g.add_argument(
        "--use_amp",
        action="store_true",
        help="Mixed precision on CUDA (faster; labels may differ from float32 at a few boundary voxels). "
        "No effect on the CPU.",
    )
    g.add_argument(
        "--amp_dtype",
        default="fp16",
        choices=("fp16", "bf16"),
        help="Autocast type with --use_amp.",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="Processes that read and preprocess the next scans while the model runs (0: in this process). "
        "Raise it on a GPU when reading and resampling a scan takes longer than predicting it; each "
        "process holds up to two preprocessed scans in memory.",
    )
    g.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="Show a progress bar over the cases."
    )
    return p


def resolve_device(name: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a device.

    Raises:
        UserError: cuda asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flag values with one line (UserError)."""
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise UserError(f"--sw_batch_size must be at least 1, got {args.sw_batch_size}")
    if not 0 <= args.sw_overlap < 1:
        raise UserError(f"--sw_overlap must be in [0, 1), got {args.sw_overlap}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"-o {args.output_dir} exists and is not a folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Segment the scans of ``--input``; returns :func:`predict_cases`'s summary.

    Raises:
        UserError: nothing can run (exit code 2).
        TrainingError: some cases failed; the others were written (exit code 1).
    """
    check_args(args)
    items = list_inputs(args.input, args.output_dir)
    device = resolve_device(args.device)
    predictor = Predictor.from_checkpoint(
        args.chkpt_path, device, args.use_amp, args.amp_dtype, args.sw_batch_size, args.sw_overlap
    )
    # the outputs, before any scan is read: apart from the inputs, writable, and no file there that this
    # project did not write (a raw data set's labels are never taken for finished cases)
    check_outputs_apart({"-o": args.output_dir}, {"-i": args.input, "--chkpt_path": args.chkpt_path})
    prepare_output_dir(args.output_dir, "-o")
    outputs = [it.output for it in items] + ([it.probabilities for it in items] if args.save_probabilities else [])
    claim_outputs(outputs, args.overwrite, "-o")
    rec = predictor.preprocessing
    logger.info(
        "%s: %dD model, %d classes, crop %d; preprocessing: %s, %s mm, HU [%g, %g], pad to %d%s (from %s)",
        predictor.path,
        predictor.spatial_dims,
        predictor.n_classes,
        predictor.crop_size,
        rec["orientation"],
        " x ".join(f"{p:g}" for p in rec["pixdim"]),
        rec["a_min"],
        rec["a_max"],
        rec["min_xy"],
        f", {rec['png_bits']}-bit slices ({rec['png_quantization']})" if rec["png_bits"] else "",
        rec["source"],
    )
    logger.info("%d scan(s) -> %s on %s", len(items), os.path.abspath(args.output_dir), device)
    summary = predict_cases(
        predictor,
        items,
        overwrite=args.overwrite,
        save_probabilities=args.save_probabilities,
        num_workers=args.num_workers,
        progress=args.progress,
    )
    for path in summary["written"]:
        print(path)
    per = summary["seconds_per_case"]
    logger.info(
        "%d written, %d skipped (already done), %d failed in %.1f s%s",
        summary["n_written"],
        summary["n_skipped"],
        summary["n_failed"],
        summary["seconds"],
        f" ({per:.2f} s per case)" if per else "",
    )
    if summary["failed"]:
        raise TrainingError(
            f"{summary['n_failed']} of {summary['n_cases']} cases failed: {', '.join(summary['failed'])} "
            "(reasons logged above); the others were written"
        )
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())

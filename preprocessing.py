"""The preprocessing engine shared by ``preprocess_flare_labelled.py`` and ``preprocess_flare_unlabelled.py``.

One case at a time: check the NIfTI files (readable, 3D, image and label on the same
grid, finite voxels, label ids within the data set's label set: 0..13 for FLARE), run
:func:`transforms.preprocessing_transforms`, write the z slices as PNG (or the volume as
NIfTI) atomically, and record the case in ``<output_dir>/.manifest/<case>.json``. Cases run in a process pool
(``--num_workers``), may be split over machines (``--shard_index`` / ``--num_shards``),
and a rerun skips every case whose per-case manifest exists.

Output folder contract::

    <output_dir>/.manifest/args.json        the preprocessing arguments; a rerun with other
                                            arguments into the same folder is refused
    <output_dir>/.manifest/<case>.json      written after the last file of a case: the case is finished
    <output_dir>/.manifest/<case>.inprogress  a case being written (left behind by a killed run;
                                            its files are removed and redone on the next run)
    <output_dir>/.manifest/.<case>.lock     held while a process works on the case (removed when
                                            it is finished); .manifest/.lock for the folder's own files
    <output_dir>/manifest.json              all finished cases + the arguments, assembled at the end

A killed run leaves no truncated file (every file is written to a temporary name and
renamed), and output is identical bit for bit whether a run was interrupted or not.
Several processes may write one folder at once (shards, or two commands started
together): each case is locked by the process working on it, the others take the
next free case and wait only for cases still in progress at their end. A full disk
stops the run with one line naming the file (exit code 1) and removes the case's
partial files. Compressed inputs are read in full with their gzip checksum checked
(:class:`transforms.VerifiedNibabelReader`): a corrupt file is one failing case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gzip
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from functools import partial
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data
from transforms import load_nifti_image, preprocessing_transforms
from utils import (
    TrainingError,
    UserError,
    atomic_write,
    check_outputs_apart,
    os_error_message,
    os_error_reason,
    remove_stale_temporaries,
    root_cause,
    user_error_in,
)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT_VERSION = 1
#: values of preprocessing arguments that folders written before the argument existed had implicitly
LEGACY_ARGS = {"png_quantization": "round"}
ARGS_NAME = "args.json"
_AFFINE_ATOL_MM = 1e-3  # image and label affines may differ by float noise, not by more
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give; output folders are often shared


class CaseError(Exception):
    """One case cannot be preprocessed (bad input); the message names the file."""


class OutputError(Exception):
    """The output cannot be written (a full disk, a read-only folder): the run must stop."""


#: errors of writing that stop the whole run instead of failing one case
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything that determines the output of a case (recorded in ``.manifest/args.json``).

    Attributes:
        kind: "labelled" (image + label, 2D slices into imgs/ and labels/) or "unlabelled".
        spatial_dims: 2 (PNG slices) or 3 (one float32 NIfTI per case; unlabelled only).
        a_min, a_max: HU window mapped to [0, 1].
        pixdim: output voxel size (x, y, z) in mm.
        min_xy: x and y padded to at least this size.
        png_bits: 8 or 16 bits per image PNG pixel.
        png_quantization: "truncate" (the original's ``(v * 255).astype(uint8)``) or "round".
        labels: the label names by id of a data set that declares them (nnU-Net, Decathlon);
            None: FLARE 2022's 13 organs. Label ids outside them make a case fail.
        layout: the layout read when it is not FLARE's (``"nnunet"``, ``"decathlon"``), else None.
        channel: the nnU-Net image channel read, None for one-channel layouts.

    The last three are recorded only when set, so FLARE output is the same as before they existed.
    """

    kind: str
    spatial_dims: int = 2
    a_min: float = -500.0
    a_max: float = 500.0
    pixdim: tuple[float, float, float] = (1.0, 1.0, 2.5)
    min_xy: int = 96
    png_bits: int = 8
    png_quantization: str = "truncate"
    labels: tuple[str, ...] | None = None
    layout: str | None = None
    channel: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("labelled", "unlabelled"):
            raise UserError(f"unknown preprocessing kind {self.kind!r}")
        if self.spatial_dims not in (2, 3):
            raise UserError(f"--spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.kind == "labelled" and self.spatial_dims != 2:
            raise UserError("labelled preprocessing writes 2D slices only (3D fine-tuning reads the raw NIfTI)")
        if not self.a_max > self.a_min:
            raise UserError(f"--a_max ({self.a_max}) must be greater than --a_min ({self.a_min})")
        if len(self.pixdim) != 3 or not all(np.isfinite(p) and p > 0 for p in self.pixdim):
            raise UserError(f"voxel size must be three positive numbers, got {self.pixdim}")
        if self.min_xy < 1:
            raise UserError(f"min_xy must be positive, got {self.min_xy}")
        if self.png_bits not in (8, 16):
            raise UserError(f"--png_bits must be 8 or 16, got {self.png_bits}")
        if self.labels is not None and (self.kind != "labelled" or len(self.labels) < 2):
            raise UserError(f"a label set ({self.labels}) needs labelled data and at least two classes")
        if self.png_quantization not in data.PNG_QUANTIZATIONS:
            raise UserError(
                f"--png_quantization must be one of {', '.join(data.PNG_QUANTIZATIONS)}, got {self.png_quantization!r}"
            )

    @property
    def n_classes(self) -> int:
        """Label ids a case may hold: ``0..n_classes-1``."""
        return len(self.labels) if self.labels is not None else data.N_CLASSES

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("labels", "layout", "channel"):  # recorded only when set: FLARE's record is unchanged
            if d[key] is None:
                del d[key]
        if self.labels is not None:
            d["labels"] = data.LabelSet(self.labels).to_json()
        d["pixdim"] = [float(p) for p in self.pixdim]
        d["a_min"], d["a_max"] = float(self.a_min), float(self.a_max)
        d["format_version"] = MANIFEST_FORMAT_VERSION
        return d


@dataclasses.dataclass(frozen=True)
class CaseTask:
    """One case to preprocess. ``image`` None: the case has no image file (``missing`` says why)."""

    case: str
    image: str | None
    label: str | None = None
    missing: str | None = None


# --------------------------------------------------------------------------------------
# Command line pieces shared by both scripts
# --------------------------------------------------------------------------------------


def add_common_args(
    parser: argparse.ArgumentParser, output_help: str, data_default: str, output_default: str
) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags both preprocessing scripts share; returns the argument groups by name.

    ``data_default`` / ``output_default``: the original scripts' default folders (relative to
    the working directory, as there), so that their command lines run as they are.
    """
    io_g = parser.add_argument_group("input and output")
    io_g.add_argument(
        "--data_dir",
        default=data_default,
        help="the data set folder to read (see the layouts above); the default is the original's, relative to the "
        "working directory",
    )
    io_g.add_argument("--output_dir", default=output_default, help=output_help)
    io_g.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --output_dir to be a folder that already holds files the preprocessing did not write "
        "(they may be replaced); without it such a folder is refused",
    )

    pre = parser.add_argument_group("preprocessing (the paper's values; change only to study preprocessing)")
    pre.add_argument(
        "--a_min", type=float, default=-500.0, help="lower end of the HU window, mapped to 0; lower HU are clipped"
    )
    pre.add_argument(
        "--a_max",
        type=float,
        default=500.0,
        help="upper end of the HU window, mapped to 1 (255 in 8-bit PNG); higher HU are clipped",
    )
    pre.add_argument("--size_x", type=float, default=1.0, help="output voxel size along x in mm")
    pre.add_argument("--size_y", type=float, default=1.0, help="output voxel size along y in mm")
    pre.add_argument(
        "--size_z",
        type=float,
        default=2.5,
        help="output slice spacing along z in mm; sets how many slices a case gives",
    )
    pre.add_argument(
        "--png_bits",
        type=int,
        default=8,
        choices=(8, 16),
        help="bits per image PNG pixel: 8 as in the paper, 16 for (nearly) lossless slices; the loaders read either",
    )
    pre.add_argument(
        "--png_quantization",
        default="truncate",
        choices=data.PNG_QUANTIZATIONS,
        help="how an image value v in [0, 1] becomes a PNG integer: truncate v * 255 (the original's "
        "(v * 255).astype(uint8), so the paper's slices) or round it (half a grey level less error on average); "
        "recorded in manifest.json, and predict.py applies the same to new scans",
    )

    run = parser.add_argument_group("speed and distribution")
    run.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="cases processed in parallel (processes); set to the number of CPU cores",
    )
    run.add_argument(
        "--shard_index",
        type=int,
        default=0,
        help="which part of the case list this run does (0-based); with --num_shards, "
        "e.g. $SLURM_ARRAY_TASK_ID, to spread cases over machines writing one folder",
    )
    run.add_argument(
        "--num_shards",
        type=int,
        default=1,
        help="into how many parts the case list is split (every n-th case goes to one shard)",
    )
    return {"io": io_g, "preprocessing": pre, "run": run}


def check_data_dir(args: argparse.Namespace, default: str) -> None:
    """Refuse the default ``--data_dir`` when it is missing, with one line saying where it was
    looked for; another missing folder is refused (named) by ``data.find_labelled_dataset`` /
    ``data.find_images``, which the scripts call next.

    Raises:
        UserError: ``--data_dir`` is the default and not a folder.
    """
    path = os.path.abspath(args.data_dir)
    if args.data_dir == default and not os.path.isdir(path):
        raise UserError(
            f"--data_dir {path} does not exist: the default {default} (the original's) is taken relative to the "
            f"working directory {os.getcwd()}; pass --data_dir with the data set folder"
        )


def config_from_args(
    args: argparse.Namespace,
    kind: str,
    spatial_dims: int = 2,
    labels: Sequence[str] | None = None,
    layout: str | None = None,
    channel: int | None = None,
) -> PreprocessConfig:
    """Build a :class:`PreprocessConfig` from parsed command-line arguments (and, for a data
    set that is not FLARE's, its label names, layout and channel)."""
    return PreprocessConfig(
        kind=kind,
        spatial_dims=spatial_dims,
        a_min=float(args.a_min),
        a_max=float(args.a_max),
        pixdim=(float(args.size_x), float(args.size_y), float(args.size_z)),
        png_bits=int(args.png_bits),
        png_quantization=str(args.png_quantization),
        labels=None if labels is None else tuple(labels),
        layout=layout,
        channel=channel,
    )


def shard_tasks(tasks: Sequence[CaseTask], shard_index: int, num_shards: int) -> list[CaseTask]:
    """Every ``num_shards``-th task starting at ``shard_index`` (tasks sorted by case id first).

    Raises:
        UserError: ``num_shards`` < 1 or ``shard_index`` outside [0, num_shards).
    """
    if num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard_index must be in [0, {num_shards - 1}], got {shard_index}")
    return sorted(tasks, key=lambda t: t.case)[shard_index::num_shards]


# --------------------------------------------------------------------------------------
# Output folder and manifests
# --------------------------------------------------------------------------------------


def _manifest_dir(output_dir: str) -> str:
    return os.path.join(output_dir, data.MANIFEST_DIR)


def _folder_lock(output_dir: str) -> FileLock:
    """The lock of a folder's own files (``.manifest/args.json``, ``manifest.json``)."""
    return FileLock(os.path.join(_manifest_dir(output_dir), ".lock"))


def _case_lock(output_dir: str, case: str) -> FileLock:
    """The lock a process holds while it works on ``case`` (removed once the case is finished)."""
    return FileLock(os.path.join(_manifest_dir(output_dir), f".{case}.lock"))


def prepare_output_dir(
    output_dir: str | os.PathLike,
    config: PreprocessConfig,
    inputs: dict[str, str | None] | None = None,
    overwrite: bool = False,
) -> str:
    """Create ``output_dir``, check that it is writable, and record / compare the arguments.

    The arguments are stored once in ``.manifest/args.json`` (under the folder's lock, so
    shards starting together agree on one file).

    Args:
        inputs: ``{flag: path}`` of what is read (``--data_dir``, ``--split_path``): the
            output folder may not be, lie in, or contain one of them.
        overwrite: accept a folder that holds files the preprocessing did not write.

    Returns:
        the absolute output folder.

    Raises:
        UserError: the folder overlaps an input, cannot be created or written, holds files
            of something else (without ``overwrite``), or holds output made with different
            arguments (the differing ones are named).
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    check_outputs_apart({"--output_dir": output_dir}, inputs or {})
    mdir = _manifest_dir(output_dir)
    if os.path.isdir(output_dir) and not os.path.isdir(mdir) and not overwrite:
        others = sorted(n for n in os.listdir(output_dir) if not n.startswith(".write_test."))
        if others:
            raise UserError(
                f"--output_dir {output_dir} already holds files that the preprocessing did not write (e.g. "
                f"{os.path.join(output_dir, others[0])}); choose an empty or new folder, or pass --overwrite"
            )
    try:
        os.makedirs(mdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir} is not writable: {os_error_reason(e)}") from None
    want = config.to_json()
    apath = os.path.join(mdir, ARGS_NAME)
    with _folder_lock(output_dir):
        remove_stale_temporaries(apath)
        if not os.path.exists(apath):
            _write_json(apath, want)
    try:
        with open(apath) as f:
            have = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {apath}: {e}") from None
    have = {**LEGACY_ARGS, **have}
    diff = [f"{k}={have.get(k)!r} (now {want.get(k)!r})" for k in {**want, **have} if have.get(k) != want.get(k)]
    if diff:
        raise UserError(
            f"--output_dir {output_dir} holds output preprocessed with other arguments: {', '.join(diff)}; "
            "use another --output_dir or the same arguments"
        )
    return output_dir


def record_split(output_dir: str, split: dict[str, list[str]], made_by: dict[str, Any], overwrite: bool = False) -> str:
    """Write the split a labelled preprocessing made (or took from nnU-Net's folds) beside its
    output, ``<output_dir>/split.json``, for fine-tuning to read; call after
    :func:`prepare_output_dir`. A file with the same lists is kept as it is.

    Raises:
        UserError: the file holds another split (without ``overwrite``), or cannot be read.
    """
    path = os.path.join(output_dir, data.SPLIT_NAME)
    with _folder_lock(output_dir):
        remove_stale_temporaries(path)
        try:
            same = data.same_split_file(path, split)
        except UserError:
            if not overwrite:
                raise
            same = False
        if not same:
            _write_json(path, data.split_file_record(split, made_by))
    return path


def read_case_manifest(output_dir: str, case: str) -> dict[str, Any] | None:
    """The per-case manifest of a finished case, None when the case is not finished; an
    unreadable manifest (empty, not JSON, no ``n_slices``) is logged and counts as unfinished."""
    path = os.path.join(_manifest_dir(output_dir), case + ".json")
    try:
        with open(path) as f:
            entry = json.load(f)
        int(entry["n_slices"])
        return entry
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s is unreadable (%s: %s); case %s will be preprocessed again", path, type(e).__name__, e, case)
        return None


def is_finished(output_dir: str, case: str) -> bool:
    """A case is finished when its per-case manifest exists and can be read."""
    return read_case_manifest(output_dir, case) is not None


def assemble_manifest(output_dir: str, config: PreprocessConfig) -> dict[str, Any]:
    """Write ``manifest.json`` from the per-case manifests, under the folder's lock (repeated
    until no other process adds a case meanwhile). Unreadable per-case manifests are left
    out with a warning (those cases count as unfinished)."""
    mdir = _manifest_dir(output_dir)
    previous: list[str] | None = None
    manifest: dict[str, Any] = {}
    with _folder_lock(output_dir):
        remove_stale_temporaries(os.path.join(output_dir, data.MANIFEST_NAME))
        for _ in range(5):
            names = sorted(
                n for n in os.listdir(mdir) if n.endswith(".json") and n != ARGS_NAME and not n.startswith(".")
            )
            if names == previous:
                break
            cases: dict[str, Any] = {}
            for n in names:
                entry = read_case_manifest(output_dir, n[: -len(".json")])
                if entry is not None:
                    cases[n[: -len(".json")]] = entry
            manifest = {
                "format_version": MANIFEST_FORMAT_VERSION,
                "args": config.to_json(),
                "n_cases": len(cases),
                "n_slices": int(sum(c["n_slices"] for c in cases.values())),
                "cases": cases,
            }
            _write_json(os.path.join(output_dir, data.MANIFEST_NAME), manifest)
            previous = names
    return manifest


def _case_output_dirs(output_dir: str, config: PreprocessConfig) -> list[str]:
    if config.kind == "labelled":
        return [os.path.join(output_dir, data.SLICE_IMAGE_DIR), os.path.join(output_dir, data.SLICE_LABEL_DIR)]
    return [output_dir]


def _remove_case_files(output_dir: str, config: PreprocessConfig, case: str) -> int:
    """Delete every file (and leftover temporary file) of ``case`` in the output folders, and
    the temporary files of its per-case manifest (the caller holds the case's lock)."""
    c = re.escape(case)
    if config.spatial_dims == 2:
        pat = re.compile(rf"^(\.)?{c}_\d{{4,}}\.png(\..*\.tmp)?$")
    else:
        pat = re.compile(rf"^(\.)?{c}\.nii\.gz(\..*\.tmp)?$")
    removed = 0
    for d in _case_output_dirs(output_dir, config):
        if not os.path.isdir(d):
            continue
        for n in os.listdir(d):
            m = pat.match(n)
            # a temporary file starts with "." and ends with ".tmp"; a final file has neither
            if m and bool(m.group(1)) == bool(m.group(2)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, n))
                removed += 1
    remove_stale_temporaries(os.path.join(_manifest_dir(output_dir), case + ".json"))
    return removed


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------


def _check_header(path: str, what: str):
    try:
        img = nib.load(path)
    except Exception as e:
        raise CaseError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    if len(img.shape) != 3:
        raise CaseError(f"{what} {path} is not a 3D volume (shape {tuple(img.shape)})")
    if min(img.shape) < 1:
        raise CaseError(f"{what} {path} is empty (shape {tuple(img.shape)})")
    return img


def _load(path: str, what: str):
    """The volume (channel first), read in full with its gzip checksum checked."""
    try:
        return load_nifti_image(image_only=True, ensure_channel_first=True)(path)
    except Exception as e:
        found = user_error_in(e)
        if found is not None:
            raise CaseError(str(found)) from None
        cause = root_cause(e)  # MONAI wraps the reader's error
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CaseError(f"corrupt or truncated {what} {path}: {type(cause).__name__}: {msg}") from None


def process_case(task: CaseTask, config: PreprocessConfig, output_dir: str, wait: bool = True) -> dict[str, Any] | None:
    """Preprocess one case into ``output_dir`` and write its per-case manifest, holding the
    case's lock (``.manifest/.<case>.lock``) meanwhile.

    Args:
        wait: wait for another process that holds the case; with False return None at once.

    Returns:
        the per-case manifest entry (with ``"skipped": True`` when another process finished
        the case meanwhile), or None (``wait=False`` and the case is held elsewhere).

    Raises:
        CaseError: bad input (missing, unreadable, corrupt, not 3D, image / label mismatch,
            non-finite voxels, label ids outside the label set (FLARE: 0..13), nothing above ``a_min``).
        OutputError: the output cannot be written (full disk, read-only folder); the case's
            partial files are removed.
    """
    lock = _case_lock(output_dir, task.case)
    try:
        lock.acquire(blocking=wait)
    except Timeout:
        return None
    try:
        done = read_case_manifest(output_dir, task.case)
        if done is not None:  # finished by another process while this one waited
            _unlink_quietly(lock.lock_file)
            return {**done, "skipped": True}
        entry, arrays = _prepare_case(task, config)
        try:
            _write_case(task, config, output_dir, entry, *arrays)
        except OSError as e:
            _remove_case_files(output_dir, config, task.case)
            _unlink_quietly(os.path.join(_manifest_dir(output_dir), task.case + ".inprogress"))
            raise OutputError(f"cannot write case {task.case}: {os_error_message(e)}") from None
        _unlink_quietly(lock.lock_file)  # finished: nobody needs the lock any more
        return entry
    finally:
        lock.release()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _prepare_case(task: CaseTask, config: PreprocessConfig) -> tuple[dict[str, Any], tuple[Any, Any, Any]]:
    """Read, check and preprocess one case: (manifest entry, (image, label or None, affine))."""
    if task.image is None:
        raise CaseError(task.missing or f"case {task.case} has no image file")
    if config.kind == "labelled" and task.label is None:
        raise CaseError(task.missing or f"case {task.case} has no label file")

    img_h = _check_header(task.image, "image")
    if config.kind == "labelled":
        lab_h = _check_header(task.label, "label")
        if tuple(lab_h.shape) != tuple(img_h.shape):
            raise CaseError(
                f"label {task.label} has shape {tuple(lab_h.shape)} but image {task.image} has {tuple(img_h.shape)}"
            )
        dmax = float(np.abs(np.asarray(lab_h.affine) - np.asarray(img_h.affine)).max())
        if dmax > _AFFINE_ATOL_MM:
            raise CaseError(
                f"label {task.label} and image {task.image} have different affines (max difference {dmax:.4g})"
            )

    image = _load(task.image, "image")
    if not bool(torch.isfinite(image).all()):
        n_bad = int((~torch.isfinite(image)).sum())
        raise CaseError(f"image {task.image} has {n_bad} NaN or infinite voxels")
    sample: dict[str, Any] = {"image": image}
    keys: tuple[str, ...] = ("image",)
    if config.kind == "labelled":
        label = _load(task.label, "label")
        lab = label.as_tensor()
        top = config.n_classes - 1  # FLARE: 13; a data set's own label set: its highest id
        ok = bool(torch.isfinite(lab).all()) and float(lab.min()) >= 0 and float(lab.max()) <= top
        if ok:
            ok = bool((lab == torch.round(lab)).all())
        if not ok:
            vals = np.unique(lab.numpy())
            bad = [
                int(v) if float(v).is_integer() else v
                for v in vals.tolist()
                if not (v == v and 0 <= v <= top and float(v).is_integer())
            ]
            raise CaseError(f"label {task.label} has values outside the ids 0..{top}: {bad[:10]}")
        # the affines agree within _AFFINE_ATOL_MM (checked above); give both exactly the image's,
        # so float noise in the label header cannot put the label on a grid one voxel off
        label.affine = image.affine.clone()
        sample["label"] = label
        keys = ("image", "label")

    pipeline = preprocessing_transforms(
        keys=keys, a_min=config.a_min, a_max=config.a_max, pixdim=config.pixdim, min_xy=config.min_xy, load=False
    )
    out = pipeline(sample)
    vol = out["image"]
    affine = np.asarray(vol.affine, dtype=np.float64)
    arr = vol.as_tensor().numpy()[0]
    if arr.size == 0 or not bool((arr > 0).any()):
        raise CaseError(f"image {task.image} has no voxel above --a_min {config.a_min} HU: nothing to keep")
    n_slices = int(arr.shape[2])
    spacing = [round(float(s), 6) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    entry: dict[str, Any] = {
        "n_slices": n_slices,
        "shape": [int(s) for s in arr.shape],
        "spacing": spacing,
        "source": os.path.abspath(task.image),
        "original_shape": [int(s) for s in img_h.shape],
        "original_spacing": [round(float(s), 6) for s in img_h.header.get_zooms()[:3]],
        "png_bits": config.png_bits if config.spatial_dims == 2 else None,
    }
    if config.kind == "labelled":
        lab_arr = out["label"].as_tensor().numpy()[0].astype(np.uint8)
        entry["label_source"] = os.path.abspath(task.label)
        entry["labels_present"] = [int(v) for v in np.unique(lab_arr)]

    return entry, (arr, lab_arr if config.kind == "labelled" else None, affine)


def _write_case(
    task: CaseTask,
    config: PreprocessConfig,
    output_dir: str,
    entry: dict[str, Any],
    arr: np.ndarray,
    lab_arr: np.ndarray | None,
    affine: np.ndarray,
) -> None:
    """Write a case's files, then its per-case manifest (the caller holds the case's lock).

    A ``.inprogress`` marker (left by a killed run) or an unreadable manifest means that
    files of an earlier attempt may be there: they are removed first.
    """
    n_slices = int(entry["n_slices"])
    mdir = _manifest_dir(output_dir)
    marker = os.path.join(mdir, task.case + ".inprogress")
    if os.path.exists(marker) or os.path.exists(os.path.join(mdir, task.case + ".json")):
        n = _remove_case_files(output_dir, config, task.case)
        logger.debug("%s: removed %d files of an interrupted run", task.case, n)
    with open(marker, "w"):
        pass

    q = config.png_quantization
    if config.spatial_dims == 3:
        _write_nifti(os.path.join(output_dir, task.case + ".nii.gz"), arr, affine)
    elif config.kind == "labelled":
        img_dir, lab_dir = _case_output_dirs(output_dir, config)
        for z in range(n_slices):
            name = data.slice_file_name(task.case, z, n_slices)
            write_bytes(os.path.join(img_dir, name), data.encode_png_2d(arr[:, :, z], config.png_bits, quantization=q))
            write_bytes(os.path.join(lab_dir, name), data.encode_png_2d(lab_arr[:, :, z], is_label=True))
    else:
        for z in range(n_slices):
            name = data.slice_file_name(task.case, z, n_slices)
            write_bytes(
                os.path.join(output_dir, name), data.encode_png_2d(arr[:, :, z], config.png_bits, quantization=q)
            )

    _write_json(os.path.join(mdir, task.case + ".json"), entry)
    os.unlink(marker)


def _atomic_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` atomically, readable as the umask allows (``mkstemp`` alone makes 0600 files)."""
    with atomic_write(path, "wb") as f:
        f.write(payload)
        os.fchmod(f.fileno(), _FILE_MODE)


def _write_json(path: str, obj: Any) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes(path: str, payload: bytes) -> None:
    """Write one output file (slice or volume) atomically (tests patch this to simulate a kill mid-case)."""
    _atomic_bytes(path, payload)


def _write_nifti(path: str, arr: np.ndarray, affine: np.ndarray) -> None:
    """float32 NIfTI with the resampled affine; gzip without a time stamp, so reruns are identical."""
    img = nib.Nifti1Image(np.ascontiguousarray(arr, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


# --------------------------------------------------------------------------------------
# Many cases
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _run_one(task: CaseTask, config: PreprocessConfig, output_dir: str, wait: bool = True) -> tuple[str, str, Any]:
    """Pool entry point; never raises. Returns (status, case, payload): ("ok", case, entry),
    ("skipped", case, entry) when another process finished it, ("busy", case, None) when
    another process holds it (``wait=False``), ("fail", case, one-line message) for a bad
    case, ("fatal", case, message) when the output cannot be written (the run stops)."""
    try:
        entry = process_case(task, config, output_dir, wait=wait)
    except CaseError as e:
        return "fail", task.case, str(e)
    except OutputError as e:
        return "fatal", task.case, str(e)
    except Exception as e:  # an unexpected error in one case must not stop the other 1,999
        if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS:
            return "fatal", task.case, f"cannot preprocess case {task.case}: {os_error_message(e)}"
        logger.debug("case %s failed", task.case, exc_info=True)
        where = task.image or task.case
        return (
            "fail",
            task.case,
            f"{where}: unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
        )
    if entry is None:
        return "busy", task.case, None
    return ("skipped" if entry.get("skipped") else "ok"), task.case, entry


def _mp_context():
    # fork starts workers without re-importing torch / monai (seconds each); spawn where fork is missing
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def run_preprocessing(
    tasks: Sequence[CaseTask],
    output_dir: str | os.PathLike,
    config: PreprocessConfig,
    num_workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    raise_on_failure: bool = True,
    inputs: dict[str, str | None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Preprocess ``tasks`` (this shard's part of them) into ``output_dir``.

    Finished cases are skipped; the others run in ``num_workers`` processes with one
    progress bar over cases. Each failing case is logged as one line naming its file
    and the rest continue. A case another process is working on (a second command on the
    same folder) is left to it first, then waited for at the end. ``manifest.json`` is
    assembled at the end.

    Args:
        inputs: ``{flag: path}`` of the inputs the output folder must keep apart from.
        overwrite: accept an output folder holding files the preprocessing did not write.

    Returns:
        summary dict: n_cases (this shard), n_done, n_skipped, n_failed, n_slices (total in
        the folder), seconds, output_dir, failed ({case: message}).

    Raises:
        UserError: bad ``num_workers`` / shard flags, an output folder that overlaps an input,
            is unwritable or foreign, or output made with other arguments.
        TrainingError: the output cannot be written (a full disk: the run stops at once); or
            one or more cases failed (listed; only with ``raise_on_failure``, otherwise call
            :func:`raise_if_failed` after reporting), all others processed.
    """
    if num_workers < 1:
        raise UserError(f"--num_workers must be at least 1, got {num_workers}")
    mine = shard_tasks(tasks, shard_index, num_shards)
    output_dir = prepare_output_dir(output_dir, config, inputs, overwrite)
    for d in _case_output_dirs(output_dir, config):
        os.makedirs(d, exist_ok=True)
    todo = [t for t in mine if not is_finished(output_dir, t.case)]
    n_skipped = len(mine) - len(todo)
    logger.info(
        "%d cases in this shard (%d of %d): %d already finished, %d to do, %d worker(s) -> %s",
        len(mine),
        shard_index,
        num_shards,
        n_skipped,
        len(todo),
        num_workers,
        output_dir,
    )
    failed: dict[str, str] = {}
    busy: list[CaseTask] = []
    fatal: list[str] = []
    done = 0
    t0 = time.perf_counter()
    by_case = {t.case: t for t in todo}
    with logging_redirect_tqdm(), tqdm(total=len(todo), desc="cases", unit="case", dynamic_ncols=True) as bar:

        def collect(result: tuple[str, str, Any]) -> None:
            nonlocal done, n_skipped
            status, case, payload = result
            if status == "busy":  # another process works on it: come back to it at the end
                busy.append(by_case[case])
                return
            if status == "ok":
                done += 1
                bar.set_postfix_str(f"{case}: {payload['n_slices']} slices", refresh=False)
            elif status == "skipped":
                n_skipped += 1
            elif status == "fatal":
                fatal.append(payload)
            else:
                failed[case] = payload
                logger.error("%s failed: %s", case, payload)
            bar.update(1)

        def run_pass(cases: list[CaseTask], wait: bool) -> None:
            job = partial(_run_one, config=config, output_dir=output_dir, wait=wait)
            if num_workers == 1 or len(cases) <= 1:
                with _single_thread():
                    for t in cases:
                        collect(job(t))
                        if fatal:
                            return
            else:
                with _mp_context().Pool(min(num_workers, len(cases)), initializer=_worker_init) as pool:
                    for result in pool.imap_unordered(job, cases, chunksize=1):
                        collect(result)
                        if fatal:
                            pool.terminate()
                            return

        run_pass(todo, wait=False)
        if busy and not fatal:
            logger.info("waiting for %d case(s) that another process is preprocessing", len(busy))
            run_pass(list(busy), wait=True)
    if fatal:
        raise TrainingError(f"{fatal[0]}; the preprocessing stopped (rerun it when the output can be written)")
    seconds = time.perf_counter() - t0
    manifest = assemble_manifest(output_dir, config)
    summary = {
        "n_cases": len(mine),
        "n_done": done,
        "n_skipped": n_skipped,
        "n_failed": len(failed),
        "n_slices": manifest.get("n_slices", 0),
        "seconds": seconds,
        "output_dir": output_dir,
        "failed": dict(sorted(failed.items())),
    }
    logger.info(
        "%d done, %d skipped (finished before), %d failed in %.1f s; the folder holds %d finished cases, %d slices",
        done,
        n_skipped,
        len(failed),
        seconds,
        manifest.get("n_cases", 0),
        manifest.get("n_slices", 0),
    )
    if raise_on_failure:
        raise_if_failed(summary)
    return summary


def run_from_args(tasks: Sequence[CaseTask], args: argparse.Namespace, config: PreprocessConfig) -> dict[str, Any]:
    """What both preprocessing scripts do with their tasks: :func:`run_preprocessing` into
    ``--output_dir`` with ``--num_workers`` / ``--shard_index`` / ``--num_shards``, the summary
    table on stdout, then TrainingError (exit code 1) when a case failed. Returns the summary."""
    summary = run_preprocessing(
        tasks,
        args.output_dir,
        config,
        num_workers=args.num_workers,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        raise_on_failure=False,
        inputs={"--data_dir": args.data_dir, "--split_path": getattr(args, "split_path", None)},
        overwrite=getattr(args, "overwrite", False),
    )
    print_summary(summary)
    raise_if_failed(summary)
    return summary


def raise_if_failed(summary: dict[str, Any]) -> None:
    """Raise TrainingError (exit code 1) listing the failed cases of a :func:`run_preprocessing` summary."""
    failed = summary["failed"]
    if failed:
        raise TrainingError(
            f"{len(failed)} of {summary['n_cases']} cases failed: {', '.join(sorted(failed))} (reasons logged above)"
        )


def print_summary(summary: dict[str, Any]) -> None:
    """The final table on stdout."""
    rows = [
        ("cases in this shard", summary["n_cases"]),
        ("processed now", summary["n_done"]),
        ("skipped (finished before)", summary["n_skipped"]),
        ("failed", summary["n_failed"]),
        ("slices in the folder", summary["n_slices"]),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"output: {summary['output_dir']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")

"""Data access: layouts (FLARE 2022, nnU-Net v2 raw, Decathlon), label sets, case ids, splits, PNG slices, slice
cache, file listings, evaluation cases.

Everything that knows how the data lies on disk lives here, so that the
preprocessing scripts, pretraining (``main_simsiam.py`` / ``main_dino.py``) and
fine-tuning (``main_finetune.py``) agree on one layout. Reading only: the MONAI
chains that turn what is read here into training samples are ``transforms.py``'s, and
this module imports neither MONAI nor torch itself (nor any module above it); importing it
loads torch all the same, through ``utils.py``'s checkpoint helpers::

    raw FLARE (labelled)            <data_dir>/images/FLARE22_Tr_0001_0000.nii.gz   (or imgs/)
                                    <data_dir>/labels/FLARE22_Tr_0001.nii.gz
    raw FLARE (unlabelled)          <data_dir>/**/Case_00001_0000.nii.gz
    nnU-Net v2 raw                  <data_dir>/dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz
    Decathlon                       <data_dir>/dataset.json ("training": [{"image", "label"}], "labels")
    preprocess_flare_labelled.py    <out>/imgs/FLARE22_Tr_0001_0000.png, <out>/labels/FLARE22_Tr_0001_0000.png, ...
    preprocess_flare_unlabelled.py  <out>/Case_00001_0000.png, ...   (2D)   or   <out>/Case_00001.nii.gz (3D)

A slice file is ``<case>_<zzzz>.png`` where ``zzzz`` is the zero-padded z index
(4 digits, more when a case has 10,000 slices or more), so sorting the names of
one case keeps slice order. The modality suffix ``_0000`` of the raw image is
dropped from case ids, so the first slice of case ``FLARE22_Tr_0001`` is
``FLARE22_Tr_0001_0000.png``.

Array convention: after ``LoadImage`` MONAI arrays are (C, X, Y, Z) in RAS
orientation; a 2D slice is the (X, Y) array at one z. On disk a slice PNG is
drawn the way a radiologist looks at an axial CT slice (anterior at the top, the
patient's right on the left of the picture): the PNG's rows are y reversed and its
columns x reversed. :func:`encode_png_2d` applies that once and :func:`read_image_2d`
/ :func:`read_label_2d` undo it, so a slice round-trips exactly as (X, Y).

Folders written by the original code's preprocessing scripts (``dittohed/exploring-ssl-for-ct``)
are read as they are (slice layout ``"original"``, recognised from the names by
:func:`detect_slice_layout`): ``imgs/<image stem>_<i>.png`` with ``labels/<label stem>_<i>.png``
(``FLARE22_Tr_0001_0000_0.png`` and ``FLARE22_Tr_0001_0.png``), unlabelled a flat folder of
``<stem>_<i>.png``, ``i`` not zero-padded, no manifest. There each PNG holds the raw (X, Y)
array of the slice (rows = x, columns = y; the original reads it back with
``LoadImage(reverse_indexing=False)``), so the readers take it without the radiological flip.
Intensities: 8-bit PNG = value * 255, 16-bit PNG = value * 65535, for values in [0, 1],
truncated to an integer as the original's ``(v * 255).astype(uint8)`` (or rounded:
``--png_quantization round``); labels are 8-bit PNGs holding the label ids (FLARE: 0..13; another
data set: those of its ``dataset.json``, recorded as a :class:`LabelSet` in ``manifest.json``).

Example (Python)::

    from data import load_split, list_finetune_pairs, read_image_2d, read_label_2d, DEFAULT_SPLIT_PATH
    pairs = list_finetune_pairs("flare_2d/labelled", load_split(DEFAULT_SPLIT_PATH), spatial_dims=2)
    item = pairs["train"][0]
    image, label = read_image_2d(item["image"]), read_label_2d(item["label"])  # (X, Y) float32 / uint8
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import UserError, check_fits_in_memory, format_bytes

if TYPE_CHECKING:  # annotations only: reading files needs no torch
    import torch

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Labels and constants
# --------------------------------------------------------------------------------------

#: FLARE 2022 organ names; the index is the label id stored in the label files.
LABEL_NAMES: tuple[str, ...] = (
    "background",
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
)
#: Number of segmentation classes including background.
N_CLASSES: int = len(LABEL_NAMES)

#: The paper's 15 / 35 train / validation split of the 50 labelled FLARE 2022 cases.
DEFAULT_SPLIT_PATH: str = str(Path(__file__).resolve().parent / "data" / "split.json")

#: Modality suffix of FLARE image files (``FLARE22_Tr_0001_0000.nii.gz``), dropped from case ids.
MODALITY_SUFFIX = "_0000"
#: Folder names of the raw labelled FLARE layout (``imgs`` is the original code's name).
RAW_IMAGE_DIRS = ("images", "imgs")
RAW_LABEL_DIR = "labels"
#: Folder names of a ``preprocess_flare_labelled.py`` output.
SLICE_IMAGE_DIR = "imgs"
SLICE_LABEL_DIR = "labels"
#: Hidden folder of per-case manifests written by the preprocessing scripts.
MANIFEST_DIR = ".manifest"
#: The manifest of a whole preprocessing output (all cases, each with its voxel size).
MANIFEST_NAME = "manifest.json"
#: Minimum number of digits of the slice index in slice file names.
SLICE_DIGITS = 4

_NIFTI_EXTS = (".nii.gz", ".nii")
_SLICE_RE = re.compile(r"^(?P<case>.+)_(?P<z>\d{4,})\.png$")


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def is_nifti(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii.gz`` or ``.nii``."""
    return os.fspath(path).endswith(_NIFTI_EXTS)


def strip_extension(name: str) -> str:
    """Drop ``.nii.gz``, ``.nii`` or ``.png`` from a file name (other names are returned unchanged)."""
    for ext in (".nii.gz", ".nii", ".png"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def slice_file_name(case: str, z: int, n_slices: int) -> str:
    """The file name of slice ``z`` of a case with ``n_slices`` slices: ``<case>_<zzzz>.png``.

    The index is zero-padded to 4 digits, or more when ``n_slices - 1`` needs more,
    so that name order equals slice order within a case.
    """
    digits = max(SLICE_DIGITS, len(str(max(n_slices - 1, 0))))
    return f"{case}_{z:0{digits}d}.png"


def parse_slice_name(path: str | os.PathLike) -> tuple[str, int]:
    """Split a slice file name ``<case>_<zzzz>.png`` into (case, z).

    Raises:
        UserError: the name does not end in ``_<at least 4 digits>.png``.
    """
    name = os.path.basename(os.fspath(path))
    m = _SLICE_RE.match(name)
    if m is None:
        raise UserError(f"{os.fspath(path)} is not a slice file named <case>_<zzzz>.png")
    return m.group("case"), int(m.group("z"))


def case_id_from_path(path: str | os.PathLike, is_slice: bool = False) -> str:
    """The FLARE case id of a file.

    ``images/FLARE22_Tr_0001_0000.nii.gz`` -> ``FLARE22_Tr_0001``;
    ``labels/FLARE22_Tr_0001.nii.gz`` -> ``FLARE22_Tr_0001``;
    ``Case_00001_0000.nii.gz`` -> ``Case_00001``;
    with ``is_slice=True``: ``imgs/FLARE22_Tr_0001_0042.png`` -> ``FLARE22_Tr_0001``.

    For slices only the trailing ``_<zzzz>`` slice index is removed: slice names are
    built from case ids that have already lost their modality suffix, so slice 0 of a
    case (``<case>_0000.png``) keeps its case id intact.

    Raises:
        UserError: ``is_slice`` is set and the name has no ``_<zzzz>`` slice index.
    """
    if is_slice:
        return parse_slice_name(path)[0]
    stem = strip_extension(os.path.basename(os.fspath(path)))
    if stem.endswith(MODALITY_SUFFIX) and len(stem) > len(MODALITY_SUFFIX):
        stem = stem[: -len(MODALITY_SUFFIX)]
    return stem


# --------------------------------------------------------------------------------------
# PNG slices
# --------------------------------------------------------------------------------------


def _to_display(arr: np.ndarray) -> np.ndarray:
    """(X, Y) RAS slice -> (rows, cols) picture: anterior at the top, patient's right on the left."""
    return np.ascontiguousarray(arr.T[::-1, ::-1])


def _from_display(pic: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_display`: picture -> (X, Y)."""
    return np.ascontiguousarray(pic[::-1, ::-1].T)


#: How the PNG slices of a preprocessed folder lie on disk: "ioupos" (this project's
#: preprocessing: ``<case>_<zzzz>.png`` in the radiological view, ``manifest.json``) or
#: "original" (the original code's scripts: ``<stem>_<i>.png`` holding the raw (X, Y) array).
SLICE_LAYOUTS: tuple[str, ...] = ("ioupos", "original")


def _picture_to_xy(pic: np.ndarray, layout: str) -> np.ndarray:
    """A PNG's pixel array (rows, columns) -> the (X, Y) slice, for a folder of ``layout``."""
    if layout == "ioupos":
        return _from_display(pic)
    if layout == "original":
        return np.ascontiguousarray(pic)
    raise ValueError(f"slice layout must be one of {SLICE_LAYOUTS}, got {layout!r}")


def encode_png_2d(arr: np.ndarray, bits: int = 8, is_label: bool = False, quantization: str = "round") -> bytes:
    """Encode one (X, Y) slice as PNG bytes, in the orientation :func:`read_image_2d` undoes.

    Args:
        arr: an image slice with values in [0, 1], or a label slice of integer ids 0..255.
        bits: 8 (``value * 255``) or 16 (``value * 65535``); images only, labels are always 8-bit.
        is_label: ``arr`` holds label ids.
        quantization: ``"round"`` or ``"truncate"`` to an integer (:func:`float_to_stored`).

    Raises:
        ValueError: ``arr`` is not 2D, ``bits`` is not 8 or 16, or an unknown ``quantization``.
    """
    if arr.ndim != 2:
        raise ValueError(f"a slice must be 2D (X, Y), got shape {arr.shape}")
    pic = arr.astype(np.uint8) if is_label else float_to_stored(arr, bits, quantization)
    buf = io.BytesIO()
    # compress_level 1: 3x faster than the default 6 for ~15% larger files; pixels are identical
    Image.fromarray(_to_display(pic)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


#: PNG modes of the slices, and the dtype they are held in as stored (8- or 16-bit grayscale).
_STORED_DTYPES: dict[str, Any] = {
    "L": np.uint8,
    "I;16": np.uint16,
    "I;16B": np.uint16,
    "I;16L": np.uint16,
    "I": np.uint16,
}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def verified_png_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a PNG file, every chunk's CRC checked and the file complete up to ``IEND``.

    PIL skips the CRCs of the image data and stops reading once it has the pixels, so a
    flipped bit or a lost tail can decode into a wrong slice without an error; here every
    byte is checked first.

    Raises:
        UserError: the file is missing, not a PNG, truncated, or a chunk's CRC is wrong (names the file).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"slice file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read PNG {path}: {e.strerror or e}") from None
    if not raw.startswith(_PNG_SIGNATURE):
        raise UserError(f"cannot read PNG {path}: not a PNG file (no PNG signature)")
    pos, n = len(_PNG_SIGNATURE), len(raw)
    while True:
        if pos + 12 > n:
            raise UserError(f"cannot read PNG {path}: truncated ({n} bytes, no IEND chunk)")
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        end = pos + 12 + length
        if end > n:
            raise UserError(f"cannot read PNG {path}: truncated ({n} bytes, a chunk needs {end})")
        kind = raw[pos + 4 : pos + 8]
        (crc,) = struct.unpack(">I", raw[end - 4 : end])
        if zlib.crc32(raw[pos + 4 : end - 4]) != crc:
            name = kind.decode("latin-1", "replace")
            raise UserError(
                f"cannot read PNG {path}: the CRC of its {name} chunk at byte {pos} is wrong (corrupt file)"
            )
        pos = end
        if kind == b"IEND":
            return raw


def _read_png(path: str | os.PathLike, pixels: bool = True) -> tuple[str, tuple[int, int], np.ndarray | None]:
    """(PIL mode, (width, height), pixels or None) of a PNG; with ``pixels=False`` only the
    header is read, otherwise every byte is checked (:func:`verified_png_bytes`). Raises
    UserError naming the file when it is missing, unreadable or corrupt."""
    path = os.fspath(path)
    try:
        src = io.BytesIO(verified_png_bytes(path)) if pixels else path
        with Image.open(src) as im:
            if pixels:
                im.load()
            return im.mode, (int(im.size[0]), int(im.size[1])), (np.asarray(im) if pixels else None)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"slice file {path} does not exist") from None
    except Exception as e:  # PIL raises many types for broken files
        raise UserError(f"cannot read PNG {path}: {type(e).__name__}: {e}") from None


def _stored_dtype(path: str | os.PathLike, mode: str) -> np.dtype:
    if mode not in _STORED_DTYPES:
        raise UserError(f"PNG {os.fspath(path)} has mode {mode!r}; expected an 8- or 16-bit grayscale slice")
    return np.dtype(_STORED_DTYPES[mode])


def _open_png(path: str | os.PathLike) -> np.ndarray:
    mode, _, pic = _read_png(path)
    if _stored_dtype(path, mode) == np.uint8:
        return pic
    if pic.size and (pic.min() < 0 or pic.max() > 65535):
        raise UserError(f"PNG {os.fspath(path)} holds values outside 0..65535")
    return pic.astype(np.uint16)


def png_size(path: str | os.PathLike, layout: str = "ioupos") -> tuple[int, int]:
    """(X, Y) of a PNG slice as :func:`read_image_2d` returns it, from the header alone:
    (width, height), or (height, width) for the original's layout.

    Raises:
        UserError: the file is missing or cannot be read as a PNG (names the file).
    """
    w, h = _read_png(path, pixels=False)[1]
    return (h, w) if layout == "original" else (w, h)


def stored_nbytes_2d(path: str | os.PathLike) -> int:
    """Bytes a slice takes in memory as stored (:func:`read_image_2d_stored`), from the PNG
    header alone: X * Y for 8-bit, twice that for 16-bit grayscale.

    Raises:
        UserError: the file is missing or not a PNG that :func:`read_image_2d_stored` reads.
    """
    mode, (w, h), _ = _read_png(path, pixels=False)
    return w * h * _stored_dtype(path, mode).itemsize


def read_image_2d(path: str | os.PathLike, layout: str = "ioupos") -> np.ndarray:
    """Read an image slice written by the preprocessing scripts (``layout``: this project's,
    or ``"original"`` for the original code's, see :data:`SLICE_LAYOUTS`).

    Returns:
        float32 array of shape (X, Y) with values in [0, 1] (8-bit PNG / 255, 16-bit PNG / 65535).

    Raises:
        UserError: the file is missing, corrupt, or not a grayscale 8/16-bit PNG.
    """
    return stored_to_float(read_image_2d_stored(path, layout))


def read_image_2d_stored(path: str | os.PathLike, layout: str = "ioupos") -> np.ndarray:
    """Read an image slice as stored: uint8 or uint16 array (X, Y) of PNG values
    (:func:`stored_to_float` gives what :func:`read_image_2d` returns).

    Raises:
        UserError: as :func:`read_image_2d`.
    """
    return _picture_to_xy(_open_png(path), layout)


def stored_scale(dtype: Any) -> float | None:
    """The divisor that maps stored PNG values of ``dtype`` to [0, 1]: 255 for uint8, 65535
    for uint16; None for anything else (already float)."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype))


#: How image values become PNG integers: ``truncate`` (the original's ``(v * 255).astype(uint8)``) or ``round``.
PNG_QUANTIZATIONS: tuple[str, ...] = ("truncate", "round")


def float_to_stored(arr: np.ndarray, bits: int = 8, quantization: str = "round") -> np.ndarray:
    """Image values in [0, 1] -> what an image PNG of ``bits`` bits stores: ``value * 255`` as
    uint8 or ``value * 65535`` as uint16 (values outside [0, 1] are clipped first), rounded, or
    truncated towards zero as the original's ``(v * 255).astype('uint8')`` (8 bits: the product
    in float32, as there, so the integers are the original's bit for bit). Works on slices and
    volumes; :func:`stored_to_float` maps back.

    Example: 0.5 -> 128 (round) or 127 (truncate: 127.5 -> 127).

    Raises:
        ValueError: ``bits`` is not 8 or 16, or ``quantization`` is not one of :data:`PNG_QUANTIZATIONS`.
    """
    if quantization not in PNG_QUANTIZATIONS:
        raise ValueError(f"png quantization must be one of {PNG_QUANTIZATIONS}, got {quantization!r}")
    if bits == 8:
        if quantization == "truncate":
            return (np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False) * np.float32(255.0)).astype(np.uint8)
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if bits == 16:
        scaled = np.clip(arr, 0.0, 1.0).astype(np.float64) * 65535.0
        return (scaled if quantization == "truncate" else np.round(scaled)).astype(np.uint16)
    raise ValueError(f"png bits must be 8 or 16, got {bits}")


def stored_to_float(stored: np.ndarray) -> np.ndarray:
    """Stored PNG values -> float32 in [0, 1]: uint8 / 255, uint16 / 65535 (one float32
    division, so a true division by a tensor on any device gives the same bits); float
    arrays are returned as float32 unchanged."""
    scale = stored_scale(stored.dtype)
    if scale is None:
        return np.asarray(stored, dtype=np.float32)
    return stored.astype(np.float32) / np.float32(scale)


def read_label_2d(path: str | os.PathLike, layout: str = "ioupos") -> np.ndarray:
    """Read a label slice: uint8 array (X, Y) of FLARE ids (``layout``: see :func:`read_image_2d`).

    Raises:
        UserError: the file is missing, corrupt, not grayscale, or holds ids above 255.
    """
    return label_from_stored(read_image_2d_stored(path, layout), path)


def label_from_stored(stored: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """A label slice as stored in its PNG -> uint8 ids (a 16-bit PNG is accepted when its
    values fit); ``path`` names the file in the error.

    Raises:
        UserError: values above 255.
    """
    if stored.dtype != np.uint8:
        if stored.size and stored.max() > 255:
            raise UserError(f"label PNG {os.fspath(path)} holds values above 255")
        stored = stored.astype(np.uint8)
    return stored


# --------------------------------------------------------------------------------------
# NIfTI volumes, read in full
# --------------------------------------------------------------------------------------


def read_nifti_bytes(path: str | os.PathLike) -> bytes:
    """The uncompressed bytes of a ``.nii`` / ``.nii.gz`` file, with a gzip stream read to its
    end so that its CRC-32 and length are checked.

    nibabel reads a compressed volume only as far as the voxels go and never reaches the gzip
    trailer, so a flipped bit mid-stream loads as wrong voxels without an error; here it is
    refused.

    Raises:
        UserError: the file is missing or unreadable, or its gzip stream is corrupt or
            truncated (names the file).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"NIfTI file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read NIfTI {path}: {e.strerror or e}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)  # checks every member's CRC-32 and length
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"corrupt or truncated NIfTI {path}: the gzip stream fails its check ({e})") from None


def load_nifti(path: str | os.PathLike):
    """A NIfTI image (nibabel) read in full from verified bytes (:func:`read_nifti_bytes`):
    header, affine and voxels exactly as ``nibabel.load`` gives them.

    Raises:
        UserError: the file is missing, corrupt, truncated or not NIfTI-1 / NIfTI-2 (names the file).
    """
    raw = read_nifti_bytes(path)
    if raw[4:8] == b"n+2\x00":
        klass: Any = nib.Nifti2Image
    elif raw[344:348] == b"n+1\x00":
        klass = nib.Nifti1Image
    else:
        raise UserError(f"{os.fspath(path)} is not a single-file NIfTI-1 / NIfTI-2 volume (no n+1 / n+2 magic)")
    try:
        return klass.from_bytes(raw)
    except Exception as e:  # nibabel raises many types for a bad header
        raise UserError(f"cannot read NIfTI {os.fspath(path)}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------
# Slices decoded once, held in memory (--cache_images)
# --------------------------------------------------------------------------------------


def _threaded_map(
    fn: Callable[[str], Any], paths: Sequence[str], threads: int, desc: str, progress: bool
) -> Iterator[Any]:
    """``fn(path)`` for every path, in order, from ``threads`` threads (0 = up to 8; PIL
    releases the GIL while reading), with a tqdm bar when ``progress``."""
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        yield from tqdm(pool.map(fn, paths), total=len(paths), desc=desc, disable=not progress, leave=False)


class SliceCache:
    """Decoded 2D slices held in memory as stored: uint8 (8-bit PNGs) or uint16 (16-bit).

    Built once, in the main process, before the DataLoader forks its workers: they share the
    buffers (copy-on-write pages that are never written), so a cache outlives the per-epoch
    workers. Slices live in one flat buffer per bit depth (a few thousand slices per buffer, no Python object per slice).
    :meth:`read` returns exactly what :func:`read_image_2d` returns for the file.

    Memory: X * Y bytes per 8-bit slice (twice that for 16-bit), e.g. 8.75 GB per 100k
    slices of 350 x 250 pixels.

    Args:
        paths: the PNG slices to decode.
        progress: show a tqdm bar while decoding.
        threads: decoding threads (PIL releases the GIL while decoding); 0 = up to 8.
        layout: the slices' layout (:data:`SLICE_LAYOUTS`).

    Raises:
        UserError: a file cannot be read as an 8- or 16-bit grayscale PNG (names the file).
    """

    CHUNK = 4096  # slices per buffer

    def __init__(self, paths: Sequence[str], progress: bool = True, threads: int = 0, layout: str = "ioupos"):
        paths = [str(p) for p in paths]
        self.index = {p: i for i, p in enumerate(paths)}
        n = len(paths)
        self.shapes = np.zeros((n, 2), dtype=np.int64)
        self.chunk = np.zeros(n, dtype=np.int64)  # which buffer holds slice i
        self.offsets = np.zeros(n, dtype=np.int64)  # where in it
        self.buffers: list[np.ndarray] = []  # flat uint8 / uint16 buffers of about CHUNK slices each
        pending: dict[Any, list[np.ndarray]] = {np.dtype(np.uint8): [], np.dtype(np.uint16): []}
        members: dict[Any, list[int]] = {np.dtype(np.uint8): [], np.dtype(np.uint16): []}

        def flush(dt: Any) -> None:
            if not pending[dt]:
                return
            self.buffers.append(np.concatenate(pending[dt]))
            off = 0
            for i, part in zip(members[dt], pending[dt]):
                self.chunk[i] = len(self.buffers) - 1
                self.offsets[i] = off
                off += part.size
            pending[dt], members[dt] = [], []

        read = partial(read_image_2d_stored, layout=layout)
        for i, pic in enumerate(_threaded_map(read, paths, threads, "decoding slices", progress)):
            self.shapes[i] = pic.shape
            pending[pic.dtype].append(pic.ravel())
            members[pic.dtype].append(i)
            if len(pending[pic.dtype]) >= self.CHUNK:
                flush(pic.dtype)
        for dt in list(pending):
            flush(dt)

    @staticmethod
    def planned_nbytes(paths: Sequence[str], progress: bool = False, threads: int = 0) -> int:
        """Bytes a cache of ``paths`` will hold, from the PNG headers alone (no decoding).

        Raises:
            UserError: a file is missing or not an 8- or 16-bit grayscale PNG (names the file).
        """
        return int(
            sum(
                _threaded_map(
                    stored_nbytes_2d, paths, threads, "sizing the slice cache", progress and len(paths) >= 1000
                )
            )
        )

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        what: str,
        flag: str,
        copies: int = 1,
        progress: bool = True,
        layout: str = "ioupos",
    ) -> "SliceCache":
        """Check that the decoded ``paths`` fit in memory, decode them and log the size.

        The scripts' ``--cache_images`` goes through here: a cache that would not fit is
        refused before anything is decoded (:func:`utils.check_fits_in_memory`), instead
        of the system killing the run part-way through an epoch.

        Args:
            what: what the paths are, for the log and the error (e.g. ``"1,024 slices"``).
            flag: the option that asked for the cache, named in the error.
            copies: processes on this machine that each build the same cache (one per GPU
                under torchrun); the check counts them all.
            layout: the slices' layout (:data:`SLICE_LAYOUTS`).

        Raises:
            UserError: a file cannot be read, or the cache does not fit.
        """
        need = cls.planned_nbytes(paths, progress=progress) * max(int(copies), 1)
        per = f" in each of {copies} processes" if copies > 1 else ""
        check_fits_in_memory(need, f"{flag}: {what}{per}", f"run without {flag}")
        cache = cls(paths, progress=progress, layout=layout)
        logger.info("%s: %s decoded, %s in memory%s", flag, what, format_bytes(cache.nbytes), per)
        return cache

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, path: object) -> bool:
        return str(path) in self.index

    @property
    def nbytes(self) -> int:
        """Bytes held by the decoded slices."""
        return int(sum(b.nbytes for b in self.buffers))

    def read(self, path: str) -> np.ndarray:
        """The slice ``path`` as :func:`read_image_2d` gives it: float32 (X, Y) in [0, 1].

        Raises:
            KeyError: ``path`` was not among the cached paths.
        """
        return stored_to_float(self.read_stored(path))

    def read_stored(self, path: str) -> np.ndarray:
        """The slice ``path`` as stored in its PNG: uint8 or uint16 (X, Y), a read-only view
        (label slices: the ids, as :func:`read_label_2d` reads them before its checks).

        Raises:
            KeyError: ``path`` was not among the cached paths.
        """
        try:
            i = self.index[str(path)]
        except KeyError:
            raise KeyError(f"slice {path} is not in the image cache (built for {len(self)} other paths)") from None
        x, y = (int(v) for v in self.shapes[i])
        o = int(self.offsets[i])
        pic = self.buffers[int(self.chunk[i])][o : o + x * y].reshape(x, y)
        pic.flags.writeable = False
        return pic


# --------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------


def load_split(path: str | os.PathLike = DEFAULT_SPLIT_PATH, fold: int | None = None) -> dict[str, list[str]]:
    """Read a split file ``{"train": [case ids], "val": [case ids]}``, or fold ``fold`` of
    nnU-Net's ``splits_final.json`` (a list of such objects, one per fold).

    Other keys (e.g. ``"test"``, ``"made_by"``) are allowed and ignored. The order of
    ``"train"`` is kept: ``--n_train_cases N`` takes its first N cases.

    Raises:
        UserError: the file is missing or not JSON, a key is missing, an entry is not a
            non-empty string, a case is listed twice, or a case is in both train and val;
            a list of folds without ``fold``, a fold that is not there, or ``fold`` given
            for a file that is not a list of folds.
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read split file {path}: {e}") from None
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):  # nnU-Net's splits_final.json
        if fold is None:
            raise UserError(
                f"split file {path} lists {len(obj)} folds (nnU-Net's splits_final.json); pick one with --fold k"
            )
        if not 0 <= fold < len(obj):
            raise UserError(f"--fold {fold}: split file {path} has folds 0..{len(obj) - 1}")
        obj = obj[fold]
        path = f"{path} (fold {fold})"
    elif fold is not None:
        raise UserError(f"--fold {fold} picks a fold of nnU-Net's splits_final.json; split file {path} has no folds")
    if not isinstance(obj, dict):
        raise UserError(f"split file {path} must hold a JSON object with keys 'train' and 'val'")
    out: dict[str, list[str]] = {}
    for key in ("train", "val"):
        cases = obj.get(key)
        if not isinstance(cases, list):
            raise UserError(f"split file {path} has no list under {key!r}")
        for c in cases:
            if not isinstance(c, str) or not c:
                raise UserError(f"split file {path}: {key!r} holds {c!r}, expected non-empty case id strings")
        dup = sorted({c for c in cases if cases.count(c) > 1})
        if dup:
            raise UserError(f"split file {path}: {key!r} lists {dup[0]!r} more than once")
        out[key] = list(cases)
    both = sorted(set(out["train"]) & set(out["val"]))
    if both:
        raise UserError(f"split file {path}: case {both[0]!r} is in both 'train' and 'val'")
    return out


# --------------------------------------------------------------------------------------
# Raw FLARE layout discovery
# --------------------------------------------------------------------------------------


def walk(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` (top-down; prune ``dirnames`` in place as with ``os.walk``) that
    follows links to folders, and walks a folder reached twice (a link loop, two links to
    one folder) only once, with a warning. Every listing of the project walks through here."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            raise UserError(f"cannot list {dirpath}: {e.strerror or e}") from None
        key = (st.st_dev, st.st_ino)
        if key in seen:
            logger.warning("%s is a folder already listed (a link loop or a second link to it); skipped", dirpath)
            dirnames[:] = []
            continue
        seen.add(key)
        yield dirpath, dirnames, filenames


def _require_dir(path: str | os.PathLike, what: str) -> str:
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} does not exist or is not a folder")
    return path


def _list_files(folder: str, suffixes: Sequence[str]) -> list[str]:
    """Non-hidden files directly in ``folder`` whose names end in one of ``suffixes``, sorted."""
    return sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if not n.startswith(".") and n.endswith(tuple(suffixes)) and os.path.isfile(os.path.join(folder, n))
    )


def raw_image_dir(data_dir: str | os.PathLike) -> str:
    """The image folder of a raw labelled FLARE layout: ``images/`` or ``imgs/``.

    Raises:
        UserError: neither exists, or both do (ambiguous).
    """
    data_dir = os.fspath(data_dir)
    found = [os.path.join(data_dir, d) for d in RAW_IMAGE_DIRS if os.path.isdir(os.path.join(data_dir, d))]
    if not found:
        raise UserError(f"{data_dir} has no images/ (or imgs/) folder: expected the FLARE labelled layout")
    if len(found) > 1:
        raise UserError(f"{data_dir} has both images/ and imgs/; keep one of them")
    return found[0]


def find_labelled_cases(data_dir: str | os.PathLike) -> dict[str, dict[str, str | None]]:
    """Discover the raw labelled FLARE layout.

    Returns:
        ``{case: {"image": path or None, "label": path or None}}`` for every case with
        an image or a label file, sorted by case id (absolute paths).

    Raises:
        UserError: ``data_dir`` or its image / label folders are missing, hold no NIfTI,
            or two files map to one case id.
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    img_dir = raw_image_dir(data_dir)
    lab_dir = os.path.join(data_dir, RAW_LABEL_DIR)
    if not os.path.isdir(lab_dir):
        raise UserError(f"{data_dir} has no labels/ folder: expected the FLARE labelled layout")
    cases: dict[str, dict[str, str | None]] = {}
    for key, folder in (("image", img_dir), ("label", lab_dir)):
        files = _list_files(folder, _NIFTI_EXTS)
        if not files:
            raise UserError(f"{folder} holds no .nii.gz / .nii files")
        for p in files:
            case = case_id_from_path(p) if key == "image" else strip_extension(os.path.basename(p))
            entry = cases.setdefault(case, {"image": None, "label": None})
            if entry[key] is not None:
                raise UserError(f"{p} and {entry[key]} both belong to case {case!r}; keep one")
            entry[key] = p
    return dict(sorted(cases.items()))


def find_unlabelled_cases(data_dir: str | os.PathLike) -> dict[str, str]:
    """Every ``*.nii.gz`` / ``*.nii`` under ``data_dir`` (recursively), keyed by case id.

    Raises:
        UserError: ``data_dir`` is missing, holds no NIfTI, or two files map to one case id.
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    cases: dict[str, str] = {}
    for root, dirs, files in walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(files):
            if n.startswith(".") or not is_nifti(n):
                continue
            p = os.path.join(root, n)
            case = case_id_from_path(p)
            if case in cases:
                raise UserError(f"{p} and {cases[case]} both map to case id {case!r}; keep one")
            cases[case] = p
    if not cases:
        raise UserError(f"--data_dir {data_dir} holds no .nii.gz / .nii files")
    return dict(sorted(cases.items()))


# --------------------------------------------------------------------------------------
# Labelled data sets of any layout: FLARE 2022, nnU-Net v2 raw, Medical Segmentation Decathlon
# --------------------------------------------------------------------------------------

#: Layouts of a labelled data set (``--layout``); :func:`detect_layout` recognises them from their files.
LAYOUTS: tuple[str, ...] = ("flare", "nnunet", "decathlon")
#: The data set description of the nnU-Net v2 raw and Decathlon layouts.
DATASET_JSON = "dataset.json"
#: nnU-Net's list of cross-validation folds (``[{"train": [...], "val": [...]}, ...]``).
NNUNET_SPLITS = "splits_final.json"
#: The split a labelled preprocessing made (or took from nnU-Net's folds), in its output folder;
#: fine-tuning on that folder reads it by default.
SPLIT_NAME = "split.json"
#: ``--val_fraction`` of an automatic split when none is given.
DEFAULT_VAL_FRACTION = 0.2
#: The keys of an nnU-Net v2 ``dataset.json`` that this project reads.
NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
#: Folders of the nnU-Net v2 raw layout.
NNUNET_IMAGE_DIR, NNUNET_LABEL_DIR, NNUNET_TEST_DIR = "imagesTr", "labelsTr", "imagesTs"


@dataclass(frozen=True)
class LabelSet:
    """The classes of a data set: ``names[i]`` names label id ``i`` (0: background).

    Ids run from 0 to ``n_classes - 1`` without gaps (one network output per id).
    ``source`` says where the names come from (a ``dataset.json``, a ``manifest.json``,
    or FLARE 2022 when the data set declares none); it is not compared.
    """

    names: tuple[str, ...]
    source: str = field(default="FLARE 2022", compare=False)

    @property
    def n_classes(self) -> int:
        """Classes including background."""
        return len(self.names)

    @property
    def is_flare(self) -> bool:
        """The 13 FLARE 2022 organs under their ids: FLARE's per-organ NSD tolerances and its
        slice-range rule for aorta, IVC and esophagus apply (:mod:`metrics`)."""
        return tuple(self.names) == LABEL_NAMES

    def to_json(self) -> dict[str, str]:
        """``{"0": "background", "1": ...}``, as recorded in a ``manifest.json`` and a checkpoint."""
        return {str(i): n for i, n in enumerate(self.names)}

    def describe(self) -> str:
        """``"0 background, 1 liver, ..."`` for messages."""
        return ", ".join(f"{i} {n}" for i, n in enumerate(self.names))


#: FLARE 2022's 13 organs: the label set of the FLARE layout and of any data set that declares none.
FLARE_LABELS = LabelSet(LABEL_NAMES, "FLARE 2022 (no label set declared)")


def parse_label_set(obj: Any, where: str) -> LabelSet:
    """Label ids and names from a ``"labels"`` object.

    Accepts nnU-Net v2's ``{"background": 0, "liver": 1}`` (name -> id) and the Decathlon's
    (and our manifests') ``{"0": "background", "1": "liver"}`` (id -> name).

    Raises:
        UserError: not such an object, nnU-Net region labels (lists of ids) or an ``ignore``
            label, ids that are not ``0..K-1`` without gaps (K >= 2, at most 256: labels are
            stored as 8-bit PNG), or names that are empty or repeated (``where`` named).
    """
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{where}: 'labels' must be a non-empty object of label ids and names, got {obj!r}")
    values = list(obj.values())
    by_id: dict[int, str] = {}
    if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in values):  # nnU-Net: name -> id
        for name, v in obj.items():
            if isinstance(v, list):
                raise UserError(
                    f"{where}: label {name!r} is a region ({v}: nnU-Net region-based training); "
                    "this project trains one class per label id"
                )
            if name == "ignore":
                raise UserError(
                    f"{where}: an 'ignore' label (id {v}, nnU-Net's sparse annotations) is not supported; "
                    "every voxel must carry a class"
                )
            if v in by_id:
                raise UserError(f"{where}: labels {by_id[v]!r} and {name!r} both have id {v}")
            by_id[int(v)] = str(name)
    elif all(isinstance(v, str) for v in values):  # Decathlon: id -> name
        for k, name in obj.items():
            try:
                i = int(k)
            except (TypeError, ValueError):
                raise UserError(f"{where}: label key {k!r} is not an integer id (expected {{'0': 'background', ...}})")
            if i in by_id:
                raise UserError(f"{where}: label id {i} is listed twice")
            by_id[i] = name
    else:
        raise UserError(
            f"{where}: 'labels' mixes ids and names ({obj!r}); expected nnU-Net's {{'background': 0, 'liver': 1}} "
            "or the Decathlon's {'0': 'background', '1': 'liver'}"
        )
    ids = sorted(by_id)
    if ids != list(range(len(ids))):
        gap = next(i for i in range(len(ids) + 1) if i not in by_id)
        raise UserError(f"{where}: label ids must run from 0 without gaps; id {gap} is missing (ids {ids})")
    if len(ids) < 2 or len(ids) > 256:
        raise UserError(f"{where}: {len(ids)} label id(s); need background and at least one class, at most 256 in all")
    names = tuple(by_id[i] for i in ids)
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise UserError(f"{where}: label id {i} has no name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: the name {dup[0]!r} is given to two label ids")
    return LabelSet(names, where)


def read_dataset_json(path: str) -> dict[str, Any]:
    """A ``dataset.json``, read.

    Raises:
        UserError: missing, unreadable, not JSON or not an object (names the file).
    """
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object (a data set description), got {type(obj).__name__}")
    return obj


def detect_layout(data_dir: str | os.PathLike) -> str:
    """The layout of a labelled data set, recognised from its files.

    * ``dataset.json`` with a ``"training"`` list: the Medical Segmentation Decathlon (also
      nnU-Net v1's raw layout, whose images carry a ``_0000`` suffix);
    * ``dataset.json`` with ``channel_names`` / ``file_ending``: nnU-Net v2 raw;
    * no ``dataset.json``, an ``images/`` (or ``imgs/``) or a ``labels/`` folder: FLARE 2022
      (its reader names the folder that is missing).

    Raises:
        UserError: a ``dataset.json`` that is neither, or none of these (the folder named).
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    dj = os.path.join(data_dir, DATASET_JSON)
    if os.path.isfile(dj):
        obj = read_dataset_json(dj)
        if isinstance(obj.get("training"), list):
            return "decathlon"
        if "channel_names" in obj or "file_ending" in obj:
            return "nnunet"
        raise UserError(
            f"{dj} is neither an nnU-Net v2 dataset.json ({', '.join(NNUNET_KEYS)}) nor a Decathlon one "
            "(labels and a 'training' list of {image, label}); fix it or pass --layout"
        )
    if any(os.path.isdir(os.path.join(data_dir, d)) for d in (*RAW_IMAGE_DIRS, RAW_LABEL_DIR)):
        return "flare"
    raise UserError(
        f"--data_dir {data_dir}: unknown layout; expected a dataset.json (nnU-Net v2 raw: imagesTr/, labelsTr/; "
        "Medical Segmentation Decathlon: a 'training' list) or images/ and labels/ folders (FLARE 2022)"
    )


def dataset_labels(data_dir: str | os.PathLike, layout: str = "auto") -> LabelSet:
    """The label set of a raw labelled data set: its ``dataset.json``'s, FLARE's for the FLARE layout.

    Raises:
        UserError: as :func:`detect_layout` and :func:`parse_label_set`.
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    layout = detect_layout(data_dir) if layout == "auto" else layout
    if layout == "flare":
        return FLARE_LABELS
    dj = os.path.join(data_dir, DATASET_JSON)
    obj = read_dataset_json(dj)
    if "labels" not in obj:
        raise UserError(f"{dj} has no 'labels' (label ids and names)")
    return parse_label_set(obj["labels"], dj)


@dataclass
class LabelledDataSet:
    """A labelled data set as found on disk (:func:`find_labelled_dataset`).

    Attributes:
        layout: ``"flare"``, ``"nnunet"`` or ``"decathlon"``.
        root: the data set folder (absolute).
        labels: its label set.
        cases: ``{case: {"image": path or None, "label": path or None}}`` of every case with
            a file or an entry, sorted by case id (absolute paths).
        missing: ``{case: one line}`` for the cases whose image or label is missing.
        test_images: images without labels that the data set ships (``imagesTs/``, the
            Decathlon's ``"test"`` list): ``{case: path}``.
        channel: the image channel read (nnU-Net), None for one-channel layouts.
        dataset_json: the description file, None for FLARE.
    """

    layout: str
    root: str
    labels: LabelSet
    cases: dict[str, dict[str, str | None]]
    missing: dict[str, str]
    test_images: dict[str, str] = field(default_factory=dict)
    channel: int | None = None
    dataset_json: str | None = None

    @property
    def complete_cases(self) -> list[str]:
        """Cases with both an image and a label, sorted."""
        return [c for c in self.cases if c not in self.missing]


def find_labelled_dataset(
    data_dir: str | os.PathLike, layout: str = "auto", channel: int | None = None
) -> LabelledDataSet:
    """Find the cases, label set and test images of a labelled data set in any layout.

    Args:
        data_dir: the data set folder.
        layout: ``"auto"`` (:func:`detect_layout`) or one of :data:`LAYOUTS`.
        channel: nnU-Net only: which image channel (``<case>_<XXXX>.nii.gz``) to read; needed
            when ``dataset.json`` declares several (CT is one channel).

    Raises:
        UserError: an unknown layout; a ``dataset.json`` that is unreadable, incomplete, or
            disagrees with the files (case count, channels, file names); a multi-channel data
            set without ``channel``; image and label folders that are missing or hold no NIfTI.
            Cases whose image or label is missing are not errors: they are in ``missing``.
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    if layout == "auto":
        layout = detect_layout(data_dir)
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if layout == "flare":
        if channel is not None:
            raise UserError("--channel picks a channel file of an nnU-Net data set; FLARE 2022 images have one channel")
        found = find_labelled_cases(data_dir)
        img_dir, lab_dir = raw_image_dir(data_dir), os.path.join(data_dir, RAW_LABEL_DIR)
        missing = {}
        for c, e in found.items():
            if e["image"] is None:
                missing[c] = f"case {c} has label {e['label']} but no image {img_dir}/{c}{MODALITY_SUFFIX}.nii.gz"
            elif e["label"] is None:
                missing[c] = f"case {c} has image {e['image']} but no label {lab_dir}/{c}.nii.gz"
        return LabelledDataSet("flare", data_dir, FLARE_LABELS, found, missing)
    dj = os.path.join(data_dir, DATASET_JSON)
    obj = read_dataset_json(dj)
    if layout == "nnunet":
        return _nnunet_dataset(data_dir, dj, obj, channel)
    return _decathlon_dataset(data_dir, dj, obj, channel)


def _nnunet_channel_files(folder: str, ending: str, channels: Sequence[int], dj: str) -> dict[str, dict[int, str]]:
    """``{case: {channel: path}}`` of an nnU-Net image folder (``<case>_<XXXX><ending>``)."""
    pat = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(ending)}$")
    out: dict[str, dict[int, str]] = {}
    for p in _list_files(folder, (ending,)):
        m = pat.match(os.path.basename(p))
        if m is None:
            raise UserError(f"{p} is not named <case>_<XXXX>{ending} (nnU-Net v2: XXXX is the channel, e.g. _0000)")
        ch = int(m.group("ch"))
        if ch not in channels:
            raise UserError(f"{p} is channel {ch}, but {dj} declares the channels {list(channels)}")
        out.setdefault(m.group("case"), {})[ch] = p
    return out


def _nnunet_dataset(data_dir: str, dj: str, obj: dict[str, Any], channel: int | None) -> LabelledDataSet:
    absent = [k for k in NNUNET_KEYS if k not in obj]
    if absent:
        raise UserError(f"{dj} has no {absent[0]!r}: an nnU-Net v2 dataset.json holds {', '.join(NNUNET_KEYS)}")
    if "dataset" in obj:
        raise UserError(
            f"{dj} lists its files under 'dataset' (nnU-Net's explicit file lists), which this project does not "
            "read; put the files in imagesTr/ and labelsTr/"
        )
    ending = obj["file_ending"]
    if ending not in _NIFTI_EXTS:
        raise UserError(f"{dj}: file_ending {ending!r} is not NIfTI; this project reads .nii.gz and .nii files")
    names = obj["channel_names"]
    try:
        channels = sorted(int(k) for k in names) if isinstance(names, dict) else []
    except (TypeError, ValueError):
        channels = []
    if not channels or channels != list(range(len(channels))):
        raise UserError(f"{dj}: channel_names must map the channel numbers 0, 1, ... to names, got {names!r}")
    described = ", ".join(f"{k} {v}" for k, v in names.items())
    if channel is None:
        if len(channels) > 1:
            raise UserError(
                f"{dj} declares {len(channels)} image channels ({described}); CT is one channel: pick one with "
                "--channel k"
            )
        channel = 0
    elif channel not in channels:
        raise UserError(f"--channel {channel}: {dj} declares the channels {described}")
    if str(names.get(str(channel), "")).strip().lower() != "ct":
        logger.warning(
            "channel %d of %s is %r, not CT: the preprocessing's HU window assumes CT", channel, dj, names[str(channel)]
        )
    n_train = obj["numTraining"]
    if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 0:
        raise UserError(f"{dj}: numTraining must be a count of cases, got {n_train!r}")
    labels = parse_label_set(obj["labels"], dj)
    img_dir, lab_dir = os.path.join(data_dir, NNUNET_IMAGE_DIR), os.path.join(data_dir, NNUNET_LABEL_DIR)
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise UserError(f"{data_dir} has no {os.path.basename(d)}/ folder: expected the nnU-Net v2 raw layout")
    images = _nnunet_channel_files(img_dir, ending, channels, dj)
    labs = {os.path.basename(p)[: -len(ending)]: p for p in _list_files(lab_dir, (ending,))}
    names_all = sorted(set(images) | set(labs))
    if len(names_all) != n_train:
        raise UserError(
            f"{dj} declares numTraining {n_train}, but {img_dir} and {lab_dir} hold {len(names_all)} cases; "
            "fix numTraining or the files"
        )
    cases: dict[str, dict[str, str | None]] = {}
    missing: dict[str, str] = {}
    for c in names_all:
        image, label = images.get(c, {}).get(channel), labs.get(c)
        cases[c] = {"image": image, "label": label}
        if image is None:
            have = f"label {label}" if label else f"channels {sorted(images.get(c, {}))}"
            missing[c] = f"case {c} has {have} but no image {img_dir}/{c}_{channel:04d}{ending}"
        elif label is None:
            missing[c] = f"case {c} has image {image} but no label {lab_dir}/{c}{ending}"
    test: dict[str, str] = {}
    ts_dir = os.path.join(data_dir, NNUNET_TEST_DIR)
    if os.path.isdir(ts_dir):
        test = {
            c: ch[channel] for c, ch in _nnunet_channel_files(ts_dir, ending, channels, dj).items() if channel in ch
        }
    return LabelledDataSet("nnunet", data_dir, labels, cases, missing, test, channel, dj)


def _decathlon_file(root: str, entry: Any, key: str, where: str) -> str:
    p = entry.get(key) if isinstance(entry, dict) else entry
    if not isinstance(p, str) or not p:
        raise UserError(f"{where} is {entry!r}; expected {{'image': path, 'label': path}} relative to the data set")
    return os.path.normpath(os.path.join(root, p))


def _nnunet_v1_image(path: str) -> str:
    """nnU-Net v1's raw layout lists ``imagesTr/x.nii.gz`` but stores ``imagesTr/x_0000.nii.gz``:
    that file when only it exists, else ``path``."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    for ext in _NIFTI_EXTS:
        if name.endswith(ext):
            alt = os.path.join(os.path.dirname(path), name[: -len(ext)] + MODALITY_SUFFIX + ext)
            if os.path.isfile(alt):
                return alt
    return path


def _decathlon_dataset(data_dir: str, dj: str, obj: dict[str, Any], channel: int | None) -> LabelledDataSet:
    if channel is not None:
        raise UserError(
            "--channel picks a channel file of an nnU-Net v2 data set; a Decathlon image holds its modalities in one file"
        )
    if "labels" not in obj:
        raise UserError(f"{dj} has no 'labels' (label ids and names)")
    modality = obj.get("modality")
    if isinstance(modality, dict) and len(modality) > 1:
        desc = ", ".join(f"{k} {v}" for k, v in modality.items())
        raise UserError(
            f"{dj} declares {len(modality)} modalities ({desc}) stacked in each image; this project reads one-channel "
            "CT (convert the data set to nnU-Net v2 and pick the channel with --channel)"
        )
    training = obj["training"]
    n = obj.get("numTraining")
    if n is not None and n != len(training):
        raise UserError(f"{dj} declares numTraining {n!r} but lists {len(training)} training cases")
    labels = parse_label_set(obj["labels"], dj)
    cases: dict[str, dict[str, str | None]] = {}
    missing: dict[str, str] = {}
    for k, e in enumerate(training):
        where = f"{dj}: training entry {k}"
        image = _nnunet_v1_image(_decathlon_file(data_dir, e, "image", where))
        label = _decathlon_file(data_dir, e, "label", where)
        if not is_nifti(image) or not is_nifti(label):
            raise UserError(f"{where} names {image} and {label}; this project reads .nii.gz and .nii files")
        case = case_id_from_path(image)
        if case in cases:
            raise UserError(f"{where}: case {case!r} is listed twice")
        has_img, has_lab = os.path.isfile(image), os.path.isfile(label)
        cases[case] = {"image": image if has_img else None, "label": label if has_lab else None}
        if not has_img:
            missing[case] = f"case {case} is listed in {dj} but its image {image} is missing"
        elif not has_lab:
            missing[case] = f"case {case} is listed in {dj} but its label {label} is missing"
    listed = {os.path.normpath(e["image"]) for e in cases.values() if e["image"]}
    img_dir = os.path.join(data_dir, NNUNET_IMAGE_DIR)
    if os.path.isdir(img_dir):
        extra = [p for p in _list_files(img_dir, _NIFTI_EXTS) if os.path.normpath(p) not in listed]
        if extra:
            logger.warning("%d image(s) in %s are not in %s's training list and are not used", len(extra), img_dir, dj)
    test: dict[str, str] = {}
    for k, e in enumerate(obj.get("test") or []):
        p = _nnunet_v1_image(_decathlon_file(data_dir, e, "image", f"{dj}: test entry {k}"))
        if os.path.isfile(p) and is_nifti(p):
            test[case_id_from_path(p)] = p
    return LabelledDataSet("decathlon", data_dir, labels, dict(sorted(cases.items())), missing, test, None, dj)


def is_labelled_dataset(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` looks like a labelled data set: a ``dataset.json``, or ``images/``
    (or ``imgs/``) beside ``labels/``."""
    d = os.fspath(data_dir)
    return os.path.isfile(os.path.join(d, DATASET_JSON)) or (
        os.path.isdir(os.path.join(d, RAW_LABEL_DIR)) and any(os.path.isdir(os.path.join(d, x)) for x in RAW_IMAGE_DIRS)
    )


def find_images(
    data_dir: str | os.PathLike, layout: str = "auto", channel: int | None = None
) -> tuple[dict[str, str], str, int | None]:
    """The images to pretrain on: ``({case: path}, layout, channel)``.

    ``layout`` ``"tree"``: every NIfTI under ``data_dir`` (:func:`find_unlabelled_cases`).
    A labelled data set (``"flare"``, ``"nnunet"``, ``"decathlon"``): its images only, training
    and test (``imagesTs/``), never its label maps; ``channel`` as in :func:`find_labelled_dataset`
    (the channel read is returned). ``"auto"``: a labelled data set when
    :func:`is_labelled_dataset`, else a tree.

    Raises:
        UserError: as :func:`find_unlabelled_cases` / :func:`find_labelled_dataset`; two
            images with one case id; a data set without images.
    """
    data_dir = _require_dir(data_dir, "--data_dir")
    if layout == "auto":
        layout = detect_layout(data_dir) if is_labelled_dataset(data_dir) else "tree"
    if layout == "tree":
        if channel is not None:
            raise UserError(
                "--channel picks a channel file of an nnU-Net data set; give its folder and --layout nnunet"
            )
        return find_unlabelled_cases(data_dir), "tree", None
    ds = find_labelled_dataset(data_dir, layout, channel)
    out = {c: e["image"] for c, e in ds.cases.items() if e["image"]}
    for c, p in ds.test_images.items():
        if c in out:
            raise UserError(f"{p} and {out[c]} both map to case id {c!r}; keep one")
        out[c] = p
    if not out:
        raise UserError(f"the {ds.layout} data set {data_dir} holds no images")
    logger.info("%s data set %s: %d images (label maps left out)", ds.layout, data_dir, len(out))
    return dict(sorted(out.items())), ds.layout, ds.channel


# --------------------------------------------------------------------------------------
# Splits made here: deterministic, reusable
# --------------------------------------------------------------------------------------


def make_split(cases: Iterable[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A deterministic train / validation split of ``cases``.

    Cases are ordered by the SHA-256 of ``"<seed>:<case>"`` (no random generator whose stream
    could change between library versions; a case added later does not move the others);
    the first ``round(val_fraction * n)`` (at least 1, at most ``n - 1``) are validation cases,
    listed sorted, the others training cases, listed in that order, so the first N training
    cases (``--n_train_cases N``) are a random subset of them.

    Raises:
        UserError: ``val_fraction`` not in (0, 1), or fewer than 2 cases.
    """
    if not (0.0 < val_fraction < 1.0):
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    names = sorted(set(cases))
    if len(names) < 2:
        raise UserError(f"a split needs at least 2 labelled cases, found {len(names)}")
    order = sorted(names, key=lambda c: hashlib.sha256(f"{int(seed)}:{c}".encode()).hexdigest())
    n_val = min(max(int(math.floor(val_fraction * len(names) + 0.5)), 1), len(names) - 1)
    return {"train": order[n_val:], "val": sorted(order[:n_val])}


def split_file_record(split: Mapping[str, Sequence[str]], made_by: Mapping[str, Any]) -> dict[str, Any]:
    """What :data:`SPLIT_NAME` holds: ``{"train", "val", "made_by"}`` (``load_split`` reads it)."""
    return {"train": list(split["train"]), "val": list(split["val"]), "made_by": dict(made_by)}


def same_split_file(path: str, split: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``path`` exists and holds exactly ``split``'s lists (train order included).

    Raises:
        UserError: it exists and holds another split (both named), or cannot be read.
    """
    if not os.path.exists(path):
        return False
    have = load_split(path)
    if have["train"] != list(split["train"]) or have["val"] != list(split["val"]):
        raise UserError(
            f"{path} holds another split ({len(have['train'])} train / {len(have['val'])} val cases) than this "
            f"command makes ({len(split['train'])} / {len(split['val'])}); pass the flags that made it, "
            "or --overwrite to replace it"
        )
    return True


# --------------------------------------------------------------------------------------
# Listings for pretraining and fine-tuning
# --------------------------------------------------------------------------------------


def _check_finished(root: str, counts: dict[str, int], spatial_dims: int) -> None:
    """Refuse cases of a preprocessing output folder that the preprocessing did not finish.

    ``root`` holds a ``.manifest/`` folder; ``counts`` maps case -> number of files found.
    """
    mdir = os.path.join(root, MANIFEST_DIR)
    for case, n in sorted(counts.items()):
        mpath = os.path.join(mdir, case + ".json")
        if not os.path.isfile(mpath):
            raise UserError(
                f"case {case!r} in {root} was not finished by the preprocessing ({mpath} is missing); "
                "rerun the preprocessing script to complete it"
            )
        if spatial_dims == 2:
            try:
                with open(mpath) as f:
                    expected = int(json.load(f)["n_slices"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(
                    f"cannot read per-case manifest {mpath}: {e}; rerun the preprocessing script to redo the case"
                ) from None
            if expected != n:
                raise UserError(f"case {case!r} in {root} has {n} slice files but {mpath} records {expected}")


def _is_labelled_root(dirpath: str, dirnames: Iterable[str]) -> str | None:
    """If ``dirpath`` is a labelled folder (image folder + labels/), the name of its image folder."""
    names = set(dirnames)
    if RAW_LABEL_DIR not in names:
        return None
    for d in (SLICE_IMAGE_DIR,) + RAW_IMAGE_DIRS:
        if d in names:
            return d
    return None


def list_pretrain_images(data_dir: str | os.PathLike, spatial_dims: int) -> list[str]:
    """All pretraining inputs under ``data_dir`` (recursively), as sorted absolute paths.

    2D: every ``*.png``; 3D: every ``*.nii.gz`` / ``*.nii``. In a labelled folder (one
    with an image folder - ``imgs/`` or ``images/`` - and ``labels/``) only the image
    folder is used, so label maps are never taken for images. Hidden files and folders
    (temporary files of atomic writes, ``.manifest/``) are skipped. Where a folder holds
    a preprocessing ``.manifest/``, every case found must be finished there.

    Raises:
        UserError: the folder is missing or empty, ``spatial_dims`` is not 2 or 3, the
            folder holds the other kind of data only (slices for 3D, volumes for 2D), or
            a case was left unfinished by an interrupted preprocessing run.
    """
    if spatial_dims not in (2, 3):
        raise UserError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    data_dir = _require_dir(data_dir, "pretraining data folder")
    pngs: list[str] = []
    niftis: list[str] = []
    # (root with .manifest) -> {case: n files}
    finished_roots: dict[str, dict[str, int]] = {}
    owner: dict[str, str | None] = {data_dir: None}
    for dirpath, dirnames, filenames in walk(data_dir):
        root = owner.get(dirpath)
        if MANIFEST_DIR in dirnames:
            root = dirpath
            finished_roots.setdefault(root, {})
        image_sub = _is_labelled_root(dirpath, dirnames)
        if image_sub is not None:
            dirnames[:] = [image_sub]
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            owner[os.path.join(dirpath, d)] = root
        for n in filenames:
            if n.startswith("."):
                continue
            p = os.path.join(dirpath, n)
            if n.endswith(".png"):
                pngs.append(p)
                if root is not None and spatial_dims == 2:
                    case = case_id_from_path(p, is_slice=True)
                    finished_roots[root][case] = finished_roots[root].get(case, 0) + 1
            elif is_nifti(n):
                niftis.append(p)
                if root is not None and spatial_dims == 3:
                    case = case_id_from_path(p)
                    finished_roots[root][case] = finished_roots[root].get(case, 0) + 1
    wanted, other = (pngs, niftis) if spatial_dims == 2 else (niftis, pngs)
    if not wanted:
        if other:
            kind = "NIfTI volumes (3D)" if spatial_dims == 2 else "PNG slices (2D)"
            want = "PNG slices (2D)" if spatial_dims == 2 else "NIfTI volumes (3D)"
            raise UserError(
                f"{data_dir} holds {len(other)} {kind} but no {want}: use --spatial_dims "
                f"{3 if spatial_dims == 2 else 2}, or preprocess with --spatial_dims {spatial_dims}"
            )
        raise UserError(f"{data_dir} holds no {'*.png' if spatial_dims == 2 else '*.nii.gz / *.nii'} files")
    for root, counts in finished_roots.items():
        _check_finished(root, counts, spatial_dims)
    return sorted(wanted)


def _pairs_2d(data_dir: str) -> list[dict[str, Any]]:
    img_dir = os.path.join(data_dir, SLICE_IMAGE_DIR)
    lab_dir = os.path.join(data_dir, SLICE_LABEL_DIR)
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            hint = ""
            if os.path.isdir(os.path.join(data_dir, "images")):
                hint = " (it looks like raw FLARE NIfTI: use spatial_dims 3 or run preprocess_flare_labelled.py)"
            raise UserError(f"{data_dir} has no {os.path.basename(d)}/ folder of slices{hint}")
    imgs = [os.path.basename(p) for p in _list_files(img_dir, (".png",))]
    labs = [os.path.basename(p) for p in _list_files(lab_dir, (".png",))]
    if not imgs and not labs:
        raise UserError(f"{img_dir} and {lab_dir} hold no .png slices")
    if imgs != labs:
        only_img = sorted(set(imgs) - set(labs))
        only_lab = sorted(set(labs) - set(imgs))
        first = min(only_img[:1] + only_lab[:1])
        if only_img and first == only_img[0]:
            raise UserError(
                f"image and label slices differ ({len(imgs)} vs {len(labs)}): "
                f"{os.path.join(img_dir, first)} has no label {os.path.join(lab_dir, first)}"
            )
        raise UserError(
            f"image and label slices differ ({len(imgs)} vs {len(labs)}): "
            f"{os.path.join(lab_dir, first)} has no image {os.path.join(img_dir, first)}"
        )
    items = []
    for n in imgs:
        case, z = parse_slice_name(os.path.join(img_dir, n))
        items.append({"image": os.path.join(img_dir, n), "label": os.path.join(lab_dir, n), "case": case, "slice": z})
    if os.path.isdir(os.path.join(data_dir, MANIFEST_DIR)):
        counts: dict[str, int] = {}
        for it in items:
            counts[it["case"]] = counts.get(it["case"], 0) + 1
        _check_finished(data_dir, counts, 2)
    return items


# --------------------------------------------------------------------------------------
# Folders written by the original code's preprocessing scripts
# --------------------------------------------------------------------------------------

#: ``<stem>_<i>.png`` with ``i`` not zero-padded: a slice of the original's preprocessing scripts.
_ORIGINAL_SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<i>0|[1-9]\d*)\.png$")
_INDEX_RE = re.compile(r"_(\d+)\.png$")


def _name_layout(name: str) -> str | None:
    """Which preprocessing wrote a slice named ``name``: "original" (an index of fewer than 4
    digits, e.g. ``_0.png``), "ioupos" (a zero-padded index, e.g. ``_0000.png``), or None (either)."""
    m = _INDEX_RE.search(name)
    if m is None:
        return None
    i = m.group(1)
    if len(i) < SLICE_DIGITS:
        return "original"
    return "ioupos" if i[0] == "0" else None


def detect_slice_layout(
    data_dir: str | os.PathLike, names: Iterable[str], requested: str = "auto", flag: str = "--slice_layout"
) -> str:
    """The slice layout (:data:`SLICE_LAYOUTS`) of a preprocessed 2D folder.

    ``requested`` "auto": "original" when the slice names are the original scripts' (every
    case has a slice ``<stem>_0.png``, an index this project never writes: it pads to 4
    digits) and the folder has no ``manifest.json`` / ``.manifest/``; "ioupos" otherwise.

    Args:
        names: the folder's PNG slice names (or paths).
        requested: "auto" or a layout given by ``flag``, returned as it is.

    Raises:
        UserError: an unknown layout, or a folder mixing both kinds of names (both named).
    """
    if requested != "auto":
        if requested not in SLICE_LAYOUTS:
            raise UserError(f"{flag} must be auto or one of {', '.join(SLICE_LAYOUTS)}, got {requested!r}")
        return requested
    data_dir = os.path.abspath(os.fspath(data_dir))
    first: dict[str, str | None] = {"original": None, "ioupos": None}
    for n in names:
        kind = _name_layout(os.path.basename(os.fspath(n)))
        if kind is not None and first[kind] is None:
            first[kind] = os.fspath(n)
    if first["original"] is None:
        return "ioupos"
    ours = first["ioupos"]
    for marker in (MANIFEST_NAME, MANIFEST_DIR):
        if ours is None and os.path.exists(os.path.join(data_dir, marker)):
            ours = os.path.join(data_dir, marker)
    if ours is not None:
        raise UserError(
            f"{data_dir} mixes this project's preprocessing ({ours}) with slices named as the original code's "
            f"scripts name them ({first['original']}); keep one kind in a folder, or pass {flag}"
        )
    return "original"


def labelled_slice_layout(data_dir: str | os.PathLike, requested: str = "auto") -> str:
    """:func:`detect_slice_layout` of a labelled 2D folder (its ``imgs/`` and ``labels/`` names)."""
    names: list[str] = []
    for sub in (SLICE_IMAGE_DIR, SLICE_LABEL_DIR):
        folder = os.path.join(os.fspath(data_dir), sub)
        if os.path.isdir(folder):
            names += [os.path.basename(p) for p in _list_files(folder, (".png",))]
    return detect_slice_layout(data_dir, names, requested)


def _original_slices(folder: str, is_label: bool) -> dict[tuple[str, int], str]:
    """``{(case, i): path}`` of an original-layout slice folder: images ``<case>_0000_<i>.png``
    (the raw image's stem), labels ``<case>_<i>.png``.

    Raises:
        UserError: a PNG not named ``<stem>_<i>.png``, or two files of one slice (both named).
    """
    out: dict[tuple[str, int], str] = {}
    for p in _list_files(folder, (".png",)):
        m = _ORIGINAL_SLICE_RE.match(os.path.basename(p))
        if m is None:
            raise UserError(
                f"{p} is not named <stem>_<i>.png as the original code's preprocessing names its slices "
                f"(or pass --slice_layout ioupos for this project's layout)"
            )
        stem = m.group("stem")
        case = stem if is_label else case_id_from_path(stem)
        key = (case, int(m.group("i")))
        if key in out:
            raise UserError(f"{p} and {out[key]} are both slice {key[1]} of case {case!r}; keep one")
        out[key] = p
    return out


def _pairs_2d_original(data_dir: str) -> list[dict[str, Any]]:
    """(image, label) slice pairs of a folder written by the original's ``preprocess_flare_labelled.py``."""
    img_dir = os.path.join(data_dir, SLICE_IMAGE_DIR)
    lab_dir = os.path.join(data_dir, SLICE_LABEL_DIR)
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise UserError(f"{data_dir} has no {os.path.basename(d)}/ folder of slices")
    imgs, labs = _original_slices(img_dir, False), _original_slices(lab_dir, True)
    if not imgs and not labs:
        raise UserError(f"{img_dir} and {lab_dir} hold no .png slices")
    if set(imgs) != set(labs):
        only_img = sorted(set(imgs) - set(labs))
        only_lab = sorted(set(labs) - set(imgs))
        if only_img and (not only_lab or only_img[0] <= only_lab[0]):
            c, i = only_img[0]
            raise UserError(f"image slice {imgs[only_img[0]]} has no label {os.path.join(lab_dir, f'{c}_{i}.png')}")
        raise UserError(
            f"label slice {labs[only_lab[0]]} has no image slice {only_lab[0][1]} of case {only_lab[0][0]!r} in {img_dir}"
        )
    by_case: dict[str, list[int]] = {}
    for c, i in imgs:
        by_case.setdefault(c, []).append(i)
    for c, idx in sorted(by_case.items()):
        gap = sorted(set(range(max(idx) + 1)) - set(idx))
        if gap:
            raise UserError(
                f"case {c!r} in {img_dir} lacks slice {gap[0]} of 0..{max(idx)} (an interrupted preprocessing?); "
                "preprocess it again"
            )
    return [{"image": imgs[k], "label": labs[k], "case": k[0], "slice": k[1]} for k in sorted(imgs)]


def _pairs_3d(data_dir: str) -> list[dict[str, Any]]:
    if os.path.isfile(os.path.join(data_dir, DATASET_JSON)):  # nnU-Net v2 raw or Decathlon
        ds = find_labelled_dataset(data_dir)
        for why in ds.missing.values():
            logger.warning("%s; the case is left out", why)
        return [
            {"image": ds.cases[c]["image"], "label": ds.cases[c]["label"], "case": c, "slice": None}
            for c in ds.complete_cases
        ]
    if not any(os.path.isdir(os.path.join(data_dir, d)) for d in RAW_IMAGE_DIRS) and os.path.isdir(
        os.path.join(data_dir, SLICE_LABEL_DIR)
    ):
        raise UserError(f"{data_dir} has no images/ folder of NIfTI volumes")
    img_dir = raw_image_dir(data_dir)
    lab_dir = os.path.join(data_dir, RAW_LABEL_DIR)
    if not os.path.isdir(lab_dir):
        raise UserError(f"{data_dir} has no labels/ folder")
    imgs = {case_id_from_path(p): p for p in _list_files(img_dir, _NIFTI_EXTS)}
    labs = {strip_extension(os.path.basename(p)): p for p in _list_files(lab_dir, _NIFTI_EXTS)}
    if not imgs and not labs:
        pngs = _list_files(img_dir, (".png",))
        hint = " (it holds PNG slices: use spatial_dims 2)" if pngs else ""
        raise UserError(f"{img_dir} and {lab_dir} hold no .nii.gz / .nii volumes{hint}")
    if set(imgs) != set(labs):
        only_img = sorted(set(imgs) - set(labs))
        only_lab = sorted(set(labs) - set(imgs))
        if only_img and (not only_lab or only_img[0] <= only_lab[0]):
            raise UserError(f"image {imgs[only_img[0]]} has no label {os.path.join(lab_dir, only_img[0])}.nii.gz")
        raise UserError(f"label {labs[only_lab[0]]} has no image in {img_dir}")
    return [{"image": imgs[c], "label": labs[c], "case": c, "slice": None} for c in sorted(imgs)]


def _finetune_items(data_dir: str | os.PathLike, spatial_dims: int, layout: str) -> tuple[str, list[dict[str, Any]]]:
    """The checked folder and every (image, label) item in it, read as ``spatial_dims`` and
    (2D) ``layout`` say: what :func:`finetune_cases` and :func:`list_finetune_pairs` list."""
    if spatial_dims not in (2, 3):
        raise UserError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    data_dir = _require_dir(data_dir, "fine-tuning data folder")
    if spatial_dims == 3:
        return data_dir, _pairs_3d(data_dir)
    return data_dir, (_pairs_2d_original(data_dir) if layout == "original" else _pairs_2d(data_dir))


def finetune_cases(data_dir: str | os.PathLike, spatial_dims: int, layout: str = "ioupos") -> list[str]:
    """The cases of a fine-tuning data folder, sorted: in 2D those with slices, in 3D those with
    an image and a label (what :func:`make_split` splits for ``main_finetune.py --val_fraction``).
    ``layout``: 2D: the slices' layout, as for :func:`list_finetune_pairs`.

    Raises:
        UserError: as :func:`list_finetune_pairs`.
    """
    return sorted({it["case"] for it in _finetune_items(data_dir, spatial_dims, layout)[1]})


def list_finetune_pairs(
    data_dir: str | os.PathLike, split: dict[str, list[str]], spatial_dims: int, layout: str = "ioupos"
) -> dict[str, list[dict[str, Any]]]:
    """Fine-tuning (image, label) pairs of each split part.

    Args:
        data_dir: 2D: a ``preprocess_flare_labelled.py`` output (``imgs/`` and ``labels/``
            with identical slice names), or with ``layout`` "original" the output of the
            original code's script (``imgs/<case>_0000_<i>.png``, ``labels/<case>_<i>.png``).
            3D: a raw labelled data set: the FLARE layout (``images/`` or ``imgs/`` with
            ``<case>_0000.nii.gz``, ``labels/`` with ``<case>.nii.gz``), or nnU-Net v2 raw /
            Decathlon with a ``dataset.json`` (:func:`find_labelled_dataset`; cases with a missing
            file are left out, logged).
        split: ``{"train": [...], "val": [...]}`` as returned by :func:`load_split`.
        spatial_dims: 2 or 3.
        layout: 2D: the slices' layout (:data:`SLICE_LAYOUTS`; :func:`labelled_slice_layout` finds it).

    Returns:
        ``{"train": [...], "val": [...]}``; each item is ``{"image": path, "label": path,
        "case": case id, "slice": z (2D) or None (3D)}``, sorted by case then slice.
        Cases of the folder that the split does not name are left out.

    Raises:
        UserError: the folder is missing or empty, image and label files disagree (the
            first differing file is named), a split case has no files, or a case was left
            unfinished by an interrupted preprocessing run.
    """
    data_dir, items = _finetune_items(data_dir, spatial_dims, layout)
    by_case: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        by_case.setdefault(it["case"], []).append(it)
    out: dict[str, list[dict[str, Any]]] = {}
    where = os.path.join(data_dir, SLICE_IMAGE_DIR) if spatial_dims == 2 else data_dir
    for part in ("train", "val"):
        if part not in split:
            raise UserError(f"the split has no {part!r} list")
        missing = [c for c in split[part] if c not in by_case]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            what = "slices" if spatial_dims == 2 else "image and label"
            raise UserError(f"{part} case {missing[0]!r}{more} has no {what} in {where}")
        part_items: list[dict[str, Any]] = []
        for c in sorted(split[part]):
            part_items.extend(sorted(by_case[c], key=lambda it: -1 if it["slice"] is None else it["slice"]))
        out[part] = part_items
    unused = len(set(by_case) - set(split["train"]) - set(split["val"]))
    if unused:
        logger.info("%d case(s) in %s are in neither train nor val and are not used", unused, data_dir)
    return out


# --------------------------------------------------------------------------------------
# Fingerprints of a run's inputs (pinned on resume)
# --------------------------------------------------------------------------------------


def listing_fingerprint(root: str | os.PathLike, paths: Sequence[str]) -> str:
    """``"<n> files, <bytes> bytes, sha256 <16 hex digits>"`` over the paths (relative to
    ``root``) and sizes of ``paths``: files added, removed, renamed or resized change it.

    Raises:
        UserError: a file vanished.
    """
    root = os.path.abspath(os.fspath(root))
    h = hashlib.sha256()
    total = 0
    for p in sorted(os.fspath(x) for x in paths):
        try:
            size = os.stat(p).st_size
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror or e}") from None
        total += size
        h.update(f"{os.path.relpath(p, root)}\t{size}\n".encode())
    return f"{len(paths):,} files, {total:,} bytes, sha256 {h.hexdigest()[:16]}"


def split_fingerprint(split: Mapping[str, Sequence[str]]) -> str:
    """``"<n> train / <m> val cases, sha256 <16 hex digits>"`` of a split's case lists (order
    and formatting of the file do not count)."""
    canon = json.dumps({k: sorted(split[k]) for k in ("train", "val")}, sort_keys=True)
    n_tr, n_va = len(split["train"]), len(split["val"])
    return f"{n_tr} train / {n_va} val cases, sha256 {hashlib.sha256(canon.encode()).hexdigest()[:16]}"


def data_fingerprints(data_dir: str | os.PathLike, paths: Sequence[str], flag: str = "--data_dir") -> dict[str, str]:
    """Fingerprints of a data folder for :meth:`engine.RunFiles.pin_inputs`: its listing
    (:func:`listing_fingerprint` of ``paths``) and, when the preprocessing wrote one, its
    ``manifest.json`` (SHA-256 of the file)."""
    data_dir = os.path.abspath(os.fspath(data_dir))
    out = {f"data folder {flag}": listing_fingerprint(data_dir, paths)}
    manifest = os.path.join(data_dir, MANIFEST_NAME)
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            out[f"{MANIFEST_NAME} of {flag}"] = "sha256 " + hashlib.sha256(f.read()).hexdigest()[:16]
    return out


# --------------------------------------------------------------------------------------
# Evaluation cases (fine-tuning)
# --------------------------------------------------------------------------------------


def check_label_ids(label: np.ndarray | torch.Tensor, n_classes: int, path: str) -> None:
    """Refuse a label with an id above ``n_classes - 1`` (or below 0), naming the file.

    Args:
        label: a numpy array or a torch tensor (on any device) of class ids.
        n_classes: classes including background.
        path: the label's file, named in the error.

    Raises:
        UserError: the label is empty or holds an id outside ``0..n_classes-1``.
    """
    # torch tensors by their methods: this module reads files and does not import torch
    arr = label.detach().cpu().numpy() if hasattr(label, "detach") else np.asarray(label)
    if arr.size == 0:
        raise UserError(f"label {path} is empty")
    lo, hi = float(arr.min()), float(arr.max())
    if hi > n_classes - 1 or lo < 0:
        bad = hi if hi > n_classes - 1 else lo
        raise UserError(f"label {path} holds class id {bad:g}, outside 0..{n_classes - 1} (--n_classes {n_classes})")


@dataclass
class CaseRef:
    """One evaluation case.

    2D: ``slices`` lists the slice items ({"image", "label", "case", "slice"}) in slice
    order and ``spacing`` comes from ``manifest.json``. 3D: ``index`` is the case's index
    in the preprocessed data set and ``spacing`` is the preprocessing voxel size.
    """

    case: str
    spacing: tuple[float, float, float]
    slices: list[dict[str, Any]] = field(default_factory=list)
    index: int = -1
    layout: str = "ioupos"


def read_manifest_spacing(data_dir: str) -> dict[str, tuple[float, float, float]]:
    """Voxel size (x, y, z) in mm of every case of a ``preprocess_flare_labelled.py`` output.

    Raises:
        UserError: ``manifest.json`` is missing or does not hold a spacing per case.
    """
    path = os.path.join(data_dir, MANIFEST_NAME)
    try:
        with open(path) as f:
            manifest = json.load(f)
        cases = manifest["cases"]
        return {c: tuple(float(s) for s in v["spacing"]) for c, v in cases.items()}  # type: ignore[misc]
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing: the challenge-grade scores need each case's voxel size; "
            f"preprocess the data with preprocess_flare_labelled.py"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read the voxel sizes in {path}: {type(e).__name__}: {e}") from None


def read_manifest(data_dir: str) -> dict[str, Any]:
    """The ``manifest.json`` of a preprocessing output: ``{"format_version", "args" (the
    preprocessing arguments, ``preprocessing.PreprocessConfig.to_json()``), "n_cases",
    "n_slices", "cases": {case: {"shape", "spacing", "source", "label_source", ...}}}``.

    Raises:
        UserError: the file is missing, unreadable, or has no ``args`` / ``cases``.
    """
    path = os.path.join(data_dir, MANIFEST_NAME)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {data_dir} is not a finished preprocess_flare_*.py output") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("args"), dict) or "cases" not in manifest:
        raise UserError(f"{path} holds no preprocessing 'args' and 'cases'; rerun the preprocessing script")
    return manifest


def manifest_labels(manifest: Mapping[str, Any], where: str) -> LabelSet:
    """The label set a preprocessing recorded in its ``manifest.json`` (``args["labels"]``);
    FLARE 2022's 13 organs for a manifest that records none (FLARE data, older versions).

    Raises:
        UserError: a recorded label set that is not valid (``where`` named).
    """
    rec = (manifest.get("args") or {}).get("labels")
    if rec is None:
        return FLARE_LABELS
    return LabelSet(parse_label_set(rec, f"{where} ('labels' of its preprocessing arguments)").names, where)


def group_cases_2d(
    items: Sequence[dict[str, Any]], spacing: Mapping[str, Sequence[float]], where: str, layout: str = "ioupos"
) -> list[CaseRef]:
    """Group slice items by case (order kept) into :class:`CaseRef` objects (their slices of ``layout``).

    Raises:
        UserError: a case has no voxel size in the manifest at ``where``.
    """
    out: dict[str, CaseRef] = {}
    for it in items:
        c = it["case"]
        if c not in out:
            if c not in spacing:
                raise UserError(
                    f"case {c!r} is not in {os.path.join(where, MANIFEST_NAME)}; rerun preprocess_flare_labelled.py"
                )
            out[c] = CaseRef(case=c, spacing=tuple(float(s) for s in spacing[c]), layout=layout)  # type: ignore[arg-type]
        out[c].slices.append(it)
    return list(out.values())


def check_label_slices(
    items: Sequence[dict[str, Any]], n_classes: int, progress: bool = True, layout: str = "ioupos"
) -> None:
    """Read every label slice once and refuse ids above ``n_classes - 1``, or a label whose
    shape differs from its image's (read from the image's header); the file is named.

    Raises:
        UserError: a label file cannot be read, holds an id out of range, or does not match its image.
    """
    for it in tqdm(items, desc="checking labels", disable=not progress or len(items) < 200, leave=False):
        label = read_label_2d(it["label"], layout)
        check_label_ids(label, n_classes, it["label"])
        size = png_size(it["image"], layout)
        if tuple(label.shape) != tuple(size):
            raise UserError(
                f"image slice {it['image']} has shape {tuple(size)}, its label {it['label']} has {label.shape}"
            )


def load_case_2d(ref: CaseRef, n_classes: int, stored: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The case volume from its slices: image (X, Y, Z) float32, label (X, Y, Z) uint8, affine.

    The affine is ``diag(spacing)``: the geometry of the preprocessed case (RAS, origin 0).
    ``stored``: the image as stored in the PNGs (uint8 or uint16; 4 or 2 times smaller, for
    a cache; :func:`stored_to_float` converts it), float32 when the slices mix bit depths.

    Raises:
        UserError: slices of different shapes, or label ids outside the range (file named).
    """
    imgs, labs = [], []
    for it in ref.slices:
        img = read_image_2d_stored(it["image"], ref.layout)
        lab = read_label_2d(it["label"], ref.layout)
        if img.shape != lab.shape:
            raise UserError(f"image slice {it['image']} has shape {img.shape}, its label {it['label']} has {lab.shape}")
        if imgs and img.shape != imgs[0].shape:
            raise UserError(
                f"slice {it['image']} has shape {img.shape}, other slices of case {ref.case!r} have {imgs[0].shape}"
            )
        check_label_ids(lab, n_classes, it["label"])
        imgs.append(img)
        labs.append(lab)
    affine = np.diag([*ref.spacing, 1.0]).astype(np.float64)
    if not stored or len({a.dtype for a in imgs}) > 1:
        imgs = [stored_to_float(a) for a in imgs]
    return np.stack(imgs, axis=-1), np.stack(labs, axis=-1).astype(np.uint8), affine


class CaseCache:
    """Evaluation cases kept in memory after their first reading (``--cache_eval``).

    ``load(ref)`` returns what ``loader(ref)`` returned the first time for that case. 2D
    images are stored as read from the PNGs (uint8 / uint16): X * Y * 2 bytes per slice
    with the label, e.g. 1.9 GB for FLARE's 3,535 validation slices of 512 x 512.

    Args:
        loader: ``CaseRef -> (image, label, affine)``, e.g. :func:`load_case_2d` with ``stored=True``.
    """

    def __init__(self, loader: Callable[[CaseRef], tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.loader = loader
        self.cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def load(self, ref: CaseRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, label, affine)`` of ``ref``: read on the first call, from memory after."""
        hit = self.cases.get(ref.case)
        if hit is None:
            hit = self.cases[ref.case] = self.loader(ref)
        return hit

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached arrays."""
        return sum(a.nbytes for case in self.cases.values() for a in case)

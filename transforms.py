"""Every MONAI chain of the project: preprocessing, pretraining views, fine-tuning crops.

Preprocessing (:func:`preprocessing_transforms`; the preprocessing scripts and the 3D
fine-tuning data sets, :func:`preprocess_steps_3d`)::

    load (nibabel) -> channel first -> orient RAS -> resample to pixdim (bilinear image,
    nearest label) -> clip HU to [a_min, a_max], scale to [0, 1] -> crop to the body
    (image > 0) -> pad x and y to at least min_xy

Pretraining: each of the two IoU crops gets its own, independent chain, in the paper's
order and with its probabilities (:data:`augment_params.AUGMENT`, the table that
``batch_augment.py`` reads too)::

    zoom 0.8-1.2 (p 0.75) -> flip x (p 0.5) -> flip y (p 0.5) -> rotate k x 90 deg (p 0.5)
    -> intensity scale factor in [-0.1, 0.1] (p 0.75) -> intensity shift in [-0.1, 0.1] (p 0.75)
    -> Gaussian blur sigma 0.25-1.5 per axis (p 0.25) -> Gaussian noise sigma 0.01 (p 0.25)

The whole pretraining pipeline (:func:`pretrain_transforms`) for one image path::

    load (2D PNG slice via data.read_image_2d, or 3D volume via LoadImaged)
    -> pad to at least crop_size -> IoUCropd: two crops with IoU in [min_iou, max_iou]
    -> view chain on image1, an independent view chain on image2
    -> {"image1", "image2", "iou_value", "iou_feasible"}

Fine-tuning (:func:`random_crop_transforms`, after :class:`LoadSliceAndLabel2d` in 2D or
:func:`preprocess_steps_3d` in 3D): ``RandCropByPosNegLabeld`` crops, then flips x and y
(p 0.25), rotate 90 (p 0.25), then blur, intensity scale, intensity shift and noise
(p 0.15 each); geometric ones move image and label together.

The inverse of the preprocessing (:func:`invert_preprocessing`, MONAI's ``Invertd``) takes a
prediction made on the preprocessed grid back to the input's own grid: un-pad, un-crop,
resample back (nearest for labels), re-orient. ``predict.py`` uses it; the preprocessing
settings come from the fine-tuned checkpoint's record (:func:`preprocessing_from_record`).

Reading files is :mod:`data`'s (PNG slices, :class:`data.SliceCache`); the data sets that
run these chains are built in ``finetune.py`` and ``pretrain.py``.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImage,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    ScaleIntensityRanged,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.utils import is_positive
from monai.utils import TraceKeys, ensure_tuple

from augment_params import AUGMENT
from data import PNG_QUANTIZATIONS, SliceCache, label_from_stored, load_nifti, read_image_2d, read_label_2d
from iou_crops import IoUCropd
from utils import UserError, user_error_in

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Reading NIfTI in full
# --------------------------------------------------------------------------------------


class VerifiedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` reading each file in full through :func:`data.load_nifti`: a
    ``.nii.gz`` whose gzip CRC or length is wrong raises ``UserError`` naming the file instead
    of loading as wrong voxels (nibabel alone stops before the gzip trailer). Same arrays and
    metadata as ``NibabelReader`` for a sound file."""

    def read(self, data: Sequence[str] | str, **kwargs: Any):
        filenames = ensure_tuple(data)
        self.filenames = filenames
        imgs = [correct_nifti_header_if_necessary(load_nifti(name)) for name in filenames]
        return imgs if len(filenames) > 1 else imgs[0]


def _only_verified(loader: LoadImage) -> LoadImage:
    """Drop every reader of ``loader`` but :class:`VerifiedNibabelReader` (in place; returns it)."""
    loader.readers = [r for r in loader.readers if isinstance(r, VerifiedNibabelReader)]
    return loader


def load_nifti_image(**kwargs: Any) -> LoadImage:
    """MONAI's ``LoadImage`` with :class:`VerifiedNibabelReader` as its only reader (MONAI would
    otherwise retry a file that fails the check with its other readers, which load it)."""
    return _only_verified(LoadImage(reader=VerifiedNibabelReader(), **kwargs))


def load_nifti_imaged(keys: Sequence[str], **kwargs: Any) -> LoadImaged:
    """``LoadImaged`` whose only reader is :class:`VerifiedNibabelReader` (see :func:`load_nifti_image`)."""
    t = LoadImaged(keys, reader=VerifiedNibabelReader(), **kwargs)
    _only_verified(t._loader)
    return t


class CheckSameShaped(MapTransform):
    """Refuse an item whose arrays under ``keys`` (channel first) differ in spatial shape,
    naming the files (``<key>_meta_dict`` or MetaTensor ``filename_or_obj``): an image and its
    label must cover the same voxels.

    Raises:
        UserError: the shapes differ.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        shapes = {k: tuple(d[k].shape[1:]) for k in keys}
        if len(set(shapes.values())) > 1:
            names = [str(getattr(d[k], "meta", {}).get("filename_or_obj", k)) for k in keys]
            listing = ", ".join(f"{n} has {shapes[k]}" for n, k in zip(names, keys))
            raise UserError(f"image and label differ in shape: {listing}")
        return d


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------

#: The orientation of every preprocessed volume: voxel indices grow towards the patient's
#: right (x), anterior (y) and superior (z), nibabel's / MONAI's axis codes "RAS".
ORIENTATION = "RAS"
#: Version of the preprocessing record stored in fine-tuned checkpoints (:func:`preprocessing_record`).
PREPROCESSING_RECORD_VERSION = 1


def preprocessing_transforms(
    keys: Sequence[str] = ("image", "label"),
    a_min: float = -500.0,
    a_max: float = 500.0,
    pixdim: Sequence[float] = (1.0, 1.0, 2.5),
    min_xy: int = 96,
    load: bool = True,
) -> Compose:
    """The paper's preprocessing as MONAI dictionary transforms.

    Load (nibabel) -> channel first -> orient RAS -> resample to ``pixdim`` (bilinear
    image, nearest label) -> clip HU to [a_min, a_max] and scale to [0, 1] -> crop to
    the box where the image is > 0 (HU > a_min) -> pad x and y to at least ``min_xy``.

    Args:
        keys: dictionary keys; the first is the image, an optional second the label.
        a_min, a_max: HU window mapped to [0, 1] (values outside are clipped).
        pixdim: output voxel size in mm (x, y, z).
        min_xy: x and y are zero-padded (symmetrically) to at least this size.
        load: include ``LoadImaged`` + ``EnsureChannelFirstd`` (inputs are file paths);
            with ``False`` the inputs must already be channel-first MetaTensors.

    Returns:
        ``monai.transforms.Compose``; outputs are (1, X, Y, Z) MetaTensors, image float32
        in [0, 1], label float32 holding the ids.

    Raises:
        ValueError: not one or two keys, or ``a_max <= a_min``.
    """
    keys = tuple(keys)
    if not 1 <= len(keys) <= 2:
        raise ValueError(f"keys must be (image,) or (image, label), got {keys}")
    if a_max <= a_min:
        raise ValueError(f"a_max ({a_max}) must be greater than a_min ({a_min})")
    image_key = keys[0]
    modes = ("bilinear", "nearest")[: len(keys)]
    steps: list = []
    if load:
        steps += [
            load_nifti_imaged(keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
        ]
        if len(keys) == 2:
            steps.append(CheckSameShaped(keys=keys))
    steps += [
        Orientationd(keys=keys, axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(float(p) for p in pixdim), mode=modes),
        ScaleIntensityRanged(keys=image_key, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key=image_key, select_fn=is_positive),
        SpatialPadd(keys=keys, spatial_size=(int(min_xy), int(min_xy), -1)),
    ]
    return Compose(steps)


def preprocessing_record(
    spatial_dims: int,
    a_min: float,
    a_max: float,
    pixdim: Sequence[float],
    min_xy: int,
    png_bits: int | None,
    source: str,
    png_quantization: str | None = "round",
) -> dict[str, Any]:
    """How a model's input was preprocessed, as stored in its fine-tuned checkpoint
    (``"preprocessing"``) and in an exported model card.

    Args:
        spatial_dims: 2 (the model saw axial (X, Y) slices) or 3 (volumes).
        a_min, a_max, pixdim, min_xy: :func:`preprocessing_transforms`'s arguments.
        png_bits: 2D: the image PNGs' bits (8 or 16): the model saw ``q(v * 255) / 255``
            (or 65535); None: float32 values as the chain gives them (3D).
        source: where the settings were read (a ``manifest.json``, or the 3D chain).
        png_quantization: with ``png_bits``: ``q``, "truncate" or "round" (records written
            before it existed hold none: "round"); None without ``png_bits``.

    Raises:
        ValueError: a value out of range (names it).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if png_bits not in (None, 8, 16):
        raise ValueError(f"png_bits must be None, 8 or 16, got {png_bits!r}")
    if png_bits is None:
        png_quantization = None
    elif png_quantization not in PNG_QUANTIZATIONS:
        raise ValueError(f"png_quantization must be one of {PNG_QUANTIZATIONS}, got {png_quantization!r}")
    if not float(a_max) > float(a_min):
        raise ValueError(f"a_max ({a_max}) must be greater than a_min ({a_min})")
    pix = [float(p) for p in pixdim]
    if len(pix) != 3 or not all(np.isfinite(p) and p > 0 for p in pix):
        raise ValueError(f"pixdim must be three positive numbers, got {list(pixdim)}")
    if int(min_xy) < 1:
        raise ValueError(f"min_xy must be positive, got {min_xy}")
    return {
        "version": PREPROCESSING_RECORD_VERSION,
        "spatial_dims": int(spatial_dims),
        "orientation": ORIENTATION,
        "pixdim": pix,
        "interpolation": {"image": "bilinear", "label": "nearest"},
        "a_min": float(a_min),
        "a_max": float(a_max),
        "scale_to": [0.0, 1.0],
        "crop_foreground": "box of the voxels with image > 0 (HU > a_min)",
        "min_xy": int(min_xy),
        "png_bits": None if png_bits is None else int(png_bits),
        "png_quantization": png_quantization,
        "source": str(source),
    }


def check_preprocessing_record(record: Any, where: str) -> dict[str, Any]:
    """Validate a stored :func:`preprocessing_record` (``where`` names the file in messages).

    Raises:
        UserError: not a record of a version this code reads, an orientation other than
            :data:`ORIENTATION`, or a value out of range.
    """
    if not isinstance(record, Mapping) or record.get("version") != PREPROCESSING_RECORD_VERSION:
        version = record.get("version") if isinstance(record, Mapping) else type(record).__name__
        raise UserError(
            f"{where}: preprocessing record of version {version!r}; this code reads version {PREPROCESSING_RECORD_VERSION}"
        )
    if record.get("orientation") != ORIENTATION:
        raise UserError(
            f"{where}: the model was trained on {record.get('orientation')!r}-oriented data; "
            f"this code preprocesses to {ORIENTATION!r} only"
        )
    try:
        return preprocessing_record(
            record["spatial_dims"],
            record["a_min"],
            record["a_max"],
            record["pixdim"],
            record["min_xy"],
            record["png_bits"],
            record["source"],
            record.get("png_quantization", "round"),  # records written before it existed: rounded
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: bad preprocessing record ({type(e).__name__}: {e})") from None


def preprocessing_from_record(
    record: Mapping[str, Any], keys: Sequence[str] = ("image",), load: bool = False
) -> Compose:
    """:func:`preprocessing_transforms` with the ``a_min``, ``a_max``, ``pixdim`` and ``min_xy``
    of ``record``: a :func:`preprocessing_record` (then, ``load=False``, the chain the model's
    training data went through) or ``finetune.preprocess_config_3d``'s settings."""
    return preprocessing_transforms(
        keys=keys,
        a_min=record["a_min"],
        a_max=record["a_max"],
        pixdim=record["pixdim"],
        min_xy=record["min_xy"],
        load=load,
    )


def invert_preprocessing(
    pred: torch.Tensor | np.ndarray, image: MetaTensor, pipeline: Compose, nearest: bool = True
) -> MetaTensor:
    """Take ``pred``, made on the grid of the preprocessed ``image``, back to ``image``'s
    original grid with MONAI's ``Invertd``: un-pad, un-crop (zeros outside the crop),
    resample back, re-orient; in reverse order of ``image.applied_operations``.

    Args:
        pred: (C, X', Y', Z') on the preprocessed grid (class ids or per-class maps).
        image: the preprocessed image, a MetaTensor carrying the applied operations of
            ``pipeline`` (as :func:`preprocessing_transforms` returns it).
        pipeline: the chain that made ``image`` (``load=False``, key ``"image"``).
        nearest: resample with nearest neighbour (label ids); False: the chain's own
            interpolation (bilinear: probabilities).

    Returns:
        (C, X, Y, Z) MetaTensor in the input's voxel order with its affine.

    Example: the real CT of 122 x 101 x 30 voxels of 3 mm becomes (1, 362, 287, 36) after
    preprocessing; a (1, 362, 287, 36) label map comes back as (1, 122, 101, 30).

    Raises:
        ValueError: ``pred``'s spatial shape differs from ``image``'s.
    """
    if tuple(pred.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(
            f"pred has spatial shape {tuple(pred.shape[1:])}, the preprocessed image {tuple(image.shape[1:])}"
        )
    ops = _traced_by(image, pipeline)
    t = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
    src = MetaTensor(image.as_tensor(), meta=image.meta, applied_operations=ops)
    d = {"image": src, "pred": MetaTensor(t)}
    return Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=nearest)(d)["pred"]


def _traced_by(image: MetaTensor, pipeline: Compose) -> list:
    """``image.applied_operations``, checked to be those of a chain like ``pipeline`` (the same
    operations in the same order) and marked for MONAI's inverse as coming from ``pipeline``.

    MONAI matches each recorded operation to the transform object that made it by ``id``;
    the image may come from a copy of the chain (a data-loader worker, or a chain rebuilt
    from the same settings), so the ids are replaced by MONAI's "skip the id check" marker
    after comparing the operation names with those the chain records on a small volume
    (:func:`_chain_operations`).

    Raises:
        ValueError: the operations differ from the chain's.
    """
    want = list(_chain_operations(pipeline))
    got = [op.get(TraceKeys.CLASS_NAME) for op in image.applied_operations]
    if got != want:
        raise ValueError(f"the image was made by the operations {got}, not by this chain's {want}")
    ops = copy.deepcopy(list(image.applied_operations))
    _skip_id_checks(ops)
    return ops


#: :func:`_chain_operations`' answers, by chain object (dropped with the chain).
_CHAIN_OPERATIONS: weakref.WeakKeyDictionary[Compose, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _chain_operations(pipeline: Compose) -> tuple[str, ...]:
    """The names of the operations ``pipeline`` records, in order, from one run on a small
    probe volume; run once per chain object (a chain is not changed once built: predict
    inverts every case, and every class of it, with the same one)."""
    want = _CHAIN_OPERATIONS.get(pipeline)
    if want is None:
        # a small volume above any HU window: every step records its operation (nothing is cropped away)
        probe = MetaTensor(torch.full((1, 4, 4, 4), 1e4), affine=torch.eye(4, dtype=torch.float64))
        want = tuple(op[TraceKeys.CLASS_NAME] for op in pipeline({"image": probe})["image"].applied_operations)
        _CHAIN_OPERATIONS[pipeline] = want
    return want


def _skip_id_checks(obj: Any) -> None:
    """Set every recorded operation's id, nested ones included (e.g. the padding that
    ``CropForeground`` keeps in its ``extra_info``), to MONAI's "skip the id check" marker."""
    if isinstance(obj, dict):
        if TraceKeys.ID in obj and TraceKeys.CLASS_NAME in obj:
            obj[TraceKeys.ID] = TraceKeys.NONE
        for v in obj.values():
            _skip_id_checks(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _skip_id_checks(v)


class KeepAffined(MapTransform):
    """Store the affine of the image under ``key`` (a MetaTensor, e.g. after preprocessing)
    as a plain float64 tensor under ``affine_key``, so that it survives ``track_meta=False``."""

    def __init__(self, key: str = "image", affine_key: str = "affine") -> None:
        super().__init__(keys=[key])
        self.affine_key = affine_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.affine_key] = torch.as_tensor(np.asarray(d[key].affine), dtype=torch.float64)
        return d


def preprocess_steps_3d(config: Mapping[str, Any]) -> list:
    """The 3D fine-tuning preprocessing of (image, label) paths, as a flat list of steps:
    :func:`preprocessing_transforms` with ``config``'s ``a_min``, ``a_max``, ``pixdim`` and
    ``min_xy`` (``finetune.preprocess_config_3d``; :func:`preprocessing_from_record`), then
    :class:`KeepAffined`.

    Flat, not one nested ``Compose``: MONAI's ``PersistentDataset`` caches the transforms
    before the first random one, and it treats a nested ``Compose`` as random.
    """
    pre = preprocessing_from_record(config, keys=("image", "label"), load=True)
    return [*pre.flatten().transforms, KeepAffined()]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


class LoadSlice2Dd(MapTransform):
    """Replace the path under each key by the PNG slice it names, as a (1, X, Y) float32 array.

    Reading goes through :func:`data.read_image_2d` (8- or 16-bit PNG -> [0, 1]; ``layout``:
    this project's slices or the original code's, see ``data.SLICE_LAYOUTS``), or through
    ``cache`` (a :class:`SliceCache` holding every path, built with the same layout; same
    values); a corrupt or unreadable file raises ``UserError`` naming the file.
    """

    def __init__(self, keys: Sequence[str], cache: SliceCache | None = None, layout: str = "ioupos"):
        super().__init__(keys)
        self.cache = cache
        self.layout = layout

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.cache.read(d[key]) if self.cache is not None else read_image_2d(d[key], self.layout))[None]
        return d


class LoadSliceAndLabel2d(MapTransform):
    """Read an (image, label) PNG pair into (1, X, Y) float32 tensors under ``image`` and
    ``label`` (:func:`data.read_image_2d`, :func:`data.read_label_2d`), or take them from
    ``cache`` (a :class:`data.SliceCache` of both, built with the same layout; same values);
    the image's path is kept under ``image_path``. ``layout``: see :class:`LoadSlice2Dd`.

    Raises:
        UserError: a file is missing or cannot be read, or image and label differ in shape
            (names the files).
    """

    def __init__(self, cache: SliceCache | None = None, layout: str = "ioupos"):
        super().__init__(keys=["image", "label"])
        self.cache = cache
        self.layout = layout

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.cache is None:
            image, label = read_image_2d(data["image"], self.layout), read_label_2d(data["label"], self.layout)
        else:
            image = self.cache.read(data["image"])
            label = label_from_stored(self.cache.read_stored(data["label"]), data["label"])
        if image.shape != label.shape:
            raise UserError(
                f"image slice {data['image']} has shape {tuple(image.shape)}, its label {data['label']} has "
                f"{tuple(label.shape)}"
            )
        d["image"] = torch.from_numpy(image)[None]
        d["label"] = torch.from_numpy(label.astype(np.float32))[None]
        d["image_path"] = data["image"]
        return d


class LoadVolume3Dd(MapTransform):
    """Replace the path under each key by the NIfTI volume it names, channel first (1, X, Y, Z).

    MONAI's ``LoadImaged`` + ``EnsureChannelFirstd``, with any failure turned into a
    ``UserError`` that names the file.
    """

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        self.load = Compose(
            [
                load_nifti_imaged(keys, image_only=True, dtype=np.float32),
                EnsureChannelFirstd(keys),
            ]
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        try:
            return self.load(data)
        except Exception as e:
            found = user_error_in(e)
            if found is not None:
                raise found from None
            paths = ", ".join(str(data[k]) for k in self.key_iterator(dict(data)))
            cause = e.__cause__ if e.__cause__ is not None else e
            raise UserError(f"cannot read volume {paths}: {type(cause).__name__}: {str(cause).strip()[:200]}") from None


class PadToAtLeastd(MapTransform):
    """Zero-pad each key's channel-first image symmetrically to at least ``spatial_size``
    per spatial axis, and hand it on as a plain numpy array.

    The same values as MONAI's ``SpatialPadd(keys, spatial_size, mode="constant")``
    (``floor(d / 2)`` before, the rest after), without its metadata tracking: the IoU crops
    that follow are then cut by plain slicing. This step and the MetaTensor crops cost about
    three quarters of the data pipeline's time per pair when the views are augmented on the
    device (``--batch_augment``); the images need no metadata after loading.
    """

    def __init__(self, keys: Sequence[str], spatial_size: Sequence[int]):
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, MetaTensor):
                img = img.as_tensor()
            arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            if arr.ndim != len(self.spatial_size) + 1:
                raise ValueError(
                    f"PadToAtLeastd key {key!r}: expected a channel-first {len(self.spatial_size)}D image, got shape {arr.shape}"
                )
            extra = [max(0, s - n) for n, s in zip(arr.shape[1:], self.spatial_size)]
            if any(extra):
                arr = np.pad(arr, [(0, 0)] + [(e // 2, e - e // 2) for e in extra], mode="constant")
            d[key] = arr
        return d


# --------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------


def _blur(keys: Sequence[str], spatial_dims: int, prob: float) -> RandGaussianSmoothd:
    """Gaussian blur with a sigma drawn per axis in ``AUGMENT.blur_sigma`` (none along z in 2D)."""
    sig = AUGMENT.blur_sigma
    return RandGaussianSmoothd(
        keys, sigma_x=sig, sigma_y=sig, sigma_z=sig if spatial_dims == 3 else (0.0, 0.0), prob=prob
    )


def view_augmentations(key: str, spatial_dims: int) -> Compose:
    """The paper's augmentation chain for one pretraining view stored under ``key``.

    Build one chain per view: two chains draw independent random parameters.
    In 3D, flips act on x and y and rotations in the axial (x, y) plane, as in 2D.
    Gaussian noise uses MONAI's default of a standard deviation drawn in [0, ``noise_std``].
    Probabilities and ranges: :data:`augment_params.AUGMENT`.
    """
    k = [key]
    a = AUGMENT
    zmin, zmax = a.view_zoom_range
    return Compose(
        [
            RandZoomd(
                k,
                prob=a.view_zoom_prob,
                min_zoom=zmin,
                max_zoom=zmax,
                keep_size=True,
                mode="bilinear",
                padding_mode="constant",
            ),
            RandFlipd(k, prob=a.view_flip_prob, spatial_axis=0),
            RandFlipd(k, prob=a.view_flip_prob, spatial_axis=1),
            RandRotate90d(k, prob=a.view_rot90_prob, max_k=a.rot90_max_k, spatial_axes=(0, 1)),
            RandScaleIntensityd(k, factors=a.intensity_range, prob=a.view_intensity_prob),
            RandShiftIntensityd(k, offsets=a.intensity_range, prob=a.view_intensity_prob),
            _blur(k, spatial_dims, prob=a.view_blur_prob),
            RandGaussianNoised(k, prob=a.view_noise_prob, mean=0.0, std=a.noise_std),
        ]
    )


def finetune_augmentations(spatial_dims: int, image_key: str = "image", label_key: str = "label") -> Compose:
    """The paper's fine-tuning augmentations on an (image, label) crop: flips and rotate 90
    move image and label together, blur, scale, shift and noise change the image only.
    Probabilities and ranges: :data:`augment_params.AUGMENT`."""
    both = [image_key, label_key]
    img = [image_key]
    a = AUGMENT
    geo, inten = a.finetune_geometric_prob, a.finetune_intensity_prob
    return Compose(
        [
            RandFlipd(both, prob=geo, spatial_axis=0),
            RandFlipd(both, prob=geo, spatial_axis=1),
            RandRotate90d(both, prob=geo, max_k=a.rot90_max_k, spatial_axes=(0, 1)),
            _blur(img, spatial_dims, prob=inten),
            RandScaleIntensityd(img, factors=a.intensity_range, prob=inten),
            RandShiftIntensityd(img, offsets=a.intensity_range, prob=inten),
            RandGaussianNoised(img, prob=inten, mean=0.0, std=a.noise_std),
        ]
    )


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def pretrain_transforms(
    spatial_dims: int,
    crop_size: int,
    min_iou: float,
    max_iou: float,
    strict: bool = False,
    augment: bool = True,
    cache: SliceCache | None = None,
    sampler: str = "exact",
    layout: str = "ioupos",
) -> Compose:
    """The pretraining pipeline: image path in, two augmented IoU crops out.

    Input: ``{"image": path}`` (a PNG slice for ``spatial_dims`` 2, a preprocessed NIfTI
    volume for 3). Output: ``image1`` and ``image2`` (float32 tensors of shape
    ``(1, crop_size, ...)``), ``iou_value`` (the realised IoU of the two crops, before
    augmentation) and ``iou_feasible`` (False when the image admits no pair in the
    interval and the closest pair was used; the pretraining scripts log how often).

    Images smaller than the crop on an axis are zero-padded to it first (symmetrically).
    ``augment=False`` leaves out the view chains (the two crops as cut): for debugging, for
    tests that compare runs, and for ``--batch_augment``, where the chains run on the
    training device (``batch_augment.BatchViewAugment``). ``cache`` (2D only): read the
    slices from a :class:`SliceCache` instead of decoding the PNGs (same values).
    ``sampler``: ``"exact"`` (this project's crop-pair sampler) or ``"original"`` (the
    thesis' Algorithm 1, see ``iou_crops.OriginalIoUSampler``). ``layout`` (2D): how the
    slices lie on disk (``data.SLICE_LAYOUTS``: this project's or the original code's).

    Raises:
        ValueError: bad ``spatial_dims``, crop size or interval (from ``IoUCropd``), or a
            cache with ``spatial_dims`` 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if cache is not None and spatial_dims != 2:
        raise ValueError("an image cache holds 2D slices; it cannot serve spatial_dims 3")
    k = ["image"]
    if spatial_dims == 2:
        load: list = [LoadSlice2Dd(k, cache=cache, layout=layout)]
    else:
        load = [LoadVolume3Dd(k)]
    chain = [
        *load,
        PadToAtLeastd(k, spatial_size=[int(crop_size)] * spatial_dims),
        IoUCropd(
            k,
            spatial_dims,
            crop_size=crop_size,
            min_iou=min_iou,
            max_iou=max_iou,
            strict=strict,
            store_boxes=True,
            sampler=sampler,
        ),
        DeleteItemsd(["iou_start1", "iou_start2"]),
    ]
    if augment:
        chain += [view_augmentations("image1", spatial_dims), view_augmentations("image2", spatial_dims)]
    chain.append(EnsureTyped(["image1", "image2"], data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(chain)


def random_crop_transforms(spatial_dims: int, crop_size: int, n_crops: int, augment: bool = True) -> list:
    """Fine-tuning crops of a loaded (image, label) item: ``RandCropByPosNegLabeld`` (pos 1,
    neg 1, ``n_crops`` per item) + pad + the paper's augmentations, as a list of steps.

    Items smaller than the crop keep their size along that axis and are zero-padded to
    ``crop_size`` after cropping. ``augment=False`` leaves the augmentations out (``--batch_augment``
    applies them on the training device: ``batch_augment.BatchFinetuneAugment``). The
    batches hold ``image`` and ``label`` only.
    """
    keys = ["image", "label"]
    size = (int(crop_size),) * spatial_dims
    return [
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=size, pos=1, neg=1, num_samples=int(n_crops), allow_smaller=True
        ),
        SpatialPadd(keys, spatial_size=size),
        *(finetune_augmentations(spatial_dims).transforms if augment else ()),
        EnsureTyped(keys, track_meta=False),
        SelectItemsd(keys),  # batches hold image and label only
    ]

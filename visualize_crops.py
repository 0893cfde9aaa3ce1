"""Draw IoU crop pairs on slices: the two crops as coloured boxes, their IoU beside them.

The picture of the thesis' Figure 3.1, for any folder of preprocessed PNG slices
(8 or 16 bit) or NIfTI volumes and any IoU interval. For a volume the pair is drawn
from 3D crops and shown on the middle axial slice of the pair, with the IoU of the
3D crops.

    .venv/bin/python visualize_crops.py --input_dir data/flare_2d/imgs --min_iou 0.3 --max_iou 0.6 --output runs/crops_0.3_0.6.png
    .venv/bin/python visualize_crops.py --input_dir data/flare_2d/imgs --min_iou 0 --max_iou 0 --output runs/crops_0_0.png --n_images 4 --n_pairs_per_image 2
    .venv/bin/python visualize_crops.py --input_dir ../shared/data/real_ct/flare_layout/unlabelled --crop_size 64 64 32 --min_iou 0.3 --max_iou 0.6 --output /tmp/crops_3d.png
    .venv/bin/python visualize_crops.py --input_dir data/flare_2d/imgs --min_iou 0 --max_iou 0 --iou_sampler original --output runs/crops_0_0_original.png

Other scripts draw their own pairs with :func:`draw_crop_pairs`.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from data import load_nifti, verified_png_bytes
from iou_crops import IOU_SAMPLERS, crop_iou, make_sampler
from utils import UserError, atomic_write, check_outputs_apart, claim_outputs, prepare_output_file, run_cli

logger = logging.getLogger(__name__)

COLOURS = ("#ff3b30", "#00c7ff")  # first crop, second crop
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _as_pair_size(crop_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(crop_size, (int, np.integer)):
        return int(crop_size), int(crop_size)
    size = tuple(int(c) for c in crop_size)
    if len(size) != 2:
        raise ValueError(f"draw_crop_pairs needs a 2D crop size, got {size}")
    return size  # type: ignore[return-value]


def draw_crop_pairs(
    images: list[np.ndarray],
    pairs: list[tuple[Sequence[int], Sequence[int]]],
    crop_size: int | Sequence[int],
    output_path: str | Path,
    title: str | None = None,
    ious: list[float] | None = None,
    captions: list[str] | None = None,
    ncols: int = 4,
) -> Path:
    """Save a grid of 2D images, each with its crop pair drawn as two coloured boxes.

    Args:
        images: 2D arrays (rows, columns), one panel each.
        pairs: ``(start_a, start_b)`` per image, 2-int start corners in array order.
        crop_size: the 2D crop size (an int or two ints).
        output_path: PNG file to write (atomically; folders are created).
        title: figure title (e.g. the interval).
        ious: IoU to print per panel (default: the 2D IoU of the drawn boxes).
        captions: extra text per panel (e.g. the file name).
        ncols: panels per row.

    Returns:
        ``output_path`` as a Path.

    Raises:
        ValueError: lengths differ, an image is not 2D, or a box leaves its image.
    """
    # the backend is chosen here, at drawing time, and pyplot imported after it: choosing it when
    # this module is imported would impose Agg on every program that imports it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    size = _as_pair_size(crop_size)
    if len(images) != len(pairs) or not images:
        raise ValueError(
            f"need as many pairs as images (and at least one), got {len(images)} images, {len(pairs)} pairs"
        )
    for extra, name in ((ious, "ious"), (captions, "captions")):
        if extra is not None and len(extra) != len(images):
            raise ValueError(f"{name} has {len(extra)} entries for {len(images)} images")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, (start_a, start_b)) in enumerate(zip(images, pairs)):
        img = np.asarray(img)
        if img.ndim != 2:
            raise ValueError(f"image {i} has shape {img.shape}, expected a 2D array")
        for start in (start_a, start_b):
            if len(start) != 2 or any(s < 0 or s + c > dim for s, c, dim in zip(start, size, img.shape)):
                raise ValueError(f"box at {tuple(start)} of size {size} leaves image {i} of shape {img.shape}")
        ax = axes.ravel()[i]
        finite = img[np.isfinite(img)] if np.issubdtype(img.dtype, np.floating) else img
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        for start, colour, style in zip((start_a, start_b), COLOURS, ("-", "--")):
            ax.add_patch(
                Rectangle(
                    (start[1] - 0.5, start[0] - 0.5),
                    size[1],
                    size[0],
                    fill=False,
                    edgecolor=colour,
                    linewidth=2.0,
                    linestyle=style,
                )
            )
        iou = crop_iou(start_a, start_b, size) if ious is None else float(ious[i])
        text = f"IoU {iou:.3f}"
        if captions is not None and captions[i]:
            text += f"\n{captions[i]}"
        ax.set_title(text, fontsize=9)
    handles = [
        Rectangle((0, 0), 1, 1, fill=False, edgecolor=c, linewidth=2, linestyle=s) for c, s in zip(COLOURS, ("-", "--"))
    ]
    fig.legend(handles, ["crop 1", "crop 2"], loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    height = 3.6 * nrows
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - (0.45 / height if title else 0.0)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    output_path = Path(output_path)
    with atomic_write(output_path, "wb") as f:
        f.write(buf.getvalue())
    return output_path


# --------------------------------------------------------------------------- reading


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def list_images(input_dir: Path) -> list[Path]:
    """PNG and NIfTI files directly in ``input_dir``, sorted by name."""
    return sorted(p for p in input_dir.iterdir() if p.is_file() and (p.suffix.lower() == ".png" or _is_nifti(p)))


def read_image(path: Path) -> np.ndarray:
    """A PNG slice (8 or 16 bit grey, or colour converted to grey) or a NIfTI volume as an array.

    Raises:
        UserError: the file cannot be read or has an unexpected number of dimensions.
    """
    try:
        if _is_nifti(path):
            arr = np.asarray(load_nifti(path).dataobj)  # read in full, gzip checksum checked
            arr = arr.reshape([s for s in arr.shape if s != 1] if arr.ndim > 3 else arr.shape)
            if arr.ndim != 3:
                raise UserError(f"{path}: expected a 3D volume, got shape {arr.shape}")
            return arr
        with Image.open(io.BytesIO(verified_png_bytes(path))) as im:  # every chunk's CRC checked
            if im.mode in ("RGB", "RGBA", "P", "LA"):
                im = im.convert("L")
            arr = np.array(im)
    except UserError:
        raise
    except Exception as e:  # unreadable or truncated file
        raise UserError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise UserError(f"{path}: expected a 2D grey slice, got shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw IoU crop pairs on PNG slices or NIfTI volumes and save the grid as a PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("input and output")
    g.add_argument(
        "--input_dir",
        type=Path,
        required=True,
        help="folder of PNG slices (8 or 16 bit) or NIfTI volumes (.nii/.nii.gz); files are taken in name order",
    )
    g.add_argument(
        "--output",
        type=Path,
        required=True,
        help="PNG file to write (folders are created; checked before any work; not inside --input_dir)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even when it is a file this project did not write (refused by default)",
    )
    g.add_argument("--n_images", type=int, default=8, help="number of files to show (the first ones by name)")
    g.add_argument("--n_pairs_per_image", type=int, default=1, help="crop pairs drawn per file (one panel each)")
    g.add_argument("--ncols", type=int, default=4, help="panels per row of the grid")
    g = parser.add_argument_group("crops and interval")
    g.add_argument("--min_iou", type=float, default=0.3, help="lower end of the IoU interval")
    g.add_argument("--max_iou", type=float, default=0.6, help="upper end of the IoU interval")
    g.add_argument(
        "--crop_size",
        type=int,
        nargs="+",
        default=[96],
        help="crop size: one int, or one per axis (2 for slices, 3 for volumes, e.g. 64 64 32)",
    )
    g.add_argument(
        "--iou_sampler",
        choices=IOU_SAMPLERS,
        default="exact",
        help="exact: this project's sampler; original: the thesis' Algorithm 1 (r1 = 30, r2 = 4, then the last pair "
        "drawn whatever its IoU), whose misses are marked in the captions",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the crop sampler; change it for other pairs")
    return parser


def main(args: argparse.Namespace) -> Path:
    if not args.input_dir.is_dir():
        raise UserError(f"--input_dir {str(args.input_dir)!r} is not a folder")
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output {str(args.output)!r} must end in .png")
    check_outputs_apart({"--output": str(args.output)}, {"--input_dir": str(args.input_dir)})
    prepare_output_file(args.output, "--output")
    claim_outputs([args.output], args.overwrite, "--output")
    for name in ("n_images", "n_pairs_per_image", "ncols"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    files = list_images(args.input_dir)
    if not files:
        raise UserError(f"--input_dir {str(args.input_dir)!r} holds no .png, .nii or .nii.gz files")
    files = files[: args.n_images]
    crop = args.crop_size[0] if len(args.crop_size) == 1 else tuple(args.crop_size)
    try:
        sampler = make_sampler(args.iou_sampler, crop, args.min_iou, args.max_iou)
    except ValueError as e:
        raise UserError(str(e)) from None
    rng = np.random.default_rng(args.seed)

    images, pairs, ious, captions = [], [], [], []
    ndims = set()
    for path in files:
        arr = read_image(path)
        ndims.add(arr.ndim)
        if len(ndims) > 1:
            raise UserError(f"{path}: --input_dir mixes 2D slices and 3D volumes; use a folder of one kind")
        try:
            size = sampler.crop_size_for(arr.ndim)
            feasible = sampler.is_feasible(arr.shape)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        if not feasible:
            logger.warning(
                "%s (shape %s) admits no pair in [%s, %s]: drawing %s pairs",
                path.name,
                arr.shape,
                args.min_iou,
                args.max_iou,
                "the closest" if args.iou_sampler == "exact" else "Algorithm 1's fallback",
            )
        for _ in range(args.n_pairs_per_image):
            pair = sampler.sample_pair(arr.shape, rng)
            if not pair.feasible:
                note = (
                    " (closest; none in interval)" if args.iou_sampler == "exact" else " (fallback; none in interval)"
                )
            elif not args.min_iou <= pair.iou <= args.max_iou:
                note = " (fallback: outside the interval)"  # Algorithm 1 gave up after r2 x r1 draws
            else:
                note = ""
            if arr.ndim == 2:
                images.append(arr)
                pairs.append((pair.start_a, pair.start_b))
                captions.append(f"{path.name}{note}")
            else:
                # middle axial slice of the pair: the centre of the union of both z ranges
                z0 = min(pair.start_a[2], pair.start_b[2])
                z1 = max(pair.start_a[2], pair.start_b[2]) + size[2]
                z = (z0 + z1) // 2
                images.append(arr[:, :, z].T)  # x to the right, y upwards (with the flip below)
                pairs.append(((pair.start_a[1], pair.start_a[0]), (pair.start_b[1], pair.start_b[0])))
                za = f"{pair.start_a[2]}-{pair.start_a[2] + size[2] - 1}"
                zb = f"{pair.start_b[2]}-{pair.start_b[2] + size[2] - 1}"
                captions.append(f"{path.name} z={z}{note}\nz ranges {za} / {zb}")
            ious.append(pair.iou)
    if arr.ndim == 3:
        # show volumes with anterior up: flip rows and the boxes with them
        flipped_images, flipped_pairs = [], []
        for img, (a, b) in zip(images, pairs):
            flipped_images.append(img[::-1])
            h = img.shape[0]
            flipped_pairs.append(((h - a[0] - size[1], a[1]), (h - b[0] - size[1], b[1])))
        images, pairs = flipped_images, flipped_pairs
        box2d = (size[1], size[0])
    else:
        box2d = size
    title = f"IoU in [{args.min_iou}, {args.max_iou}], crops {'x'.join(map(str, size))}"
    if args.iou_sampler != "exact":
        title += f", {args.iou_sampler} sampler (Algorithm 1)"
    try:
        out = draw_crop_pairs(
            images, pairs, box2d, args.output, title=title, ious=ious, captions=captions, ncols=args.ncols
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    logger.info("wrote %s (%d panels from %d files)", out, len(images), len(files))
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())

"""Tests of visualize_crops.py on small synthetic PNG slices and NIfTI volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visualize_crops
from utils import UserError
from visualize_crops import draw_crop_pairs, get_args_parser, list_images, main, read_image


def _ellipses(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 20.0)
    for _ in range(3):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] += rng.uniform(60, 150)
    return img


@pytest.fixture
def png_dir(tmp_path: Path) -> Path:
    d = tmp_path / "slices"
    d.mkdir()
    for i, (h, w) in enumerate([(60, 50), (48, 64), (40, 40)]):
        img = _ellipses(h, w, i)
        if i == 1:
            Image.fromarray((img * 250).astype(np.uint16)).save(d / f"case_{i}.png")  # 16 bit
        else:
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"case_{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def _colour_pixels(path: Path, rgb: tuple[int, int, int], tol: int = 40) -> int:
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).sum(-1) < tol).sum())


def _args(**kw):
    argv = []
    for k, v in kw.items():
        argv += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
    return get_args_parser().parse_args(argv)


def test_png_folder_grid(png_dir: Path, tmp_path: Path):
    out = tmp_path / "figs" / "crops.png"
    assert [p.name for p in list_images(png_dir)] == ["case_0.png", "case_1.png", "case_2.png"]
    assert read_image(png_dir / "case_1.png").dtype == np.uint16
    result = main(
        _args(input_dir=png_dir, output=out, crop_size=16, min_iou=0.3, max_iou=0.6, n_pairs_per_image=2, ncols=3)
    )
    assert result == out and out.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400  # 2 rows x 3 columns
    assert _colour_pixels(out, (255, 59, 48)) > 200  # first crop boxes (red)
    assert _colour_pixels(out, (0, 199, 255)) > 200  # second crop boxes (cyan)
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_nifti_volume(tmp_path: Path):
    nib = pytest.importorskip("nibabel")
    d = tmp_path / "vols"
    d.mkdir()
    vol = np.zeros((40, 36, 20), np.int16)
    vol[10:30, 8:28, 4:16] = 300
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(d / "v.nii.gz"))
    out = tmp_path / "v.png"
    main(_args(input_dir=d, output=out, crop_size=[16, 16, 8], min_iou=0.0, max_iou=0.0, n_pairs_per_image=2))
    assert out.is_file() and _colour_pixels(out, (255, 59, 48)) > 100


def test_draw_crop_pairs_direct_and_errors(tmp_path: Path):
    imgs = [_ellipses(50, 50, 0), _ellipses(40, 60, 1)]
    pairs = [((0, 0), (10, 10)), ((5, 5), (5, 30))]
    out = draw_crop_pairs(imgs, pairs, 20, tmp_path / "a.png", title="[0.3, 0.6]", captions=["a", "b"])
    assert out.is_file()
    with pytest.raises(ValueError, match="leaves image 1"):
        draw_crop_pairs(imgs, [((0, 0), (1, 1)), ((0, 0), (30, 50))], 20, tmp_path / "b.png")
    with pytest.raises(ValueError, match="2 images, 1 pairs"):
        draw_crop_pairs(imgs, pairs[:1], 20, tmp_path / "c.png")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_bad_input(png_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="not a folder"):
        main(_args(input_dir=tmp_path / "missing", output=tmp_path / "x.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .png"):
        main(_args(input_dir=empty, output=tmp_path / "x.png"))
    with pytest.raises(UserError, match="case_0.png"):  # 96 x 96 crops do not fit 60 x 50 slices
        main(_args(input_dir=png_dir, output=tmp_path / "x.png"))
    with pytest.raises(UserError, match="0.8"):
        main(_args(input_dir=png_dir, output=tmp_path / "x.png", crop_size=16, min_iou=0.8, max_iou=0.2))
    with pytest.raises(UserError, match=r"\.png"):
        main(_args(input_dir=png_dir, output=tmp_path / "x.jpg", crop_size=16))
    (png_dir / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        main(_args(input_dir=png_dir, output=tmp_path / "x.png", crop_size=16))
    assert not (tmp_path / "x.png").exists()


def test_original_sampler_pairs_and_their_misses_are_drawn(png_dir: Path, tmp_path: Path, monkeypatch):
    """--iou_sampler original draws Algorithm 1's pairs; the ones it kept after failing are captioned."""
    drawn = {}
    real = visualize_crops.draw_crop_pairs

    def spy(images, pairs, crop_size, output_path, **kw):
        drawn[Path(output_path).stem] = (pairs, kw["ious"], kw["captions"], kw["title"])
        return real(images, pairs, crop_size, output_path, **kw)

    monkeypatch.setattr(visualize_crops, "draw_crop_pairs", spy)
    # 32-pixel crops, IoU 0: the 48 x 64 slice admits such pairs only with starts 32 apart along its
    # second axis; the 60 x 50 and 40 x 40 slices admit none
    common = dict(input_dir=png_dir, crop_size=32, min_iou=0.0, max_iou=0.0, n_pairs_per_image=8, seed=3)
    main(_args(output=tmp_path / "exact.png", **common))
    main(_args(output=tmp_path / "original.png", iou_sampler="original", **common))
    _, ious_e, caps_e, _ = drawn["exact"]
    pairs_o, ious_o, caps_o, title_o = drawn["original"]
    feasible = [i for i, c in enumerate(caps_e) if c.startswith("case_1.png")]
    assert len(feasible) == 8 and all(ious_e[i] == 0.0 and "(" not in caps_e[i] for i in feasible)
    assert all("(closest; none in interval)" in c for i, c in enumerate(caps_e) if i not in feasible)
    assert all("(fallback; none in interval)" in c for i, c in enumerate(caps_o) if i not in feasible)
    missed = [i for i in feasible if ious_o[i] > 0.0]
    assert len(missed) >= 3 and all(caps_o[i] == "case_1.png (fallback: outside the interval)" for i in missed)
    assert all(caps_o[i] == "case_1.png" for i in feasible if i not in missed)
    assert "original sampler" in title_o and len(pairs_o) == 24
    with pytest.raises(SystemExit):
        _args(output=tmp_path / "x.png", iou_sampler="thesis", **common)

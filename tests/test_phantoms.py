"""Tests of make_phantoms.py: the synthetic FLARE-like CT generator."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import make_phantoms as mp
from utils import UserError, run_cli

SMALL = dict(size_xy=96, n_slices=24)


@pytest.fixture(scope="module")
def small_case():
    return mp._make_case_full(7, 96, 24, True, None)


def test_deterministic_for_a_seed():
    a = mp.make_case(3, **SMALL)
    b = mp.make_case(3, **SMALL)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = mp.make_case(4, **SMALL)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_dtype_shape_affine(small_case):
    image, label, affine, _ = small_case
    assert image.dtype == np.int16 and image.shape == (96, 96, 24)
    assert label.dtype == np.uint8 and label.shape == (96, 96, 24)
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    sp = np.diag(affine)[:3]
    assert 0.6 <= sp[0] <= 0.9 and sp[0] == sp[1] and 2.5 <= sp[2] <= 5.0
    np.testing.assert_array_equal(affine[:3, :3], np.diag(sp))  # RAS, no rotation
    assert set(np.unique(label)) <= set(range(14))


def test_spacing_varies_per_case_and_can_be_given():
    spacings = {tuple(np.diag(mp.make_case(s, size_xy=48, n_slices=12)[2])[:3]) for s in range(5)}
    assert len(spacings) >= 4
    image, label, affine = mp.make_case(0, size_xy=48, n_slices=12, spacing=(0.7, 0.7, 3.0))
    np.testing.assert_allclose(np.diag(affine)[:3], [0.7, 0.7, 3.0])


def test_unlabelled_case_has_no_label_and_requested_shape():
    image, label, affine = mp.make_case(1, size_xy=64, n_slices=30, labelled=False)
    assert label is None and image.shape == (64, 64, 30) and image.dtype == np.int16


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size_xy=8),
        dict(n_slices=2),
        dict(size_xy=64.0),
        dict(spacing=(0.7, 0.7)),
        dict(spacing=(0.7, -1, 3)),
        dict(spacing=(0.7, float("nan"), 3)),
    ],
)
def test_bad_sizes_raise_user_error(kwargs):
    with pytest.raises(UserError):
        mp.make_case(0, **kwargs)


def test_every_organ_present_at_default_size():
    image, label, affine = mp.make_case(11)  # 256 x 256 x 80
    assert image.shape == (256, 256, 80)
    assert set(np.unique(label)) == set(range(14))
    # esophagus only in the upper slices
    z_eso = np.nonzero((label == mp.LABELS["esophagus"]).any(axis=(0, 1)))[0]
    assert z_eso.min() > 80 * 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_organ_present_in_small_cases(seed):
    _, label, _ = mp.make_case(seed, size_xy=64, n_slices=16)
    assert set(np.unique(label)) == set(range(14))


def test_hu_ranges_per_organ_and_tissue(small_case):
    image, label, _, tissue = small_case

    def med_label(name):
        return float(np.median(image[label == mp.LABELS[name]]))

    def med_tissue(name):
        return float(np.median(image[tissue == mp.TISSUES[name]]))

    fat = med_tissue("fat")
    assert -140 < fat < -60
    assert med_label("aorta") > med_label("liver") > fat
    assert 120 < med_label("aorta") < 320
    assert 20 < med_label("liver") < 100 and 20 < med_label("spleen") < 100
    assert abs(med_label("liver") - med_label("spleen")) < 30
    assert med_label("left_kidney") > med_label("liver") + 40 and med_label("right_kidney") > med_label("liver") + 40
    assert med_label("gallbladder") < med_label("liver") - 20  # bile darker than liver
    assert med_tissue("bone_cortex") > 300
    assert med_tissue("lung") < -700 and med_tissue("air") < -950
    assert 0 < med_tissue("muscle") < 90
    # scanner noise: the air outside the body is not constant, but not wild either
    corner = image[:10, :10].astype(float)  # air far from the body
    assert (tissue[:10, :10] == mp.TISSUES["air"]).all()
    assert 5 < corner[corner > -1024].std() < 30


def test_anatomy_is_where_it_belongs(small_case):
    """RAS+: +x is the patient's right, +y anterior, +z superior (as the real FLARE-layout CT)."""
    _, label, affine, _ = small_case

    def centroid(name):
        idx = np.argwhere(label == mp.LABELS[name])
        assert len(idx), name
        return idx.mean(0)

    mid_x = (label.shape[0] - 1) / 2
    assert centroid("liver")[0] > mid_x > centroid("spleen")[0]
    assert centroid("right_kidney")[0] > mid_x > centroid("left_kidney")[0]
    assert centroid("right_adrenal_gland")[0] > mid_x > centroid("left_adrenal_gland")[0]
    assert centroid("inferior_vena_cava")[0] > centroid("aorta")[0]
    assert centroid("gallbladder")[0] > mid_x and centroid("stomach")[0] < mid_x
    assert centroid("pancreas")[1] > centroid("aorta")[1]  # pancreas anterior to the aorta
    assert centroid("spleen")[1] < centroid("stomach")[1]  # spleen posterior to the stomach
    assert centroid("right_adrenal_gland")[2] > centroid("right_kidney")[2]  # adrenals above the kidneys
    assert centroid("esophagus")[2] > centroid("pancreas")[2]


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_generate_dataset_layout_and_split(tmp_path):
    out = tmp_path / "ph"
    res = mp.generate_dataset(out, n_labelled=3, n_unlabelled=2, seed=5, size_xy=48, n_slices=12)
    assert _tree(out) == [
        "labelled/images/FLARE22_Tr_0001_0000.nii.gz",
        "labelled/images/FLARE22_Tr_0002_0000.nii.gz",
        "labelled/images/FLARE22_Tr_0003_0000.nii.gz",
        "labelled/labels/FLARE22_Tr_0001.nii.gz",
        "labelled/labels/FLARE22_Tr_0002.nii.gz",
        "labelled/labels/FLARE22_Tr_0003.nii.gz",
        "phantoms.json",
        "split.json",
        "unlabelled/Case_00001_0000.nii.gz",
        "unlabelled/Case_00002_0000.nii.gz",
    ]
    assert res["labelled_dir"] == str(out / "labelled") and res["unlabelled_dir"] == str(out / "unlabelled")
    split = json.loads((out / "split.json").read_text())
    assert res["split_path"] == str(out / "split.json")
    assert split == {"train": ["FLARE22_Tr_0001"], "val": ["FLARE22_Tr_0002", "FLARE22_Tr_0003"]}

    img = nib.load(out / "labelled/images/FLARE22_Tr_0002_0000.nii.gz")
    lab = nib.load(out / "labelled/labels/FLARE22_Tr_0002.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert img.shape == lab.shape == (48, 48, 12)
    np.testing.assert_allclose(img.affine, lab.affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.header.get_zooms(), np.diag(img.affine)[:3], rtol=1e-6)
    # the files hold exactly what make_case makes for that case's seed
    image, label, affine = mp.make_case(mp._case_seed(5, 0, 2), size_xy=48, n_slices=12)
    np.testing.assert_array_equal(np.asarray(img.dataobj), image)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), label)
    np.testing.assert_allclose(img.affine, affine)
    # unlabelled cases: longer field of view
    unl = nib.load(out / "unlabelled/Case_00001_0000.nii.gz")
    assert unl.shape == (48, 48, round(1.3 * 12)) and unl.get_data_dtype() == np.int16


def test_rerun_skips_existing_and_redoes_missing(tmp_path):
    out = tmp_path / "ph"
    kw = dict(n_labelled=2, n_unlabelled=1, seed=1, size_xy=48, n_slices=12)
    mp.generate_dataset(out, **kw)
    img1 = out / "labelled/images/FLARE22_Tr_0001_0000.nii.gz"
    img2 = out / "labelled/images/FLARE22_Tr_0002_0000.nii.gz"
    before = img2.read_bytes()
    os.utime(img1, (1, 1))
    img2.unlink()
    res = mp.generate_dataset(out, **kw)
    assert res["n_written"] == 1 and res["n_skipped"] == 2
    assert os.stat(img1).st_mtime == 1  # untouched
    assert img2.read_bytes() == before  # regenerated bit for bit
    # more cases with the same settings extend the set
    res = mp.generate_dataset(out, **{**kw, "n_labelled": 3})
    assert res["n_written"] == 1
    # other settings into the same folder are refused
    with pytest.raises(UserError, match="phantoms.json"):
        mp.generate_dataset(out, **{**kw, "seed": 2})


def test_killed_run_leaves_no_partial_files(tmp_path, monkeypatch):
    out = tmp_path / "ph"
    real = mp.make_case
    calls = []

    def dies_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mp, "make_case", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        mp.generate_dataset(out, n_labelled=3, n_unlabelled=0, size_xy=48, n_slices=12)
    files = _tree(out)
    assert not [f for f in files if f.endswith(".tmp") or os.path.basename(f).startswith(".")]
    assert "labelled/images/FLARE22_Tr_0001_0000.nii.gz" in files
    assert "labelled/images/FLARE22_Tr_0002_0000.nii.gz" not in files
    monkeypatch.setattr(mp, "make_case", real)
    res = mp.generate_dataset(out, n_labelled=3, n_unlabelled=0, size_xy=48, n_slices=12)
    assert res["n_written"] == 2 and res["n_skipped"] == 1


def test_parallel_workers_write_the_same_files(tmp_path):
    kw = dict(n_labelled=2, n_unlabelled=1, seed=3, size_xy=48, n_slices=12)
    mp.generate_dataset(tmp_path / "a", num_workers=1, **kw)
    mp.generate_dataset(tmp_path / "b", num_workers=2, **kw)
    for rel in _tree(tmp_path / "a"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_labelled=-1), "n_labelled"),
        (dict(n_labelled=0, n_unlabelled=0), "nothing"),
        (dict(n_labelled=0, n_unlabelled=1, n_train=1), "n_train"),
        (dict(n_unlabelled=-1), "n_unlabelled"),
        (dict(n_train=4), "n_train"),
        (dict(n_train=0), "n_train"),
        (dict(num_workers=0), "num_workers"),
        (dict(size_xy=10), "size_xy"),
    ],
)
def test_generate_dataset_bad_arguments(tmp_path, kwargs, match):
    base = dict(n_labelled=3, n_unlabelled=0, size_xy=48, n_slices=12)
    with pytest.raises(UserError, match=match):
        mp.generate_dataset(tmp_path / "ph", **{**base, **kwargs})


def test_unlabelled_only_set_has_no_split(tmp_path):
    res = mp.generate_dataset(tmp_path / "ph", n_labelled=0, n_unlabelled=1, size_xy=48, n_slices=12)
    assert res["split_path"] is None and not (tmp_path / "ph" / "split.json").exists()
    assert os.listdir(tmp_path / "ph" / "unlabelled") == ["Case_00001_0000.nii.gz"]
    assert os.listdir(tmp_path / "ph" / "labelled" / "images") == []


def test_n_train_and_unwritable_output(tmp_path):
    res = mp.generate_dataset(tmp_path / "ph", n_labelled=3, n_unlabelled=0, size_xy=48, n_slices=12, n_train=2)
    split = json.loads(open(res["split_path"]).read())
    assert split == {"train": ["FLARE22_Tr_0001", "FLARE22_Tr_0002"], "val": ["FLARE22_Tr_0003"]}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="file"):
        mp.generate_dataset(blocker / "sub", n_labelled=1, n_unlabelled=0, size_xy=48, n_slices=12)


def test_cli_with_preview(tmp_path, capsys):
    out, png = tmp_path / "ph", tmp_path / "preview.png"
    argv = [
        "--output_dir",
        str(out),
        "--n_labelled",
        "1",
        "--n_unlabelled",
        "1",
        "--size_xy",
        "64",
        "--n_slices",
        "16",
        "--num_workers",
        "1",
        "--preview",
        str(png),
    ]
    res = run_cli(mp.main, mp.get_args_parser(), argv)
    assert os.path.exists(res["split_path"])
    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert "labelled" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_cli(mp.main, mp.get_args_parser(), ["--output_dir", str(out), "--preview", str(tmp_path / "p.jpg")])
    assert e.value.code == 2
    for action in mp.get_args_parser()._actions:
        assert action.help, action.dest

"""Preprocessing (preprocess_flare_labelled.py / preprocess_flare_unlabelled.py / preprocessing.py).

Real CT (skipped when ../shared/data/real_ct is absent) and small phantoms: geometry,
label ids, organ volumes, the intensity window, image / label alignment, 2D and 3D
output, resume after a kill, shards and workers, every bad input of the issue, and
the loaders of data.py on the preprocessed phantom set.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import data
import make_phantoms
import preprocess_flare_labelled as labelled_script
import preprocess_flare_unlabelled as unlabelled_script
import preprocessing
from utils import TrainingError, UserError, run_cli

PHANTOM = dict(size_xy=64, n_slices=12)


# --------------------------------------------------------------------------------------
# helpers


def run_labelled(data_dir, output_dir, split_path, *extra):
    argv = ["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--split_path", str(split_path), *extra]
    return labelled_script.main(labelled_script.get_args_parser().parse_args(argv))


def run_unlabelled(data_dir, output_dir, *extra):
    argv = ["--data_dir", str(data_dir), "--output_dir", str(output_dir), *extra]
    return unlabelled_script.main(unlabelled_script.get_args_parser().parse_args(argv))


def expected_n_slices(path, size_z=2.5):
    """Slices after resampling to size_z, from the header alone (MONAI keeps the voxel-centre extent)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    nz, sz = img.shape[2], float(img.header.get_zooms()[2])
    return int(round((nz - 1) * sz / size_z + 1))


def all_files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def stack_case(folder, case, reader):
    files = sorted(glob.glob(os.path.join(folder, f"{case}_*.png")))
    return np.stack([reader(f) for f in files], axis=-1)


def window(hu, a_min=-500.0, a_max=500.0):
    return np.clip((np.asarray(hu, np.float64) - a_min) / (a_max - a_min), 0, 1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return make_phantoms.generate_dataset(root, n_labelled=3, n_unlabelled=2, seed=3, **PHANTOM)


@pytest.fixture(scope="module")
def phantom_2d(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_2d") / "labelled"
    summary = run_labelled(phantoms["labelled_dir"], out, phantoms["split_path"])
    return out, summary


# --------------------------------------------------------------------------------------
# real CT


def test_real_ct_labelled(tmp_path, real_ct):
    src = real_ct.labelled_dir
    case = real_ct.case
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [case], "val": []}))
    out = tmp_path / "out"
    summary = run_labelled(src, out, split)
    assert summary["n_done"] == 1 and summary["n_failed"] == 0

    img_nii = nib.as_closest_canonical(nib.load(str(src / "images" / f"{case}_0000.nii.gz")))
    lab_nii = nib.as_closest_canonical(nib.load(str(src / "labels" / f"{case}.nii.gz")))
    hu = np.asarray(img_nii.dataobj, np.float32)
    lab = np.asarray(lab_nii.dataobj).astype(np.uint8)
    zooms = np.array(img_nii.header.get_zooms()[:3], float)

    image = stack_case(out / "imgs", case, data.read_image_2d)
    label = stack_case(out / "labels", case, data.read_label_2d)
    assert image.shape == label.shape

    # slice count: every slice has body in it, so the z extent is kept whole
    assert image.shape[2] == expected_n_slices(src / "images" / f"{case}_0000.nii.gz") == 36
    # in-plane size: the box of voxels above -500 HU, in mm at 1 mm per pixel
    # (bilinear resampling can widen it by up to one source voxel on each side)
    box = np.argwhere(hu > -500)
    extent = (box.max(0) - box.min(0)) * zooms + 1
    for axis in (0, 1):
        assert abs(image.shape[axis] - max(extent[axis], 96)) <= zooms[axis] * 2 + 1, (axis, image.shape, extent)

    # label ids survive, organ volumes agree within 3 %
    assert set(np.unique(label)) == set(np.unique(lab))
    voxel_before, voxel_after = float(np.prod(zooms)), 1.0 * 1.0 * 2.5
    for k in range(1, 14):
        before = (lab == k).sum() * voxel_before / 1000.0
        after = (label == k).sum() * voxel_after / 1000.0
        if before == 0:
            assert after == 0
            continue
        # organs of a few dozen source voxels (adrenals, 3 mm voxels) move by more from the
        # voxel grid alone; the large organs must agree closely
        tol = 0.03 if (lab == k).sum() > 900 else 0.12
        assert abs(after - before) <= tol * before, (data.LABEL_NAMES[k], before, after)

    # intensities follow the window: air 0, bone 255, soft tissue (HU + 500) / 1000 * 255
    png = np.round(image * 255)
    assert png.min() == 0 and png.max() == 255
    assert (png[label == 0] == 0).mean() > 0.1  # air around the body
    for k in (1, 3, 11):  # liver, spleen, stomach: mean of the windowed HU is kept
        want = window(hu[lab == k]).mean() * 255
        got = png[label == k].mean()
        assert abs(got - want) < 4, (data.LABEL_NAMES[k], got, want)

    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["cases"][case]
    assert entry["n_slices"] == 36 and entry["spacing"] == [1.0, 1.0, 2.5]
    assert entry["shape"] == list(image.shape) and entry["original_shape"] == [122, 101, 30]


# --------------------------------------------------------------------------------------
# phantoms: labelled 2D, unlabelled 2D and 3D, loaders


def test_phantom_labelled_2d_geometry_alignment_and_loaders(phantoms, phantom_2d):
    out, summary = phantom_2d
    split = data.load_split(phantoms["split_path"])
    cases = sorted(split["train"] + split["val"])
    assert summary["n_done"] == len(cases) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    pairs = data.list_finetune_pairs(out, split, spatial_dims=2)
    listed = pairs["train"] + pairs["val"]
    assert sum(len(v) for v in pairs.values()) == manifest["n_slices"] == summary["n_slices"]
    for case in cases:
        img_path = Path(phantoms["labelled_dir"]) / "images" / f"{case}_0000.nii.gz"
        hu = np.asarray(nib.load(str(img_path)).dataobj, np.float32)
        lab = np.asarray(nib.load(str(img_path).replace("images", "labels").replace("_0000", "")).dataobj)
        image = stack_case(out / "imgs", case, data.read_image_2d)
        label = stack_case(out / "labels", case, data.read_label_2d)
        assert image.shape[2] == expected_n_slices(img_path) == manifest["cases"][case]["n_slices"]
        assert image.shape[0] >= 96 and image.shape[1] >= 96
        assert [it["slice"] for it in listed if it["case"] == case] == list(range(image.shape[2]))
        # alignment: each organ keeps its own intensity (a flipped or shifted label would not)
        assert set(np.unique(label)) == set(np.unique(lab))
        # (medians: small phantom organs have many edge pixels, blurred by the bilinear resampling)
        for k in np.unique(lab)[1:]:
            if (lab == k).sum() < 100 or k == 11:  # tiny organs; stomach gas
                continue
            want = np.median(window(hu[lab == k])) * 255
            got = np.median(np.round(image * 255)[label == k])
            assert abs(got - want) < (3 if k == 1 else 15), (case, data.LABEL_NAMES[k], got, want)
        solid = (label > 0) & (label != 11)  # organs other than the stomach (gas) are soft tissue
        assert (image[solid] > 0).mean() > 0.99
    # files are as readable as the umask allows (not the 0600 of a bare mkstemp)
    umask = os.umask(0o022)
    os.umask(umask)
    for p in (listed[0]["image"], listed[0]["label"], out / "manifest.json", out / ".manifest" / f"{cases[0]}.json"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, p
    # the pretraining listing of a labelled output uses the images only
    assert data.list_pretrain_images(out, spatial_dims=2) == sorted(it["image"] for it in listed)


def test_phantom_unlabelled_2d_and_3d_agree(phantoms, tmp_path):
    s2 = run_unlabelled(phantoms["unlabelled_dir"], tmp_path / "u2")
    s3 = run_unlabelled(phantoms["unlabelled_dir"], tmp_path / "u3", "--spatial_dims", "3")
    assert s2["n_done"] == s3["n_done"] == 2
    slices = data.list_pretrain_images(tmp_path / "u2", spatial_dims=2)
    vols = data.list_pretrain_images(tmp_path / "u3", spatial_dims=3)
    assert [os.path.basename(v) for v in vols] == ["Case_00001.nii.gz", "Case_00002.nii.gz"]
    assert len(slices) == s2["n_slices"] == s3["n_slices"]
    for v in vols:
        case = data.case_id_from_path(v)
        nii = nib.load(v)
        assert nii.get_data_dtype() == np.float32
        np.testing.assert_allclose(nii.header.get_zooms(), (1.0, 1.0, 2.5), atol=1e-5)
        assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        vol = np.asarray(nii.dataobj)
        assert vol.min() >= 0 and vol.max() <= 1
        src = Path(phantoms["unlabelled_dir"]) / f"{case}_0000.nii.gz"
        assert vol.shape[2] == expected_n_slices(src)
        stacked = stack_case(tmp_path / "u2", case, data.read_image_2d)
        # the slices hold the volume's values truncated to 8 bits (the default): the original's
        # (v * 255).astype(np.uint8) on the float32 volume in [0, 1]
        assert vol.dtype == np.float32
        np.testing.assert_array_equal(np.round(stacked * 255), (vol * 255).astype(np.uint8))


def test_png_bits_16(phantoms, phantom_2d, tmp_path):
    out8, _ = phantom_2d
    run_labelled(phantoms["labelled_dir"], tmp_path / "o16", phantoms["split_path"], "--png_bits", "16")
    names = sorted(os.listdir(out8 / "imgs"))
    assert names == sorted(os.listdir(tmp_path / "o16" / "imgs"))
    for n in names[::7]:
        a8 = data.read_image_2d(out8 / "imgs" / n)
        a16 = data.read_image_2d(tmp_path / "o16" / "imgs" / n)
        assert np.abs(a8 - a16).max() <= 1 / 255 + 1e-6  # both truncated: 8 bits lose less than a grey level
        assert not np.array_equal(a8, a16) or a8.max() == 0  # 16 bits keep more levels
        np.testing.assert_array_equal(
            data.read_label_2d(out8 / "labels" / n), data.read_label_2d(tmp_path / "o16" / "labels" / n)
        )


# --------------------------------------------------------------------------------------
# windowing and orientation, exactly


def test_window_and_ras_orientation_exact(tmp_path):
    """On the output grid itself (1 x 1 x 2.5 mm) resampling is the identity, so values are exact."""
    hu = np.full((30, 20, 4), -1000, np.int16)
    hu[4:26, 3:17, :] = 40  # soft tissue
    hu[10, 8, :] = 700  # bone: clipped to 1
    hu[12, 8, :] = -300  # fat-ish
    hu[5, 4, :] = 300  # marker near the low-x, low-y corner
    # stored in LPS order (x and y reversed): RAS orientation must flip both back
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(hu[::-1, ::-1, :].copy(), affine), str(src / "Case_00001_0000.nii.gz"))
    run_unlabelled(src, tmp_path / "out")
    pic = stack_case(tmp_path / "out", "Case_00001", data.read_image_2d)
    assert pic.shape == (96, 96, 4)  # body 22 x 14, padded to 96
    ox, oy = (96 - 22) // 2, (96 - 14) // 2
    body = np.round(pic * 255)[ox : ox + 22, oy : oy + 14, :]
    expect = (window(hu[4:26, 3:17, :]).astype(np.float32) * 255).astype(np.uint8)  # the original's truncation
    np.testing.assert_array_equal(body, expect)
    assert body[6, 5, 0] == 255 and body[8, 5, 0] == 51 and body[1, 1, 0] == 204  # 700, -300 and 300 HU
    assert (np.round(pic * 255)[:ox] == 0).all()


# --------------------------------------------------------------------------------------
# resume, rerun, shards, workers


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the engine catches it."""


def test_resume_after_kill_is_bit_identical(phantoms, phantom_2d, tmp_path, monkeypatch):
    reference, _ = phantom_2d
    out = tmp_path / "resumed"
    real_write = preprocessing.write_bytes
    calls = {"n": 0}

    second = sorted(json.loads(Path(phantoms["split_path"]).read_text())["val"])[0]

    def dying_write(path, payload):
        calls["n"] += os.path.basename(path).startswith(second)
        if calls["n"] == 6:  # in the middle of the second case
            # what a kill during a write leaves: a truncated temporary file, no final file
            folder, name = os.path.split(path)
            Path(folder, f".{name}.abc123.tmp").write_bytes(payload[: len(payload) // 2])
            raise Killed()
        real_write(path, payload)

    monkeypatch.setattr(preprocessing, "write_bytes", dying_write)
    with pytest.raises(Killed):
        run_labelled(phantoms["labelled_dir"], out, phantoms["split_path"])
    monkeypatch.setattr(preprocessing, "write_bytes", real_write)

    finished = sorted(p.stem for p in (out / ".manifest").glob("*.json") if p.name != "args.json")
    assert len(finished) == 1  # the first case only
    assert list((out / ".manifest").glob("*.inprogress"))
    assert list((out / "imgs").glob(".*.tmp")) or list((out / "labels").glob(".*.tmp"))

    summary = run_labelled(phantoms["labelled_dir"], out, phantoms["split_path"])
    assert summary["n_skipped"] == 1 and summary["n_done"] == 2
    assert all_files(out) == all_files(reference)


def test_rerun_skips_and_other_args_are_refused(phantoms, phantom_2d, tmp_path):
    out, first = phantom_2d
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "imgs" / "*.png"))}
    again = run_labelled(phantoms["labelled_dir"], out, phantoms["split_path"])
    assert again["n_done"] == 0 and again["n_skipped"] == 3 and again["n_slices"] == first["n_slices"]
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    with pytest.raises(UserError, match=r"a_min=-500.0 \(now -1000.0\)"):
        run_labelled(phantoms["labelled_dir"], out, phantoms["split_path"], "--a_min", "-1000")
    with pytest.raises(UserError, match="kind='labelled'"):
        run_unlabelled(phantoms["unlabelled_dir"], out)


def test_shards_and_workers_give_the_same_output(phantoms, tmp_path):
    single = tmp_path / "single"
    run_unlabelled(phantoms["unlabelled_dir"], single)
    sharded = tmp_path / "sharded"
    s0 = run_unlabelled(phantoms["unlabelled_dir"], sharded, "--shard_index", "0", "--num_shards", "2")
    assert s0["n_cases"] == 1 and json.loads((sharded / "manifest.json").read_text())["n_cases"] == 1
    s1 = run_unlabelled(phantoms["unlabelled_dir"], sharded, "--shard_index", "1", "--num_shards", "2")
    assert s1["n_cases"] == 1 and s1["n_done"] == 1
    assert all_files(sharded) == all_files(single)
    pooled = tmp_path / "pooled"
    run_unlabelled(phantoms["unlabelled_dir"], pooled, "--num_workers", "2")
    assert all_files(pooled) == all_files(single)
    with pytest.raises(UserError, match="--shard_index"):
        run_unlabelled(phantoms["unlabelled_dir"], tmp_path / "x", "--shard_index", "2", "--num_shards", "2")


# --------------------------------------------------------------------------------------
# bad input


def _save(path, arr, affine):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """A labelled FLARE folder: one good case and one case per kind of bad input."""
    root = tmp_path_factory.mktemp("bad")
    image, label, affine = make_phantoms.make_case(7, size_xy=48, n_slices=8)
    imgs, labs = root / "images", root / "labels"

    def case(n, img=image, lab=label, img_aff=affine, lab_aff=affine):
        c = f"FLARE22_Tr_{n:04d}"
        if img is not None:
            _save(imgs / f"{c}_0000.nii.gz", img, img_aff)
        if lab is not None:
            _save(labs / f"{c}.nii.gz", lab, lab_aff)
        return c

    good = case(1)
    bad = {}
    c = case(2)
    raw = (imgs / f"{c}_0000.nii.gz").read_bytes()
    (imgs / f"{c}_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    bad[c] = f"{c}_0000.nii.gz"  # truncated image
    c = case(3)
    (labs / f"{c}.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 50))
    bad[c] = f"{c}.nii.gz"  # corrupt label
    bad[case(4, img=image[..., None])] = "not a 3D volume"
    bad[case(5, lab=label[:, :, :-1])] = "has shape"
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    bad[case(6, lab_aff=shifted)] = "different affines"
    lab14 = label.copy()
    lab14[0, 0, 0] = 14
    bad[case(7, lab=lab14)] = "outside the ids 0..13: [14"
    nan = image.astype(np.float32)
    nan[3, 3, 3] = np.nan
    bad[case(8, img=nan)] = "NaN or infinite"
    inf = image.astype(np.float32)
    inf[3, 3, 3] = np.inf
    bad[case(9, img=inf)] = "NaN or infinite"
    bad["FLARE22_Tr_0010"] = "has no files"  # in the split, nothing on disk
    bad[case(11, lab=None)] = "no label"
    split = root / "split.json"
    split.write_text(json.dumps({"train": [good], "val": sorted(bad)}))
    return root, split, good, bad


def test_each_bad_input_fails_alone(bad_set, tmp_path, caplog):
    root, split, good, bad = bad_set
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="preprocessing"):
        with pytest.raises(TrainingError) as err:
            run_labelled(root, out, split)
    message = str(err.value)
    assert f"{len(bad)} of {len(bad) + 1} cases failed" in message
    for c in bad:
        assert c in message
    lines = {
        r.getMessage().split(" failed: ")[0]: r.getMessage() for r in caplog.records if " failed: " in r.getMessage()
    }
    assert set(lines) == set(bad)
    for c, needle in bad.items():
        assert needle in lines[c], lines[c]
        assert "\n" not in lines[c]
        if c != "FLARE22_Tr_0010":
            assert str(root) in lines[c]  # names the file
    # the good case was processed and nothing of the bad ones was written
    assert (out / ".manifest" / f"{good}.json").is_file()
    assert {data.case_id_from_path(p, is_slice=True) for p in os.listdir(out / "imgs")} == {good}
    assert not list((out / ".manifest").glob("*.inprogress"))


def test_exit_codes(bad_set, phantoms, tmp_path):
    root, split, _, _ = bad_set
    parser = labelled_script.get_args_parser()

    def code(argv):
        with pytest.raises(SystemExit) as e:
            run_cli(labelled_script.main, parser, argv)
        return e.value.code

    assert code(["--data_dir", str(root), "--output_dir", str(tmp_path / "o"), "--split_path", str(split)]) == 1
    assert code(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o2")]) == 2
    (tmp_path / "empty").mkdir()
    assert code(["--data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o2")]) == 2
    (tmp_path / "a_file").write_text("x")
    unwritable = tmp_path / "a_file" / "out"
    assert code(["--data_dir", str(root), "--output_dir", str(unwritable), "--split_path", str(split)]) == 2
    with pytest.raises(UserError, match="not writable"):
        run_unlabelled(phantoms["unlabelled_dir"], unwritable)
    with pytest.raises(UserError, match="inside --data_dir"):
        run_unlabelled(phantoms["unlabelled_dir"], Path(phantoms["unlabelled_dir"]) / "out")
    (tmp_path / "no_nifti").mkdir()
    (tmp_path / "no_nifti" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="holds no .nii.gz"):
        run_unlabelled(tmp_path / "no_nifti", tmp_path / "o3")

"""data.py: names, PNG round trips, the split, and the pretraining / fine-tuning listings.

Fast tests on tiny files written here; the loaders on a preprocessed phantom set are in
test_preprocess.py (they need the preprocessing to run first).
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import data
from utils import UserError

# --------------------------------------------------------------------------------------
# helpers


def write_slice(folder, case, z, n_slices=20, value=0.5, label=None):
    os.makedirs(folder, exist_ok=True)
    name = data.slice_file_name(case, z, n_slices)
    if label is None:
        payload = data.encode_png_2d(np.full((5, 4), value, np.float32))
    else:
        payload = data.encode_png_2d(np.full((5, 4), label, np.uint8), is_label=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(payload)
    return os.path.join(folder, name)


def write_labelled_slices(root, cases_slices):
    for case, n in cases_slices.items():
        for z in range(n):
            write_slice(os.path.join(root, "imgs"), case, z, n)
            write_slice(os.path.join(root, "labels"), case, z, n, label=1)


def write_nifti(path, shape=(4, 4, 3)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))


# --------------------------------------------------------------------------------------
# names


def test_label_names():
    assert data.N_CLASSES == 14 == len(data.LABEL_NAMES)
    assert data.LABEL_NAMES[0] == "background"
    assert data.LABEL_NAMES[1] == "liver"
    assert data.LABEL_NAMES[2] == "right kidney"
    assert data.LABEL_NAMES[9] == "gallbladder"
    assert data.LABEL_NAMES[13] == "left kidney"


@pytest.mark.parametrize(
    "path, is_slice, case",
    [
        ("/d/images/FLARE22_Tr_0001_0000.nii.gz", False, "FLARE22_Tr_0001"),
        ("/d/labels/FLARE22_Tr_0001.nii.gz", False, "FLARE22_Tr_0001"),
        ("Case_00001_0000.nii.gz", False, "Case_00001"),
        ("Case_00001_0000.nii", False, "Case_00001"),
        ("/o/imgs/FLARE22_Tr_0001_0042.png", True, "FLARE22_Tr_0001"),
        ("/o/imgs/FLARE22_Tr_0001_0000.png", True, "FLARE22_Tr_0001"),  # slice 0 keeps the case id intact
        ("/o/Case_00001_12345.png", True, "Case_00001"),
        ("/o/Case_00001.nii.gz", False, "Case_00001"),
    ],
)
def test_case_id_from_path(path, is_slice, case):
    assert data.case_id_from_path(path, is_slice=is_slice) == case


def test_case_id_from_slice_without_index_is_an_error():
    with pytest.raises(UserError, match="foo.png"):
        data.case_id_from_path("/x/foo.png", is_slice=True)


def test_slice_names_sort_in_slice_order():
    names = [data.slice_file_name("C", z, 12000) for z in range(0, 12000, 997)]
    assert names == sorted(names)
    assert data.slice_file_name("C", 7, 40) == "C_0007.png"
    assert data.slice_file_name("C", 7, 12000) == "C_00007.png"
    assert data.parse_slice_name("/a/C_00007.png") == ("C", 7)


# --------------------------------------------------------------------------------------
# PNG slices


def test_png_8bit_round_trip_keeps_shape_and_values(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((37, 23)).astype(np.float32)  # (X, Y), deliberately not square
    arr[0, 0], arr[-1, -1] = 0.0, 1.0
    p = tmp_path / "C_0000.png"
    p.write_bytes(data.encode_png_2d(arr, bits=8))
    back = data.read_image_2d(p)
    assert back.shape == (37, 23) and back.dtype == np.float32
    np.testing.assert_array_equal(back * 255, np.round(arr * 255))
    # the PNG itself is the radiological picture: rows are y reversed, columns x reversed
    pic = np.asarray(Image.open(p))
    assert pic.shape == (23, 37)
    assert pic[-1, -1] == 0 and pic[0, 0] == 255


def test_png_16bit_is_lossless_for_65535_levels(tmp_path):
    levels = np.arange(0, 65536, 97, dtype=np.float64)[: 30 * 20].reshape(30, 20)
    arr = (levels / 65535.0).astype(np.float32)
    p = tmp_path / "C_0000.png"
    p.write_bytes(data.encode_png_2d(arr, bits=16))
    assert Image.open(p).mode.startswith("I")
    back = data.read_image_2d(p)
    np.testing.assert_array_equal(np.round(back.astype(np.float64) * 65535), levels)


def test_label_png_round_trip(tmp_path):
    lab = (np.arange(9 * 7) % 14).astype(np.uint8).reshape(9, 7)
    p = tmp_path / "C_0000.png"
    p.write_bytes(data.encode_png_2d(lab, is_label=True))
    back = data.read_label_2d(p)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab)


def test_unreadable_png_names_the_file(tmp_path):
    bad = tmp_path / "C_0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(UserError, match="C_0000.png"):
        data.read_image_2d(bad)
    with pytest.raises(UserError, match="does not exist"):
        data.read_label_2d(tmp_path / "missing.png")
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(UserError, match="mode 'RGB'"):
        data.read_image_2d(rgb)


# --------------------------------------------------------------------------------------
# the split


def test_default_split_is_the_papers():
    split = data.load_split(data.DEFAULT_SPLIT_PATH)
    assert os.path.isabs(data.DEFAULT_SPLIT_PATH)
    assert len(split["train"]) == 15 and len(split["val"]) == 35
    assert split["train"][:3] == ["FLARE22_Tr_0031", "FLARE22_Tr_0028", "FLARE22_Tr_0016"]
    assert split["val"][-1] == "FLARE22_Tr_0026"
    numbers = sorted(int(c.rsplit("_", 1)[1]) for c in split["train"] + split["val"])
    assert numbers == list(range(1, 51))


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read split file"),
        ('["a"]', "JSON object"),
        ('{"train": ["a"]}', "no list under 'val'"),
        ('{"train": ["a", "a"], "val": []}', "more than once"),
        ('{"train": ["a"], "val": ["a"]}', "both 'train' and 'val'"),
        ('{"train": [1], "val": []}', "non-empty case id"),
    ],
)
def test_malformed_split(tmp_path, content, message):
    p = tmp_path / "split.json"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        data.load_split(p)


def test_missing_split_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_split(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------
# pretraining listing


def test_pretrain_2d_uses_only_images_of_a_labelled_folder(tmp_path):
    write_labelled_slices(tmp_path / "labelled", {"A": 3})
    unl = [write_slice(tmp_path / "unlabelled", "U", z, 2) for z in range(2)]
    (tmp_path / "unlabelled" / ".U_0000.png.x1y2.tmp").write_bytes(b"partial")
    files = data.list_pretrain_images(tmp_path, spatial_dims=2)
    assert files == sorted(files)
    assert len(files) == 5
    assert not any(os.sep + "labels" + os.sep in f for f in files)
    assert set(unl) <= set(files)
    assert all(os.path.isabs(f) for f in files)


def test_pretrain_3d_lists_volumes_but_not_label_maps(tmp_path):
    write_nifti(tmp_path / "a" / "Case_00001_0000.nii.gz")
    write_nifti(tmp_path / "b" / "Case_00002.nii")
    write_nifti(tmp_path / "raw" / "images" / "FLARE22_Tr_0001_0000.nii.gz")
    write_nifti(tmp_path / "raw" / "labels" / "FLARE22_Tr_0001.nii.gz")
    files = data.list_pretrain_images(tmp_path, spatial_dims=3)
    assert [os.path.basename(f) for f in files] == [
        "Case_00001_0000.nii.gz",
        "Case_00002.nii",
        "FLARE22_Tr_0001_0000.nii.gz",
    ]


def test_pretrain_wrong_spatial_dims_says_so(tmp_path):
    write_slice(tmp_path, "U", 0, 1)
    with pytest.raises(UserError, match="PNG slices.*--spatial_dims 2"):
        data.list_pretrain_images(tmp_path, spatial_dims=3)
    other = tmp_path / "vol"
    write_nifti(other / "Case_00001.nii.gz")
    with pytest.raises(UserError, match="NIfTI volumes.*--spatial_dims 3"):
        data.list_pretrain_images(other, spatial_dims=2)


def test_pretrain_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.list_pretrain_images(tmp_path / "nope", spatial_dims=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        data.list_pretrain_images(tmp_path / "empty", spatial_dims=2)
    with pytest.raises(UserError, match="spatial_dims"):
        data.list_pretrain_images(tmp_path, spatial_dims=1)


def test_pretrain_refuses_a_case_left_unfinished(tmp_path):
    for z in range(3):
        write_slice(tmp_path, "U", z, 3)
    write_slice(tmp_path, "V", 0, 3)
    (tmp_path / ".manifest").mkdir()
    (tmp_path / ".manifest" / "U.json").write_text(json.dumps({"n_slices": 3}))
    with pytest.raises(UserError, match="'V'.*not finished"):
        data.list_pretrain_images(tmp_path, spatial_dims=2)
    (tmp_path / ".manifest" / "V.json").write_text(json.dumps({"n_slices": 3}))
    with pytest.raises(UserError, match="'V'.*1 slice files.*records 3"):
        data.list_pretrain_images(tmp_path, spatial_dims=2)


# --------------------------------------------------------------------------------------
# fine-tuning listing


def test_finetune_pairs_2d_sorted_by_case_and_slice(tmp_path):
    write_labelled_slices(tmp_path, {"B": 11, "A": 2, "C": 1})
    pairs = data.list_finetune_pairs(tmp_path, {"train": ["B", "A"], "val": ["C"]}, spatial_dims=2)
    train = pairs["train"]
    assert [(it["case"], it["slice"]) for it in train] == [("A", 0), ("A", 1)] + [("B", z) for z in range(11)]
    assert [it["case"] for it in pairs["val"]] == ["C"]
    for it in train:
        assert os.path.basename(it["image"]) == os.path.basename(it["label"])
        assert os.path.dirname(it["image"]).endswith("imgs") and os.path.dirname(it["label"]).endswith("labels")


def test_finetune_pairs_2d_errors(tmp_path):
    write_labelled_slices(tmp_path, {"A": 2})
    with pytest.raises(UserError, match="val case 'Z'.*no slices"):
        data.list_finetune_pairs(tmp_path, {"train": ["A"], "val": ["Z"]}, spatial_dims=2)
    os.remove(tmp_path / "labels" / "A_0001.png")
    with pytest.raises(UserError, match=r"imgs/A_0001.png has no label"):
        data.list_finetune_pairs(tmp_path, {"train": ["A"], "val": []}, spatial_dims=2)
    empty = tmp_path / "empty"
    (empty / "imgs").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(UserError, match="hold no .png"):
        data.list_finetune_pairs(empty, {"train": [], "val": []}, spatial_dims=2)
    raw = tmp_path / "raw"
    write_nifti(raw / "images" / "A_0000.nii.gz")
    with pytest.raises(UserError, match="raw FLARE NIfTI"):
        data.list_finetune_pairs(raw, {"train": ["A"], "val": []}, spatial_dims=2)


def test_finetune_pairs_3d_raw_layout(tmp_path):
    for c in ("FLARE22_Tr_0002", "FLARE22_Tr_0001", "FLARE22_Tr_0003"):
        write_nifti(tmp_path / "imgs" / f"{c}_0000.nii.gz")
        write_nifti(tmp_path / "labels" / f"{c}.nii.gz")
    split = {"train": ["FLARE22_Tr_0002", "FLARE22_Tr_0001"], "val": ["FLARE22_Tr_0003"]}
    pairs = data.list_finetune_pairs(tmp_path, split, spatial_dims=3)
    assert [it["case"] for it in pairs["train"]] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert pairs["train"][0]["image"].endswith("imgs/FLARE22_Tr_0001_0000.nii.gz")
    assert pairs["train"][0]["label"].endswith("labels/FLARE22_Tr_0001.nii.gz")
    assert pairs["val"][0]["slice"] is None
    with pytest.raises(UserError, match="'FLARE22_Tr_0009'"):
        data.list_finetune_pairs(tmp_path, {"train": ["FLARE22_Tr_0009"], "val": []}, spatial_dims=3)
    os.remove(tmp_path / "labels" / "FLARE22_Tr_0002.nii.gz")
    with pytest.raises(UserError, match="FLARE22_Tr_0002_0000.nii.gz has no label"):
        data.list_finetune_pairs(tmp_path, split, spatial_dims=3)
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="both images/ and imgs/"):
        data.list_finetune_pairs(tmp_path, split, spatial_dims=3)

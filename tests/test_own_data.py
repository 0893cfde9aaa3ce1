"""Your own data (issue 15): nnU-Net v2 raw and Decathlon layouts, any label set, any split, the
label-budget axis.

Unit tests: label sets from both ``dataset.json`` styles, layout recognition, the Decathlon
listing against MONAI's ``load_decathlon_datalist``, ``dataset.json`` files that disagree with
their folders, deterministic splits and nnU-Net's folds, the scoring rules of other label sets,
the budget table and figure. End to end, through the scripts' command lines (``main(get_args_parser()
.parse_args(...))`` and one subprocess): phantoms relabelled to 5 classes in the nnU-Net v2
layout, preprocessed, pretrained for one epoch, fine-tuned on the automatic split, predicted
and scored, then the label-budget grid; the same phantoms in the Decathlon layout; and the
FLARE path giving the same files whichever way it is asked for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import data
import export_model
import finetune
import main_finetune
import main_simsiam
import make_phantoms
import metrics
import predict
import preprocess_flare_labelled
import preprocess_flare_unlabelled
import preprocess_labelled
import report
import reproduce_table as rt
import runqueue
from conftest import cli_errors, run_main, tree_hashes
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: FLARE ids -> the 5 classes of the relabelled data set (both kidneys are one class; other organs background)
RELABEL = {1: 1, 2: 2, 13: 2, 3: 3, 11: 4}
NNUNET_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "stomach": 4}
#: the Decathlon set: 3 classes, ids as keys
DECATHLON_LABELS = {"0": "background", "1": "liver", "2": "spleen"}
DECATHLON_RELABEL = {1: 1, 3: 2}


# ---------------------------------------------------------------------------------------
# Data sets made from the phantoms
# ---------------------------------------------------------------------------------------


def _relabel(src: Path, dst: Path, mapping: dict[int, int]) -> None:
    img = nib.load(str(src))
    lab = np.asarray(img.dataobj)
    out = np.zeros_like(lab)
    for a, b in mapping.items():
        out[lab == a] = b
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, img.affine, img.header), str(dst))


def write_nnunet(flare_dir: Path, out: Path, n_cases: int, n_test: int = 0) -> Path:
    """An nnU-Net v2 raw data set ``Dataset042_Abd`` of the first ``n_cases`` phantoms relabelled
    to 5 classes (names in dataset.json), and ``n_test`` more as imagesTs/."""
    root = out / "Dataset042_Abd"
    for i in range(1, n_cases + n_test + 1):
        src = f"FLARE22_Tr_{i:04d}"
        case = f"abd_{i:03d}"
        folder = "imagesTr" if i <= n_cases else "imagesTs"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(flare_dir / "images" / f"{src}_0000.nii.gz", root / folder / f"{case}_0000.nii.gz")
        if i <= n_cases:
            _relabel(flare_dir / "labels" / f"{src}.nii.gz", root / "labelsTr" / f"{case}.nii.gz", RELABEL)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": NNUNET_LABELS,
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
                "name": "Abd",
            },
            indent=2,
        )
    )
    return root


def write_decathlon(flare_dir: Path, out: Path, n_cases: int) -> Path:
    """A Decathlon task ``Task42_Abd`` (3 classes; images without a channel suffix)."""
    root = out / "Task42_Abd"
    training = []
    for i in range(1, n_cases + 1):
        src, case = f"FLARE22_Tr_{i:04d}", f"abd_{i}"
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(flare_dir / "images" / f"{src}_0000.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
        _relabel(flare_dir / "labels" / f"{src}.nii.gz", root / "labelsTr" / f"{case}.nii.gz", DECATHLON_RELABEL)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Abd",
                "modality": {"0": "CT"},
                "labels": DECATHLON_LABELS,
                "numTraining": n_cases,
                "training": training,
                "test": [],
            },
            indent=2,
        )
    )
    return root


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_phantoms")
    made = make_phantoms.generate_dataset(
        root / "flare", n_labelled=6, n_unlabelled=0, seed=5, size_xy=64, n_slices=12, n_train=3
    )
    return {"root": root, "flare": Path(made["labelled_dir"]), "split": made["split_path"]}


def _touch_nifti(path: Path, shape=(4, 4, 3), value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.int16), np.eye(4)), str(path))


# ---------------------------------------------------------------------------------------
# Label sets and layouts
# ---------------------------------------------------------------------------------------


def test_label_sets_from_both_dataset_json_styles():
    nn = data.parse_label_set({"background": 0, "liver": 1, "kidney": 2}, "a.json")
    dec = data.parse_label_set({"0": "background", "2": "kidney", "1": "liver"}, "b.json")
    assert nn == dec and nn.names == ("background", "liver", "kidney") and nn.n_classes == 3
    assert nn.to_json() == {"0": "background", "1": "liver", "2": "kidney"}
    assert data.parse_label_set(nn.to_json(), "manifest") == nn  # a manifest's record reads back
    assert data.FLARE_LABELS.is_flare and not nn.is_flare and data.FLARE_LABELS.n_classes == 14
    bad = {
        "id 2 is missing": {"background": 0, "liver": 1, "kidney": 3},
        "is a region": {"background": 0, "liver": 1, "organs": [1, 2]},
        "'ignore' label": {"background": 0, "liver": 1, "ignore": 2},
        "both have id 1": {"background": 0, "liver": 1, "kidney": 1},
        "mixes ids and names": {"background": 0, "1": "liver"},
        "is given to two label ids": {"0": "background", "1": "liver", "2": "liver"},
        "not an integer id": {"0": "background", "x": "liver"},
        "need background and at least one class": {"background": 0},
    }
    for needle, obj in bad.items():
        with pytest.raises(UserError, match=needle):
            data.parse_label_set(obj, "c.json")


def test_layouts_are_recognised_and_the_decathlon_list_equals_monais(tmp_path):
    from monai.data import load_decathlon_datalist  # noqa: PLC0415  (the independent reference, only here)

    flare = tmp_path / "flare"
    _touch_nifti(flare / "images" / "FLARE22_Tr_0001_0000.nii.gz")
    _touch_nifti(flare / "labels" / "FLARE22_Tr_0001.nii.gz")
    nn = tmp_path / "nn"
    for c in ("x_001", "x_002"):
        _touch_nifti(nn / "imagesTr" / f"{c}_0000.nii.gz")
        _touch_nifti(nn / "labelsTr" / f"{c}.nii.gz")
    _touch_nifti(nn / "imagesTs" / "x_101_0000.nii.gz")
    (nn / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "a": 1},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    dec = tmp_path / "dec"
    training = []
    for c in ("s_1", "s_10", "s_2"):
        _touch_nifti(dec / "imagesTr" / f"{c}.nii.gz")
        _touch_nifti(dec / "labelsTr" / f"{c}.nii.gz")
        training.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    _touch_nifti(dec / "imagesTs" / "s_99.nii.gz")
    (dec / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "spleen"},
                "numTraining": 3,
                "training": training,
                "test": ["./imagesTs/s_99.nii.gz"],
            }
        )
    )
    assert [data.detect_layout(d) for d in (flare, nn, dec)] == ["flare", "nnunet", "decathlon"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="unknown layout"):
        data.detect_layout(tmp_path / "empty")

    ds = data.find_labelled_dataset(dec)
    ref = load_decathlon_datalist(
        str(dec / "dataset.json"), is_segmentation=True, data_list_key="training", base_dir=str(dec)
    )
    ours = sorted((e["image"], e["label"]) for e in ds.cases.values())
    assert ours == sorted((os.path.normpath(r["image"]), os.path.normpath(r["label"])) for r in ref)
    assert ds.labels.names == ("background", "spleen") and not ds.missing
    assert ds.test_images == {"s_99": str(dec / "imagesTs" / "s_99.nii.gz")}

    d = data.find_labelled_dataset(nn)
    assert d.layout == "nnunet" and d.channel == 0 and d.complete_cases == ["x_001", "x_002"]
    assert d.cases["x_001"]["image"].endswith("imagesTr/x_001_0000.nii.gz")
    # the images of a labelled data set, for pretraining: training and test images, never a label map
    images, layout, channel = data.find_images(nn)
    assert layout == "nnunet" and sorted(images) == ["x_001", "x_002", "x_101"]
    assert not any("labelsTr" in p for p in images.values())
    assert data.find_images(flare)[0] == {"FLARE22_Tr_0001": str(flare / "images" / "FLARE22_Tr_0001_0000.nii.gz")}
    assert data.find_images(dec, "auto")[1] == "decathlon"
    # a plain tree stays a tree: every NIfTI under it
    assert data.find_images(nn / "imagesTr")[1] == "tree"

    # 3D fine-tuning reads the raw data set: its pairs, its label set, nnU-Net's folds as the default split
    pairs = data.list_finetune_pairs(nn, {"train": ["x_002"], "val": ["x_001"]}, 3)
    assert pairs["train"] == [
        {"image": str(nn / "imagesTr" / "x_002_0000.nii.gz"), "label": str(nn / "labelsTr" / "x_002.nii.gz"),
         "case": "x_002", "slice": None}
    ]  # fmt: skip
    ns = main_finetune.get_args_parser().parse_args(["--data_dir", str(nn), "--spatial_dims", "3"])
    ns.chkpt_dir, ns.run_name = str(tmp_path), "r"
    assert finetune.data_labels(ns).names == ("background", "a")
    with pytest.raises(UserError, match="holds no split.json: pass --split_path, or --val_fraction"):
        finetune.resolve_split_path(ns)
    (nn / "splits_final.json").write_text(json.dumps([{"train": ["x_001"], "val": ["x_002"]}] * 2))
    assert finetune.resolve_split_path(ns) == str(nn / "splits_final.json") and ns.fold == 0
    assert data.finetune_cases(dec, 3) == ["s_1", "s_10", "s_2"]


def test_dataset_json_that_disagrees_with_its_files_is_named(tmp_path):
    nn = tmp_path / "nn"
    for c in ("x_001", "x_002", "x_003"):
        _touch_nifti(nn / "imagesTr" / f"{c}_0000.nii.gz")
        _touch_nifti(nn / "imagesTr" / f"{c}_0001.nii.gz")
        _touch_nifti(nn / "labelsTr" / f"{c}.nii.gz")
    (nn / "imagesTr" / "x_003_0000.nii.gz").unlink()  # a case whose CT channel is missing
    dj = nn / "dataset.json"

    def write(**kw):
        obj = {
            "channel_names": {"0": "CT", "1": "PET"},
            "labels": {"background": 0, "a": 1},
            "numTraining": 3,
            "file_ending": ".nii.gz",
        }
        obj.update(kw)
        dj.write_text(json.dumps(obj))

    write()
    with pytest.raises(UserError, match=r"declares 2 image channels \(0 CT, 1 PET\); CT is one channel: .*--channel"):
        data.find_labelled_dataset(nn)
    ds = data.find_labelled_dataset(nn, channel=0)
    assert ds.complete_cases == ["x_001", "x_002"] and "no image" in ds.missing["x_003"]
    assert data.find_labelled_dataset(nn, channel=1).complete_cases == ["x_001", "x_002", "x_003"]
    with pytest.raises(UserError, match="--channel 2"):
        data.find_labelled_dataset(nn, channel=2)
    write(numTraining=5)
    with pytest.raises(UserError, match=rf"{dj} declares numTraining 5, but .* hold 3 cases"):
        data.find_labelled_dataset(nn, channel=0)
    write(channel_names={"0": "CT"})
    with pytest.raises(UserError, match=r"x_001_0001.nii.gz is channel 1, but .* declares the channels \[0\]"):
        data.find_labelled_dataset(nn)
    write(file_ending=".mha")
    with pytest.raises(UserError, match="file_ending '.mha' is not NIfTI"):
        data.find_labelled_dataset(nn, channel=0)
    dj.write_text('{"channel_names": {"0": "CT"}, "labels": ')
    with pytest.raises(UserError, match=f"cannot read {dj}"):
        data.find_labelled_dataset(nn)
    dj.write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"})
    )
    with pytest.raises(UserError, match="has no 'numTraining'"):
        data.find_labelled_dataset(nn)

    dec = tmp_path / "dec"
    _touch_nifti(dec / "imagesTr" / "s_1.nii.gz")
    _touch_nifti(dec / "labelsTr" / "s_1.nii.gz")
    entries = [
        {"image": "./imagesTr/s_1.nii.gz", "label": "./labelsTr/s_1.nii.gz"},
        {"image": "./imagesTr/s_2.nii.gz", "label": "./labelsTr/s_2.nii.gz"},
    ]
    obj = {"labels": {"0": "background", "1": "spleen"}, "numTraining": 2, "training": entries}
    (dec / "dataset.json").write_text(json.dumps(obj))
    ds = data.find_labelled_dataset(dec)
    assert (
        ds.complete_cases == ["s_1"]
        and "listed in" in ds.missing["s_2"]
        and "s_2.nii.gz is missing" in ds.missing["s_2"]
    )
    (dec / "dataset.json").write_text(json.dumps({**obj, "numTraining": 3}))
    with pytest.raises(UserError, match="declares numTraining 3 but lists 2 training cases"):
        data.find_labelled_dataset(dec)
    (dec / "dataset.json").write_text(json.dumps({**obj, "modality": {"0": "T2", "1": "ADC"}}))
    with pytest.raises(UserError, match="declares 2 modalities"):
        data.find_labelled_dataset(dec)
    # nnU-Net v1's raw layout: the list names imagesTr/x.nii.gz, the file is imagesTr/x_0000.nii.gz
    (dec / "imagesTr" / "s_1.nii.gz").rename(dec / "imagesTr" / "s_1_0000.nii.gz")
    (dec / "dataset.json").write_text(json.dumps(obj))
    assert data.find_labelled_dataset(dec).cases["s_1"]["image"].endswith("s_1_0000.nii.gz")


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def test_automatic_split_is_deterministic_and_stable():
    cases = [f"c{i:02d}" for i in range(20)]
    a = data.make_split(cases, 0.25, 3)
    assert a == data.make_split(list(reversed(cases)), 0.25, 3)  # input order does not count
    assert len(a["val"]) == 5 and a["val"] == sorted(a["val"]) and sorted(a["train"] + a["val"]) == cases
    assert a != data.make_split(cases, 0.25, 4)
    # the documented order, computed independently: SHA-256 of "<seed>:<case>" (no numpy stream involved)
    order = sorted(cases, key=lambda c: hashlib.sha256(f"3:{c}".encode()).hexdigest())
    assert a["train"] == order[5:] and a["val"] == sorted(order[:5])
    # a case added later leaves the others in their order
    b = data.make_split([*cases, "c99"], 0.25, 3)
    assert [c for c in b["train"] if c != "c99"] == [c for c in order if c in b["train"]]
    # at least one validation and one training case
    two = data.make_split(["a", "b"], 0.9, 0)
    assert len(two["val"]) == 1 and len(two["train"]) == 1
    assert len(data.make_split(["a", "b"], 0.01, 0)["val"]) == 1
    for fraction, n, needle in ((0.0, 5, "between 0 and 1"), (1.0, 5, "between 0 and 1"), (0.5, 1, "at least 2")):
        with pytest.raises(UserError, match=needle):
            data.make_split([f"c{i}" for i in range(n)], fraction, 0)


def test_nnunet_folds_and_split_files(tmp_path):
    folds = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c", "a"], "val": ["b"]}]
    p = tmp_path / "splits_final.json"
    p.write_text(json.dumps(folds))
    assert data.load_split(p, 1) == {"train": ["c", "a"], "val": ["b"]}  # train order kept
    with pytest.raises(UserError, match="lists 2 folds .*--fold k"):
        data.load_split(p)
    with pytest.raises(UserError, match=r"--fold 2: .* has folds 0..1"):
        data.load_split(p, 2)
    plain = tmp_path / "split.json"
    plain.write_text(json.dumps(data.split_file_record(folds[0], {"val_fraction": 0.3})))
    assert data.load_split(plain) == folds[0]
    with pytest.raises(UserError, match="--fold 0 picks a fold"):
        data.load_split(plain, 0)
    assert data.same_split_file(str(plain), folds[0]) and not data.same_split_file(
        str(tmp_path / "none.json"), folds[0]
    )
    with pytest.raises(UserError, match="holds another split"):
        data.same_split_file(str(plain), folds[1])


# ---------------------------------------------------------------------------------------
# Scores and the budget report
# ---------------------------------------------------------------------------------------


def test_scoring_rules_of_another_label_set():
    five = data.LabelSet(("background", "liver", "kidney", "spleen", "stomach", "aorta"), "x.json")
    with pytest.raises(UserError, match=r"not FLARE 2022's: give the NSD tolerance with --nsd_tolerance_mm"):
        metrics.scoring_rules(five, None)
    with pytest.raises(UserError, match=r"has no tolerance for label ids \[5\]"):
        metrics.scoring_rules(five, metrics.parse_tolerance_mm('{"1": 1, "2": 2, "3": 3, "4": 4}'))
    with pytest.raises(UserError, match=r"names label ids \[9\] outside the set"):
        metrics.scoring_rules(five, {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 9: 1})
    for bad in ("nan", "-1", '{"1": "x"}', "[1, 2]", "two"):
        with pytest.raises(UserError, match="--nsd_tolerance_mm"):
            metrics.parse_tolerance_mm(bad)
    rules = metrics.scoring_rules(five, metrics.parse_tolerance_mm('{"1": 1, "2": 2, "3": 3, "4": 4, "5": 0.5}'))
    assert rules.z_axis is None and rules.record()["slice_range_rule"] == []  # FLARE's rule is for FLARE's organs
    flare = metrics.scoring_rules()
    assert flare.z_axis == -1 and flare.tolerance_of(12) == 7.0 and flare.record()["slice_range_rule"] == [5, 6, 10]

    # id 5 here is not the aorta: scored on the whole volume, each class with its own tolerance
    rng = np.random.default_rng(0)
    label = np.zeros((24, 24, 10), np.uint8)
    label[4:14, 4:14, 2:8] = 5
    label[14:20, 10:20, 1:9] = 2
    pred = label.copy()
    pred[rng.random(label.shape) < 0.05] = 5
    pred[:, :, 8:] = np.where(pred[:, :, 8:] == 0, 5, pred[:, :, 8:])  # extra "aorta" outside the label's z range
    got = metrics.organ_scores(pred, label, (1.0, 1.0, 2.5), 6, rules.tolerance_mm, z_axis=rules.z_axis)
    for i in range(1, 6):
        alone = metrics.organ_scores(pred, label, (1.0, 1.0, 2.5), 6, rules.tolerance_of(i), z_axis=None)[i]
        assert got[i] == alone
    assert got[5]["dice"] < metrics.organ_scores(pred, label, (1.0, 1.0, 2.5), 6, 0.5, z_axis=-1)[5]["dice"]


def test_budget_table_and_figure(tmp_path):
    rows = runqueue.parse_rows("none,0.3-0.6")
    per_budget = {}
    dsc = {1: {"none": [0.5, 0.7], "0.3-0.6": [0.6, None]}, 4: {"none": [0.8, 0.9], "0.3-0.6": [0.85, 0.95]}}
    for n, by_row in dsc.items():
        per_budget[n] = {
            r.key: {
                "label": r.label,
                "runs": ["a", "b"],
                "dsc": by_row[r.key],
                "summary": [None, None],
                "organs": [None if d is None else {"dice_mean": d - 0.1} for d in by_row[r.key]],
            }
            for r in rows
        }
    brs = report.budget_rows(rows, per_budget)
    got = {(b["key"], b["n_train_cases"]): b for b in brs}
    assert got[("none", 1)]["mean"] == pytest.approx(0.6) and got[("none", 1)]["std"] == pytest.approx(0.1)
    assert got[("0.3-0.6", 1)]["n_finished"] == 1 and got[("0.3-0.6", 1)]["std"] == 0.0
    assert got[("0.3-0.6", 4)]["organ_dice_mean"] == pytest.approx(0.8)
    files = report.render_budget(rows, per_budget, str(tmp_path))
    text = Path(files["md"]).read_text()
    assert "| N = 1 | N = 4 |" in text and "| [0.3, 0.6] | 0.600 ± 0.000 (1/2) | 0.900 ± 0.050 (2/2) |" in text
    with open(files["csv"]) as f:
        assert len(list(csv.reader(f))) == 1 + 4
    png = report.plot_label_budget(rows, per_budget, str(tmp_path / "label_budget.png"))
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 200


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


def _finetune_argv(data_dir, chkpt_dir, *extra):
    return [
        "--data_dir",
        data_dir,
        "--low_resource_mode",
        "--crop_size",
        "64",
        "--batch_size",
        "2",
        "--n_crops_per_ct",
        "1",
        "--n_epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--num_workers",
        "0",
        "--max_images",
        "6",
        "--sw_batch_size",
        "8",
        "--n_vis",
        "1",
        "--no-progress",
        "--ignore_user_warning",
        "--device",
        "cpu",
        "--chkpt_dir",
        chkpt_dir,
        *extra,
    ]


GRID = [
    "--preset",
    "paper",
    "--rows",
    "none,0.3-0.6",
    "--pretrain_seeds",
    "3",
    "--finetune_seeds",
    "1",
    "--n_train_cases",
    "1,2",
    "--embedding_size",
    "12",
    "--low_resource_mode",
    "--crop_size",
    "32",
    "--finetune_crop_size",
    "64",
    "--no-use_amp",
    "--n_pretrain_epochs",
    "1",
    "--pretrain_batch_size",
    "8",
    "--max_pretrain_images",
    "16",
    "--n_finetune_epochs",
    "1",
    "--finetune_batch_size",
    "2",
    "--finetune_warmup_epochs",
    "0",
    "--max_finetune_images",
    "6",
    "--sw_batch_size",
    "16",
    "--eval_every",
    "1",
    "--n_vis",
    "0",
    "--num_workers",
    "0",
    "--workers",
    "1",
    "--no-native_table",
    "--figure_pairs",
    "50",
    "--device",
    "cpu",
    "--no-progress",
]


@pytest.mark.slow
def test_nnunet_five_classes_end_to_end(phantoms, tmp_path, capsys):
    raw = write_nnunet(phantoms["flare"], tmp_path, n_cases=5, n_test=1)
    lab2d, unl2d = tmp_path / "abd_2d", tmp_path / "abd_unl"
    # preprocessing through the neutral alias, as a real command line: the automatic split is written beside it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "preprocess_labelled.py"), "--data_dir", str(raw), "--output_dir", str(lab2d)]
    proc = subprocess.run([*cmd, "--val_fraction", "0.4", "--split_seed", "2"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((lab2d / "manifest.json").read_text())
    assert manifest["args"]["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "stomach"}
    assert manifest["args"]["layout"] == "nnunet" and manifest["n_cases"] == 5
    split = data.load_split(lab2d / "split.json")
    assert split == data.make_split([f"abd_{i:03d}" for i in range(1, 6)], 0.4, 2) and len(split["val"]) == 2
    present = set()
    for e in manifest["cases"].values():
        present |= set(e["labels_present"])
    assert present <= {0, 1, 2, 3, 4} and {1, 2, 3} <= present  # the relabelled classes, not FLARE's ids
    # a rerun with another split into the same folder is refused; the same flags skip every case
    again = subprocess.run([*cmd, "--val_fraction", "0.2"], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "holds another split" in again.stderr
    assert run_main(preprocess_labelled, [*cmd[2:], "--val_fraction", "0.4", "--split_seed", "2"])["n_skipped"] == 5

    # the images of the data set (training and test, channel 0) for pretraining; a 1-epoch SimSiam run
    res = run_main(preprocess_flare_unlabelled, ["--data_dir", raw, "--output_dir", unl2d])
    assert res["n_cases"] == 6 and not res["failed"]
    pre = run_main(
        main_simsiam,
        [
            "--data_dir", unl2d, "--chkpt_dir", tmp_path / "pre", "--low_resource_mode", "--embedding_size", "12",
            "--crop_size", "32", "--batch_size", "8", "--n_epochs", "1", "--max_images", "16", "--num_workers", "0",
            "--min_iou", "0.3", "--max_iou", "0.6", "--device", "cpu", "--no-progress", "--run_name", "pre",
        ],
    )  # fmt: skip
    assert pre["epochs_done"] == 1

    # fine-tuning from it: classes, names and split from the folder; a per-class tolerance
    tol = '{"1": 5, "2": 3, "3": 3, "4": 5}'
    ft = run_main(
        main_finetune,
        _finetune_argv(lab2d, tmp_path / "ft", "--chkpt_path", pre["weights"], "--embedding_size", "12",
                       "--nsd_tolerance_mm", tol, "--run_name", "ft"),
    )  # fmt: skip
    assert ft["epochs_done"] == 1 and ft["split"] == str(lab2d / "split.json") and ft["train_cases"] == split["train"]
    scores = json.loads(Path(ft["scores"]).read_text())
    assert list(scores["summary"]["per_organ"]) == ["liver", "kidney", "spleen", "stomach"]
    assert scores["scoring"]["nsd_tolerance_mm"] == {"1": 5.0, "2": 3.0, "3": 3.0, "4": 5.0}
    assert scores["scoring"]["slice_range_rule"] == [] and scores["scoring"]["labels"]["4"] == "stomach"
    with open(ft["scores_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["organ"] for r in rows} == {"liver", "kidney", "spleen", "stomach"}
    assert {r["tolerance_mm"] for r in rows if r["organ"] == "kidney"} == {"3"}
    ckpt = torch.load(ft["weights"], weights_only=True)
    assert ckpt["n_classes"] == 5 and ckpt["labels"]["2"] == "kidney"
    run_main(export_model, ["--chkpt_path", ft["weights"], "--format", "swinunetr", "-o", tmp_path / "m.pt"])
    card = json.loads((tmp_path / "m.pt.json").read_text())
    assert card["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "stomach"}
    assert "liver, kidney, spleen, stomach" in card["intended_use"]
    assert card["validation"]["challenge_grade"]["scoring"]["nsd_tolerance_mm"]["2"] == 3.0
    # --n_classes is checked against the folder's label set; another label set needs a tolerance
    with pytest.raises(UserError, match=r"--n_classes 14, but the label set of --data_dir .* has 5 classes"):
        run_main(main_finetune, _finetune_argv(lab2d, tmp_path / "ft2", "--n_classes", "14", "--nsd_tolerance_mm", "2"))
    with pytest.raises(UserError, match="is not FLARE 2022's: give the NSD tolerance"):
        run_main(main_finetune, _finetune_argv(lab2d, tmp_path / "ft2"))

    # evaluation of new scans: predict.py names the classes from the checkpoint, metrics.py from dataset.json
    val = split["val"][0]
    preds = tmp_path / "preds"
    run_main(predict, ["-i", raw / "imagesTr" / f"{val}_0000.nii.gz", "-o", preds, "--chkpt_path", ft["weights"],
                   "--save_probabilities", "--no-progress"])  # fmt: skip
    probs = np.load(preds / f"{val}_probabilities.npz")
    assert list(probs["label_names"]) == ["background", "liver", "kidney", "spleen", "stomach"]
    assert int(np.asarray(nib.load(str(preds / f"{val}.nii.gz")).dataobj).max()) <= 4
    labels_dir = tmp_path / "val_labels"
    labels_dir.mkdir()
    shutil.copy(raw / "labelsTr" / f"{val}.nii.gz", labels_dir)
    summary = run_main(
        metrics,
        ["--pred_dir", preds, "--label_dir", labels_dir, "--labels", raw / "dataset.json", "--tolerance_mm", "2",
         "--out_dir", tmp_path / "scores"],
    )  # fmt: skip
    assert list(summary["per_organ"]) == ["liver", "kidney", "spleen", "stomach"]
    assert json.loads((tmp_path / "scores" / "eval_scores.json").read_text())["scoring"]["nsd_tolerance_mm"]["4"] == 2.0

    # the label-budget grid on this data set: 1 pretraining, fine-tunings with the first 1 and 2 training cases
    out = tmp_path / "grid"
    args = rt.get_args_parser().parse_args(
        ["--output_dir", str(out), "--unlabelled_dir", str(unl2d), "--labelled_dir", str(lab2d),
         "--nsd_tolerance_mm", "2", *GRID]
    )  # fmt: skip
    res = rt.main(args)
    assert res["n_runs"] == 5 and res["n_finished"] == 5
    for n in (1, 2):
        for name in (f"ft_none_init3_ft1_n{n}", f"ft_iou0.30-0.60_s3_ft1_n{n}"):
            r = runqueue.read_result(str(out / "runs"), name)
            assert r["train_cases"] == split["train"][:n]  # the same first N cases for every row
        table = (out / f"table_n{n}.md").read_text()
        assert "| - (no pretraining) |" in table and "| [0.3, 0.6] |" in table
        assert (out / f"organs_n{n}.md").read_text().count("| kidney |") == 2  # Dice and NSD tables
    with open(out / "budget.csv") as f:
        budget = list(csv.DictReader(f))
    assert [(b["interval"], b["n_train_cases"], b["n_finished"]) for b in budget] == [
        ("- (no pretraining)", "1", "1"),
        ("- (no pretraining)", "2", "1"),
        ("[0.3, 0.6]", "1", "1"),
        ("[0.3, 0.6]", "2", "1"),
    ]
    for b in budget:
        name = (
            "ft_none_init3" if b["interval"].startswith("-") else "ft_iou0.30-0.60_s3"
        ) + f"_ft1_n{b['n_train_cases']}"
        assert float(b["mean_dsc"]) == pytest.approx(
            runqueue.read_result(str(out / "runs"), name)["best_dice_paper"], abs=1e-6
        )
    with Image.open(res["figures"]["label_budget"]) as im:
        assert im.size[0] > 600
    grid = json.loads((out / "grid.json").read_text())
    assert grid["n_train_cases"] == [1, 2] and grid["split"] == split
    printed = capsys.readouterr().out
    assert "N = 1" in printed and "N = 2" in printed
    # a budget above the split's training cases is refused before anything runs
    too_many = rt.get_args_parser().parse_args(
        ["--output_dir", str(tmp_path / "g2"), "--unlabelled_dir", str(unl2d), "--labelled_dir", str(lab2d),
         "--nsd_tolerance_mm", "2", *GRID[:8], "--n_train_cases", "1,9", *GRID[10:]]
    )  # fmt: skip
    with pytest.raises(UserError, match=r"--n_train_cases 9: the split .* has 3 training cases"):
        rt.main(too_many)


@pytest.mark.slow
def test_decathlon_preprocessing_and_fine_tuning_with_a_split_made_by_the_run(phantoms, tmp_path):
    raw = write_decathlon(phantoms["flare"], tmp_path, n_cases=4)
    lab2d = tmp_path / "dec_2d"
    res = run_main(preprocess_flare_labelled, ["--data_dir", raw, "--output_dir", lab2d])  # the default split: 20 %
    assert res["n_cases"] == 4 and not res["failed"]
    manifest = json.loads((lab2d / "manifest.json").read_text())
    assert manifest["args"]["labels"] == DECATHLON_LABELS and manifest["args"]["layout"] == "decathlon"
    assert data.load_split(lab2d / "split.json") == data.make_split(["abd_1", "abd_2", "abd_3", "abd_4"], 0.2, 0)
    # the run splits the folder's cases itself (--val_fraction) and keeps the split in its files
    ft = run_main(
        main_finetune,
        _finetune_argv(lab2d, tmp_path / "ft", "--nsd_tolerance_mm", "2", "--val_fraction", "0.5", "--split_seed", "1",
                       "--run_name", "dec", "--n_train_cases", "1"),
    )  # fmt: skip
    own = tmp_path / "ft" / "dec_files" / "split.json"
    made = data.make_split(["abd_1", "abd_2", "abd_3", "abd_4"], 0.5, 1)
    assert ft["split"] == str(own) and data.load_split(own) == made and ft["train_cases"] == made["train"][:1]
    assert list(json.loads(Path(ft["scores"]).read_text())["summary"]["per_organ"]) == ["liver", "spleen"]
    # --resume with another budget is refused (the budget defines the run)
    with pytest.raises(UserError, match="n_train_cases: 1 -> 2"):
        run_main(
            main_finetune,
            _finetune_argv(lab2d, tmp_path / "ft", "--nsd_tolerance_mm", "2", "--val_fraction", "0.5",
                           "--split_seed", "1", "--run_name", "dec", "--n_train_cases", "2", "--resume"),
        )  # fmt: skip
    # the evaluation alone reads the classes back from the model and the data and checks they agree
    ev = run_main(
        main_finetune,
        _finetune_argv(lab2d, tmp_path / "ev", "--nsd_tolerance_mm", "2", "--eval_only", "--chkpt_path", ft["weights"],
                       "--split_path", own),
    )  # fmt: skip
    assert ev["dice_paper"] == pytest.approx(ft["dice_paper"], abs=1e-6)
    # a model of other classes than the data's is refused by name
    other = tmp_path / "other_2d"
    shutil.copytree(lab2d, other)
    m = json.loads((other / "manifest.json").read_text())
    m["args"]["labels"]["2"] = "kidney"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        UserError, match=r"was trained on the classes 0 background, 1 liver, 2 spleen; --data_dir holds"
    ):
        run_main(
            main_finetune,
            _finetune_argv(other, tmp_path / "ev2", "--nsd_tolerance_mm", "2", "--eval_only", "--chkpt_path",
                           ft["weights"], "--split_path", own),
        )  # fmt: skip


def test_bad_cases_of_another_label_set_are_skipped_and_listed(phantoms, tmp_path, capsys, monkeypatch):
    raw = write_nnunet(phantoms["flare"], tmp_path, n_cases=3)
    # a label id outside the declared set (5 in a 0..4 set) and a case listed without its image
    lab = nib.load(str(raw / "labelsTr" / "abd_002.nii.gz"))
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(raw / "labelsTr" / "abd_002.nii.gz"))
    (raw / "imagesTr" / "abd_003_0000.nii.gz").unlink()
    code, errors = cli_errors(
        preprocess_labelled,
        ["--data_dir", raw, "--output_dir", tmp_path / "o", "--val_fraction", "0.5"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and len(errors) == 1 and "abd_002" in errors[0] and "abd_003" not in errors[0]
    # abd_003 has no image: not in the automatic split (made of complete cases), reported beside it
    assert sorted(
        data.load_split(tmp_path / "o" / "split.json")["train"] + data.load_split(tmp_path / "o" / "split.json")["val"]
    ) == ["abd_001", "abd_002"]
    code, errors = cli_errors(
        preprocess_labelled,
        ["--data_dir", raw, "--output_dir", tmp_path / "o2", "--split_path", _write(tmp_path / "s.json", {"train": ["abd_001"], "val": ["abd_003", "abd_002"]})],
        capsys,
        monkeypatch,
    )  # fmt: skip
    assert code == 1 and "abd_002" in errors[0] and "abd_003" in errors[0]
    assert (tmp_path / "o2" / "split.json").is_file()  # a non-FLARE data set's split is kept beside its output


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_flare_path_gives_the_same_files(phantoms, tmp_path):
    """The FLARE layout, asked for by default, with --layout flare, or through the alias, writes the
    same bytes, records no label set, layout or split (its manifest's arguments are the keys they
    were before data sets of other layouts existed), and its unlabelled tree the same."""
    flare = tmp_path / "flare"  # two of the phantoms, in the FLARE layout
    for i in (1, 2):
        for sub, name in (("images", f"FLARE22_Tr_{i:04d}_0000.nii.gz"), ("labels", f"FLARE22_Tr_{i:04d}.nii.gz")):
            (flare / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(phantoms["flare"] / sub / name, flare / sub / name)
    split = _write(tmp_path / "split.json", {"train": ["FLARE22_Tr_0002"], "val": ["FLARE22_Tr_0001"]})
    runs = {
        "default": [],
        "layout": ["--layout", "flare"],
    }
    hashes = {}
    for name, extra in runs.items():
        out = tmp_path / name
        run_main(preprocess_flare_labelled, ["--data_dir", flare, "--output_dir", out, "--split_path", split, *extra])
        hashes[name] = tree_hashes(out)
    alias = tmp_path / "alias"
    run_main(preprocess_labelled, ["--data_dir", flare, "--output_dir", alias, "--split_path", split])
    hashes["alias"] = tree_hashes(alias)
    # the absolute paths in manifest.json name each output's own folder; everything else is byte for byte equal
    for name in ("layout", "alias"):
        assert {k: v for k, v in hashes[name].items() if "manifest" not in k} == {
            k: v for k, v in hashes["default"].items() if "manifest" not in k
        }
        assert (tmp_path / name / "manifest.json").read_text() == (tmp_path / "default" / "manifest.json").read_text()
    args = json.loads((tmp_path / "default" / "manifest.json").read_text())["args"]
    assert set(args) == {
        "kind",
        "spatial_dims",
        "a_min",
        "a_max",
        "pixdim",
        "min_xy",
        "png_bits",
        "png_quantization",
        "format_version",
    }
    assert not (tmp_path / "default" / "split.json").exists()
    assert data.manifest_labels(data.read_manifest(str(tmp_path / "default")), "m") == data.FLARE_LABELS
    tree = tmp_path / "tree"
    unl = tmp_path / "unl"
    tree.mkdir()
    shutil.copy(flare / "images" / "FLARE22_Tr_0001_0000.nii.gz", tree / "Case_00001_0000.nii.gz")
    run_main(preprocess_flare_unlabelled, ["--data_dir", tree, "--output_dir", unl])
    assert set(json.loads((unl / "manifest.json").read_text())["args"]) == set(args)
    # a FLARE folder given whole to the unlabelled script: its images only (it used to stop on image + label pairs)
    res = run_main(preprocess_flare_unlabelled, ["--data_dir", flare, "--output_dir", tmp_path / "imgs_only"])
    assert res["n_cases"] == 2
    assert json.loads((tmp_path / "imgs_only" / "manifest.json").read_text())["args"]["layout"] == "flare"
    # FLARE with a split of its own: written beside the output, the rest as FLARE's
    own = tmp_path / "own_split"
    run_main(preprocess_flare_labelled, ["--data_dir", flare, "--output_dir", own, "--val_fraction", "0.5"])
    assert data.load_split(own / "split.json") == data.make_split(["FLARE22_Tr_0001", "FLARE22_Tr_0002"], 0.5, 0)
    assert set(json.loads((own / "manifest.json").read_text())["args"]) == set(args)
    # the fine-tuning's default split of a FLARE folder is still the paper's
    ns = main_finetune.get_args_parser().parse_args(["--data_dir", str(tmp_path / "default")])
    ns.chkpt_dir, ns.run_name = str(tmp_path), "x"
    assert finetune.resolve_split_path(ns) == data.DEFAULT_SPLIT_PATH


def test_fine_tuning_refuses_data_without_a_split(phantoms, tmp_path):
    raw = write_nnunet(phantoms["flare"], tmp_path, n_cases=3)
    lab2d = tmp_path / "o"
    split = _write(tmp_path / "s.json", {"train": ["abd_001"], "val": ["abd_002", "abd_003"]})
    run_main(preprocess_labelled, ["--data_dir", raw, "--output_dir", lab2d, "--split_path", split])
    (lab2d / "split.json").unlink()
    with pytest.raises(UserError, match=r"holds no split.json: pass --split_path, or --val_fraction F"):
        run_main(main_finetune, _finetune_argv(lab2d, tmp_path / "ft", "--nsd_tolerance_mm", "2"))
    with pytest.raises(UserError, match="give one of them"):
        run_main(main_finetune, _finetune_argv(lab2d, tmp_path / "ft", "--split_path", split, "--val_fraction", "0.5"))

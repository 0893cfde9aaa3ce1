"""Fidelity to the original code (issue 13): the paper preset is the original experiment, the
original's command lines, default folders, preprocessed folders and checkpoints work as they
are, PNG values are quantised as there, and DINO's teacher runs as there.

The original's values come from one table, ``original.py`` (each with its source); the README
renders the same table. Folders "written by the original" are made here by a writer of our
own that follows the original scripts' file names and array layout (the raw (X, Y) array of
each slice of the (C, X, Y, Z) volume, ``(v * 255).astype(uint8)``, ``<stem>_<i>.png``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep
from PIL import Image
from torch._dynamo.utils import counters

import data
import engine
import finetune
import main_dino
import main_finetune
import main_simsiam
import make_phantoms
import models
import original
import predict
import preprocess_flare_labelled
import preprocess_flare_unlabelled
import preprocessing
import pretrain
import reproduce_table
from transforms import LoadSlice2Dd, LoadSliceAndLabel2d, check_preprocessing_record
from utils import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "preprocessing": preprocess_flare_labelled,
    "pretraining": main_simsiam,
    "fine-tuning": main_finetune,
}


# ---------------------------------------------------------------------------------------
# The original's writers: its preprocessing chain written out with MONAI's own transforms
# (not ours), its file names and layout
# ---------------------------------------------------------------------------------------


def _stem(path: str | Path) -> str:
    """The original's ``Path(name).name.split('.')[0]``."""
    return Path(path).name.split(".")[0]


def _volumes(image: str | Path, label: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The preprocessed (X, Y, Z) image and label of a raw case, by the original's
    ``get_preprocess_transforms_2d`` at its default flags, written out with MONAI's
    transforms: load, channel first, RAS, 1 x 1 x 2.5 mm (bilinear / nearest), HU
    [-500, 500] -> [0, 1] clipped, crop to the image's foreground (> 0), pad x and y to 96.
    Orientationd's labels are spelled out: the default of MONAI 1.2.0, the original's pinned
    version (newer MONAI picks them from a "space" metadata item)."""
    keys = ["img", "label"] if label is not None else ["img"]
    chain = Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=(1.0, 1.0, 2.5), mode=("bilinear", "nearest")[: len(keys)]),
            ScaleIntensityRanged(keys=["img"], a_min=-500, a_max=500, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys=keys, source_key="img"),
            SpatialPadd(keys=keys, spatial_size=(96, 96, -1)),
        ]
    )
    out = chain({"img": str(image)} | ({"label": str(label)} if label is not None else {}))
    img = out["img"][0].numpy()
    return img, (out["label"][0].numpy() if label is not None else None)


def write_original_labelled(raw_dir: str | Path, out: Path, cases) -> None:
    """``imgs/<image stem>_<i>.png`` and ``labels/<label stem>_<i>.png``, each the raw (X, Y) slice."""
    (out / "imgs").mkdir(parents=True)
    (out / "labels").mkdir()
    for case in cases:
        image = Path(data.raw_image_dir(raw_dir)) / f"{case}_0000.nii.gz"  # images/ or the original's imgs/
        label = Path(raw_dir) / "labels" / f"{case}.nii.gz"
        img, lab = _volumes(image, label)
        for i in range(img.shape[-1]):
            Image.fromarray((img[:, :, i] * 255).astype("uint8")).save(out / "imgs" / f"{_stem(image)}_{i}.png")
            Image.fromarray(lab[:, :, i].astype("uint8")).save(out / "labels" / f"{_stem(label)}_{i}.png")


def write_original_unlabelled(raw_dir: str | Path, out: Path) -> None:
    """A flat folder of ``<stem>_<i>.png``."""
    out.mkdir(parents=True)
    for image in sorted(Path(raw_dir).glob("*.nii.gz")):
        img, _ = _volumes(image)
        for i in range(img.shape[-1]):
            Image.fromarray((img[:, :, i] * 255).astype("uint8")).save(out / f"{_stem(image)}_{i}.png")


class _ProjectionHead(nn.Module):
    """The module names of lightly's SimSiamProjectionHead (3 x Linear + BatchNorm, the last without affine)."""

    def __init__(self, d_in: int, d: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d_in, d, bias=False),
            nn.BatchNorm1d(d),
            nn.ReLU(),
            nn.Linear(d, d, bias=False),
            nn.BatchNorm1d(d),
            nn.ReLU(),
            nn.Linear(d, d, bias=False),
            nn.BatchNorm1d(d, affine=False),
        )


class _PredictionHead(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 16):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d)
        )


class _Backbone(nn.Module):
    """The original's src/models.py Backbone: ``self.model`` is MONAI's SwinTransformer."""

    def __init__(self, embed: int, heads, spatial_dims: int = 2):
        super().__init__()
        self.model = SwinTransformer(
            in_chans=1,
            embed_dim=embed,
            window_size=ensure_tuple_rep(7, spatial_dims),
            patch_size=ensure_tuple_rep(2, spatial_dims),
            depths=(2, 2, 2, 2),
            num_heads=heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.1,
            norm_layer=nn.LayerNorm,
            use_checkpoint=False,
            spatial_dims=spatial_dims,
        )


class _OriginalSimSiam(nn.Module):
    """The original's SimSiam module layout: ``backbone``, ``projection_head``, ``prediction_head``."""

    def __init__(self, embed: int = 12, heads=(3, 3, 3, 3)):
        super().__init__()
        self.backbone = _Backbone(embed, heads)
        self.projection_head = _ProjectionHead(16 * embed)
        self.prediction_head = _PredictionHead()


# ---------------------------------------------------------------------------------------
# 1. The paper preset is the original code
# ---------------------------------------------------------------------------------------


def _resolve(name: str, args: argparse.Namespace):
    """Our value of a setting of ``original.PAPER_RUN``: a flag's parsed value, or the default
    of a parameter of our code (``module.Object:parameter``)."""
    if name == "n_classes":  # ours defaults to the data's label set: FLARE 2022's for the paper's data
        return finetune.run_n_classes(args, data.FLARE_LABELS)
    if ":" not in name:
        return getattr(args, name)
    where, param = name.split(":")
    mod_name, obj_name = where.split(".", 1)
    obj = importlib.import_module(mod_name)
    for part in obj_name.split("."):
        obj = getattr(obj, part)
    return inspect.signature(obj).parameters[param].default


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _preset_commands(tmp_path, capsys, *extra) -> dict[str, list[list[str]]]:
    """The command lines ``reproduce_table.py --preset paper --dry_run`` prints, by script."""
    argv = ["--preset", "paper", "--output_dir", str(tmp_path / "table"), "--dry_run", *extra]
    argv += ["--unlabelled_dir", str(tmp_path / "u"), "--labelled_dir", str(tmp_path / "l")]
    capsys.readouterr()
    reproduce_table.main(reproduce_table.get_args_parser().parse_args(argv))
    out: dict[str, list[list[str]]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        words = shlex.split(line)
        assert words[0] == "python"
        out.setdefault(words[1], []).append(words[2:])
    return out


def _stage_args(tmp_path, capsys, *extra) -> dict[str, list[argparse.Namespace]]:
    """The parsed arguments of every run of the paper grid, by stage (the script's parser
    fills what the command leaves to its defaults); preprocessing: the grid's own argv."""
    cmds = _preset_commands(tmp_path, capsys, *extra)
    assert sorted(cmds) == ["main_finetune.py", "main_simsiam.py"]
    assert len(cmds["main_simsiam.py"]) == 10 and len(cmds["main_finetune.py"]) == 24
    pre = reproduce_table.preprocess_argv("raw", "out", str(ROOT / "data" / "split.json"), 8)
    return {
        "preprocessing": [SCRIPTS["preprocessing"].get_args_parser().parse_args(pre)],
        "pretraining": [main_simsiam.get_args_parser().parse_args(c) for c in cmds["main_simsiam.py"]],
        "fine-tuning": [main_finetune.get_args_parser().parse_args(c) for c in cmds["main_finetune.py"]],
    }


def test_paper_preset_passes_the_original_values(tmp_path, capsys):
    staged = _stage_args(tmp_path, capsys)
    grid = reproduce_table.get_args_parser().parse_args(["--output_dir", "x"])
    checked = 0
    for s in original.PAPER_RUN:
        if s.stage == "grid":
            ours = getattr(grid, s.name)
            ours = tuple(int(v) for v in ours.split(",")) if "seeds" in s.name else ours
            ours = tuple(ours.split(",")) if s.name == "rows" else ours
            assert ours == s.value, (s.name, ours, s.value, s.source)
            checked += 1
            continue
        for args in staged[s.stage]:
            ours = _resolve(s.name, args)
            if s.differs is None:
                assert _same(ours, s.value), (
                    f"{s.stage} {s.name}: ours {ours!r}, the original's {s.value!r} ({s.source})"
                )
            else:
                assert not _same(ours, s.value), f"{s.stage} {s.name}: listed as different but equal"
            checked += 1
    assert checked > 60
    # the documented differences: the restoring flag gives the original's value
    for s in original.PAPER_RUN:
        if s.differs is None:
            continue
        flag = shlex.split(s.restore)
        fixed = _stage_args(tmp_path / s.name, capsys, *flag)  # reproduce_table takes the same flag
        for args in fixed[s.stage]:
            assert _same(_resolve(s.name, args), s.value), s.name


def test_the_drop_path_and_the_last_batch_as_the_original(tmp_path, capsys):
    """The two values of the issue, spelled out: drop path 0.1 in pretraining and 0.0 in
    fine-tuning (also the random encoders of the "no pretraining" row), the last partial
    fine-tuning batch kept: ceil(N / 32) steps per epoch."""
    staged = _stage_args(tmp_path, capsys)
    assert {a.drop_path_rate for a in staged["pretraining"]} == {0.1}
    assert {a.drop_path_rate for a in staged["fine-tuning"]} == {0.0}
    assert {a.drop_last for a in staged["fine-tuning"]} == {False}
    plan = reproduce_table.main(
        reproduce_table.get_args_parser().parse_args(
            ["--output_dir", str(tmp_path / "t2"), "--dry_run", "--unlabelled_dir", "u", "--labelled_dir", "l"]
        )
    )["plan"]
    inits = [r["init"] for r in plan if r.get("init")]
    assert inits and {i["config"]["drop_path_rate"] for i in inits} == {0.0}
    # FLARE's 15 training cases hold 1,515 slices: 48 steps of 32 (the last of 11), 47 with --drop_last
    assert finetune.epoch_steps(1515, 32, 1, 1, drop_last=False) == (48, 48)
    assert finetune.epoch_steps(1515, 32, 1, 1, drop_last=True) == (47, 47)
    assert finetune.epoch_steps(1515, 8, 4, 1, drop_last=False) == (48, 48)  # 4 processes: ceil(379 / 8)
    assert finetune.epoch_steps(1515, 32, 1, 5, drop_last=False) == (48, 10)  # the last step: 3 batches
    assert finetune.epoch_steps(1515, 32, 1, 5, drop_last=True) == (45, 9)


def test_a_last_partial_step_averages_the_batches_it_has():
    """train_one_epoch with every batch of a loader: 3 batches in steps of 2 accumulate 2, then 1."""
    w = nn.Parameter(torch.zeros(1))
    holder = nn.Module()
    holder.w = w
    opt = torch.optim.SGD([w], lr=1.0)
    batches = [torch.full((3,), 1.0), torch.full((3,), 2.0), torch.full((2,), 4.0)]

    def loss_fn(b):
        return (w * b).mean(), {}

    kw = dict(epoch=0, n_epochs=1, lr_schedule=np.ones(4), base_lr=1.0, amp=engine.Amp(torch.device("cpu"), False))
    engine.train_one_epoch(holder, batches, opt, loss_fn, iters_per_epoch=2, accum_iters=2, n_batches=3, **kw)
    assert w.item() == pytest.approx(-(1.5 + 4.0))  # step 1: mean of 1 and 2; step 2: the last batch alone
    w.data.zero_()
    engine.train_one_epoch(holder, batches, opt, loss_fn, iters_per_epoch=1, accum_iters=2, **kw)  # full steps only
    assert w.item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="3 batches in steps of 2 are not 1 steps"):
        engine.train_one_epoch(holder, batches, opt, loss_fn, iters_per_epoch=1, accum_iters=2, n_batches=3, **kw)


_SEGMENTATION_LOSS = finetune.Segmentation.loss_fn


def _finetune_batches(both, tmp_path, monkeypatch, *extra) -> tuple[list[int], dict]:
    """The crops per training batch of a one-epoch fine-tuning on 5 slices, batch 2."""
    sizes: list[int] = []
    real = _SEGMENTATION_LOSS

    def counting(self, batch):
        sizes.append(int(batch["image"].shape[0]))
        return real(self, batch)

    monkeypatch.setattr(finetune.Segmentation, "loss_fn", counting)
    argv = ["--data_dir", str(both["lab"]), "--split_path", both["split"], "--low_resource_mode", "--crop_size", "64"]
    argv += ["--batch_size", "2", "--n_crops_per_ct", "1", "--n_epochs", "1", "--warmup_epochs", "0", "--max_images"]
    argv += ["5", "--num_workers", "0", "--n_vis", "0", "--no-progress", "--chkpt_dir", str(tmp_path), *extra]
    res = main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    return sizes, res


def test_fine_tuning_keeps_the_last_partial_batch(both, tmp_path, monkeypatch):
    sizes, _ = _finetune_batches(both, tmp_path, monkeypatch, "--run_name", "keep")
    assert sizes == [2, 2, 1]  # ceil(5 / 2) steps, every slice seen
    last = torch.load(tmp_path / "keep_last.pt", weights_only=True)
    assert last["args"]["drop_last"] is False
    sizes, _ = _finetune_batches(both, tmp_path, monkeypatch, "--run_name", "drop", "--drop_last")
    assert sizes == [2, 2]


@pytest.mark.slow
def test_fine_tuning_compiles_the_smaller_last_batch(both, tmp_path, monkeypatch):
    """--compile (static shapes) with a last batch of another size: a second graph, the same numbers."""
    torch._dynamo.reset()
    a_sizes, a = _finetune_batches(both, tmp_path, monkeypatch, "--run_name", "eager")
    counters.clear()
    b_sizes, b = _finetune_batches(
        both, tmp_path, monkeypatch, "--run_name", "compiled", "--compile", "--compile_backend", "eager"
    )
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 2  # one for the batches of 2, one for the last batch of 1
    assert a_sizes == b_sizes == [2, 2, 1]
    la = [json.loads(x) for x in Path(a["log"]).read_text().splitlines()]
    lb = [json.loads(x) for x in Path(b["log"]).read_text().splitlines()]
    assert la[0]["train_loss"] == pytest.approx(lb[0]["train_loss"], rel=1e-5)
    assert b["dice_paper"] == pytest.approx(a["dice_paper"], abs=1e-6)


def test_debugging_defaults_are_replaced_by_the_papers():
    for d in original.DEBUG_DEFAULTS:
        mod = importlib.import_module(d.script[:-3])
        ours = getattr(mod.get_args_parser().parse_args([]), d.name)
        assert ours != d.original and (d.ours is None or ours == d.ours), (d.script, d.name, ours)
    a = main_finetune.get_args_parser().parse_args(["--data_dir", "x"])
    finetune.check_args(a)
    assert a.sw_batch_size == 512  # 2D; the original's 4 was a debugging value


def test_readme_fidelity_section_holds_the_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fidelity to the original", 1)[1].split("\n## ", 1)[0]
    assert original.render_markdown() in section
    for s in original.PAPER_RUN:
        if s.restore:
            assert f"`{s.restore}`" in section


# ---------------------------------------------------------------------------------------
# 2. The original's command lines run verbatim
# ---------------------------------------------------------------------------------------


def _sample(kind):
    """A value of the original flag's type for the command line, and what it parses to."""
    if kind is int:
        return "2", 2
    if kind is float:
        return "0.5", 0.5
    return "somewhere", "somewhere"


@pytest.mark.parametrize("script", sorted(original.ORIGINAL_FLAGS))
def test_every_flag_of_the_original_scripts_is_accepted(script):
    mod = importlib.import_module(script[:-3])
    parser = mod.get_args_parser()
    dests = {o: a for a in parser._actions for o in a.option_strings}
    argv, want = [], {}
    for flag, kind in original.ORIGINAL_FLAGS[script].items():
        assert flag in dests, f"{script} refuses the original's {flag}"
        action = dests[flag]
        if kind == "store_true":
            assert action.nargs == 0, (script, flag)
            argv.append(flag)
            want[action.dest] = True
            continue
        text, value = _sample(kind)
        if action.choices:  # --spatial_dims: the value must be one the original accepts too
            text, value = "2", 2
        argv += [flag, text]
        want[action.dest] = value
    args = parser.parse_args(argv)
    for dest, value in want.items():
        got = getattr(args, dest)
        assert got == value and type(got) is type(value), (script, dest, got, value)


def test_patience_as_a_float():
    """--patience is a float in the original: 20.0 is 20 evaluations; 20.5 is refused."""
    a = main_finetune.get_args_parser().parse_args(["--data_dir", "x", "--patience", "20.0"])
    finetune.check_args(a)
    assert a.patience == 20 and isinstance(a.patience, int)
    a = main_finetune.get_args_parser().parse_args(["--data_dir", "x", "--patience", "20.5"])
    with pytest.raises(UserError, match=r"--patience must be a whole number of evaluations, at least 1, got 20\.5"):
        finetune.check_args(a)


def test_preprocessing_scripts_run_with_no_arguments_on_the_original_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for mod, folder in ((preprocess_flare_unlabelled, "data/ssl"), (preprocess_flare_labelled, "data/finetune")):
        with pytest.raises(UserError) as e:
            mod.main(mod.get_args_parser().parse_args([]))
        assert f"--data_dir {tmp_path / folder} does not exist" in str(e.value)
        assert "./" + folder in str(e.value) and "working directory" in str(e.value)
    assert not (tmp_path / "data" / "ssl_preprocessed_2d").exists()
    raw = make_phantoms.generate_dataset(tmp_path / "raw", n_labelled=0, n_unlabelled=1, size_xy=48, n_slices=8)
    shutil.copytree(raw["unlabelled_dir"], tmp_path / "data" / "ssl")
    res = preprocess_flare_unlabelled.main(preprocess_flare_unlabelled.get_args_parser().parse_args([]))
    assert res["output_dir"] == str(tmp_path / "data" / "ssl_preprocessed_2d") and res["n_done"] == 1
    manifest = data.read_manifest(str(tmp_path / "data" / "ssl_preprocessed_2d"))
    assert manifest["args"]["png_quantization"] == "truncate"


def test_preprocessing_flags_of_the_training_scripts(tmp_path):
    """--a_min ... --size_z: checked against the data's manifest.json in pretraining and 2D
    fine-tuning; in 3D fine-tuning they set the on-the-fly preprocessing."""
    raw = make_phantoms.generate_dataset(tmp_path / "raw", n_labelled=2, n_unlabelled=1, size_xy=48, n_slices=8)
    lab, unl = tmp_path / "lab", tmp_path / "unl"
    preprocess_flare_unlabelled.main(
        preprocess_flare_unlabelled.get_args_parser().parse_args(
            ["--data_dir", raw["unlabelled_dir"], "--output_dir", str(unl), "--a_min", "-400"]
        )
    )

    def pre(*extra):
        a = main_simsiam.get_args_parser().parse_args(["--data_dir", str(unl), *extra])
        a.data_dir = str(unl)
        pretrain.check_recorded_preprocessing(a)

    pre("--a_min", "-400", "--a_max", "500", "--size_x", "1", "--size_y", "1.0", "--size_z", "2.5")
    pre()
    with pytest.raises(UserError, match=r"--a_min -500 differs from the -400 that .*manifest.json records"):
        pre("--a_min", "-500")
    with pytest.raises(UserError, match=r"--size_z 3 differs from the 2.5"):
        pre("--size_z", "3")
    with pytest.raises(UserError, match=r"--a_max \(-600\) must be greater than --a_min \(-500\)"):
        engine.preprocessing_from_flags(argparse.Namespace(a_min=None, a_max=-600.0))

    preprocess_flare_labelled.main(
        preprocess_flare_labelled.get_args_parser().parse_args(
            ["--data_dir", raw["labelled_dir"], "--output_dir", str(lab), "--split_path", raw["split_path"]]
        )
    )

    def ft(dims, *extra):
        d = str(lab) if dims == 2 else raw["labelled_dir"]
        return finetune.data_preprocessing(
            main_finetune.get_args_parser().parse_args(["--data_dir", d, "--spatial_dims", str(dims), *extra])
        )

    assert ft(2, "--size_x", "1.0")["pixdim"] == [1.0, 1.0, 2.5]
    with pytest.raises(UserError, match=r"--size_x 0.8 differs from the 1 that"):
        ft(2, "--size_x", "0.8")
    rec = ft(3, "--a_min", "-1000", "--size_z", "5")
    assert rec["a_min"] == -1000.0 and rec["a_max"] == 500.0 and rec["pixdim"] == [1.0, 1.0, 5.0]
    assert ft(3)["pixdim"] == [1.0, 1.0, 2.5]
    c1, c2 = finetune.preprocess_config_3d(-1000.0, 500.0, (1, 1, 5)), finetune.preprocess_config_3d()
    assert finetune.cache_folder_3d("c", c1) != finetune.cache_folder_3d("c", c2)  # no stale cache is reused


@pytest.mark.slow
def test_the_original_readme_commands_run(tmp_path, monkeypatch, caplog):
    """The original README's pretraining and fine-tuning commands, with tiny overrides appended,
    on the folders the preprocessing scripts write with their default folders; then the
    fine-tuning command again on a folder written as the original's scripts write it, from an
    original-layout SimSiam checkpoint: the same arrays and weights, so the same run."""
    monkeypatch.chdir(tmp_path)
    raw = make_phantoms.generate_dataset(
        tmp_path / "raw", n_labelled=3, n_unlabelled=2, size_xy=48, n_slices=8, n_train=1
    )
    shutil.copytree(raw["unlabelled_dir"], "data/ssl")
    shutil.copytree(Path(raw["labelled_dir"]) / "images", "data/finetune/imgs")  # the original's raw layout
    shutil.copytree(Path(raw["labelled_dir"]) / "labels", "data/finetune/labels")
    preprocess_flare_unlabelled.main(preprocess_flare_unlabelled.get_args_parser().parse_args([]))
    split = ["--split_path", raw["split_path"]]  # FLARE's split names 50 cases; the phantoms have 3
    preprocess_flare_labelled.main(preprocess_flare_labelled.get_args_parser().parse_args(split))

    def readme(command: str, values: dict[str, str], *overrides: str) -> list[str]:
        for k, v in values.items():
            command = command.replace(k, v)
        words = shlex.split(command)
        assert words[0] == "python"
        return words[2:] + list(overrides)

    tiny = ["--low_resource_mode", "--no-progress", "--chkpt_dir", "./chkpts"]
    pre_argv = readme(
        original.README_PRETRAIN_COMMAND,
        {"<DIR_WITH_PREPROCESSED_2D_PNGS>": "./data/ssl_preprocessed_2d", "<I_MIN>": "0.3", "<I_MAX>": "0.6"}
        | {"<NUM_WORKERS>": "0"},
        *tiny,
        "--crop_size",
        "32",
        "--n_epochs",
        "1",
        "--max_images",
        "8",
        "--run_name",
        "test_ssl",
    )
    res = main_simsiam.main(main_simsiam.get_args_parser().parse_args(pre_argv))
    assert res["epochs_done"] == 1 and Path(res["weights"]) == tmp_path / "chkpts" / "test_ssl.pt"

    ft_tiny = [*tiny, *split, "--crop_size", "64", "--n_epochs", "1", "--warmup_epochs", "0", "--batch_size", "2"]
    ft_tiny += ["--max_images", "3", "--n_vis", "0", "--eval_every_from", "1"]

    def fine_tune(data_dir: str, chkpt: str, name: str) -> dict:
        values = {"<DIR_WITH_PREPROCESSED_2D_PNGS>": data_dir, "<PATH_TO_PRETRAINED_CHKPT>": chkpt}
        argv = readme(original.README_FINETUNE_COMMAND, values | {"<NUM_WORKERS>": "0"}, *ft_tiny, "--run_name", name)
        return main_finetune.main(main_finetune.get_args_parser().parse_args(argv))

    ours = fine_tune("./data/finetune_preprocessed_2d", "./chkpts/test_ssl.pt", "ours")
    # the same encoder in the original's SimSiam checkpoint layout, the same slices in the original's folder layout
    enc = torch.load("chkpts/test_ssl.pt", weights_only=True)["encoder"]
    orig = _OriginalSimSiam()
    orig.backbone.model.load_state_dict(enc)
    torch.save(orig.state_dict(), "chkpts/original_simsiam.pt")
    write_original_labelled(
        "data/finetune", tmp_path / "orig_2d", ["FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Tr_0003"]
    )
    caplog.set_level(logging.INFO)
    theirs = fine_tune(str(tmp_path / "orig_2d"), "./chkpts/original_simsiam.pt", "theirs")
    assert "the original code's SimSiam checkpoint" in caplog.text
    assert f"loaded {len(enc)} encoder tensors from" in caplog.text
    assert ours["pretrained_tensors"] == theirs["pretrained_tensors"] == len(enc)
    assert theirs["dice_paper"] == ours["dice_paper"]
    wa, wb = (torch.load(r["weights"], weights_only=True) for r in (ours, theirs))
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wb["preprocessing"]["png_quantization"] == "truncate" and wb["preprocessing"]["pixdim"] == [1.0, 1.0, 2.5]
    assert {k: v for k, v in wa["preprocessing"].items() if k != "source"} == {
        k: v for k, v in wb["preprocessing"].items() if k != "source"
    }


# ---------------------------------------------------------------------------------------
# 3. The original's artifacts: preprocessed folders, checkpoints, PNG values
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Phantoms preprocessed by ours (``lab``, ``unl``) and written as the original's scripts
    write them (``olab``, ``ounl``)."""
    root = tmp_path_factory.mktemp("fidelity")
    raw = make_phantoms.generate_dataset(
        root / "raw", n_labelled=3, n_unlabelled=2, size_xy=48, n_slices=8, n_train=1, num_workers=1
    )
    lab, unl = root / "lab", root / "unl"
    preprocess_flare_labelled.main(
        preprocess_flare_labelled.get_args_parser().parse_args(
            ["--data_dir", raw["labelled_dir"], "--output_dir", str(lab), "--split_path", raw["split_path"]]
        )
    )
    preprocess_flare_unlabelled.main(
        preprocess_flare_unlabelled.get_args_parser().parse_args(
            ["--data_dir", raw["unlabelled_dir"], "--output_dir", str(unl)]
        )
    )
    cases = sorted(
        json.loads(Path(raw["split_path"]).read_text())["train"]
        + json.loads(Path(raw["split_path"]).read_text())["val"]
    )
    write_original_labelled(raw["labelled_dir"], root / "olab", cases)
    write_original_unlabelled(raw["unlabelled_dir"], root / "ounl")
    return {
        "raw": raw,
        "lab": lab,
        "unl": unl,
        "olab": root / "olab",
        "ounl": root / "ounl",
        "split": raw["split_path"],
    }


def test_original_folders_are_recognised_and_read_as_the_same_arrays(both):
    split = data.load_split(both["split"])
    assert data.labelled_slice_layout(both["lab"]) == "ioupos"
    assert data.labelled_slice_layout(both["olab"]) == "original"
    ours = data.list_finetune_pairs(both["lab"], split, 2)
    theirs = data.list_finetune_pairs(both["olab"], split, 2, "original")
    flipped = 0
    for part in ("train", "val"):
        assert [(i["case"], i["slice"]) for i in ours[part]] == [(i["case"], i["slice"]) for i in theirs[part]]
        for a, b in zip(ours[part], theirs[part]):
            assert Path(b["image"]).name == f"{a['case']}_0000_{a['slice']}.png"
            assert Path(b["label"]).name == f"{a['case']}_{a['slice']}.png"
            ia, la = data.read_image_2d(a["image"]), data.read_label_2d(a["label"])
            ib, lb = data.read_image_2d(b["image"], "original"), data.read_label_2d(b["label"], "original")
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(la, lb)
            assert data.png_size(b["image"], "original") == ia.shape
            flipped += not np.array_equal(ia, data.read_image_2d(b["image"]))  # read in our layout: another picture
            # what the training loader gives
            da, db = LoadSliceAndLabel2d()(dict(a)), LoadSliceAndLabel2d(layout="original")(dict(b))
            assert torch.equal(da["image"], db["image"]) and torch.equal(da["label"], db["label"])
    assert flipped > len(ours["train"])  # the orientation check could fail
    # the evaluation volumes, through a slice cache too
    spacing = data.read_manifest_spacing(str(both["lab"]))
    ca = data.group_cases_2d(ours["val"], spacing, "lab")
    cb = data.group_cases_2d(theirs["val"], {c: (1.0, 1.0, 2.5) for c in spacing}, "olab", "original")
    for ra, rb in zip(ca, cb):
        for x, y in zip(data.load_case_2d(ra, 14), data.load_case_2d(rb, 14)):
            np.testing.assert_array_equal(x, y)
    paths = [i["image"] for i in theirs["val"]]
    cache = data.SliceCache(paths, progress=False, layout="original")
    for p in paths:
        np.testing.assert_array_equal(cache.read(p), data.read_image_2d(p, "original"))

    # pretraining: the flat folder of <stem>_<i>.png
    pa = data.list_pretrain_images(both["unl"], 2)
    pb = data.list_pretrain_images(both["ounl"], 2)
    assert data.detect_slice_layout(both["unl"], pa) == "ioupos"
    assert data.detect_slice_layout(both["ounl"], pb) == "original"
    by_name = {
        (data.case_id_from_path(Path(p).name[: Path(p).name.rfind("_")]), int(Path(p).stem.rsplit("_", 1)[1])): p
        for p in pb
    }
    assert len(by_name) == len(pa) == len(pb)
    load_a, load_b = LoadSlice2Dd(["image"]), LoadSlice2Dd(["image"], layout="original")
    for p in pa:
        case, z = data.parse_slice_name(p)
        assert torch.equal(
            torch.as_tensor(load_a({"image": p})["image"]),
            torch.as_tensor(load_b({"image": by_name[case, z]})["image"]),
        )


def test_original_folder_errors_are_one_line(both, tmp_path):
    split = data.load_split(both["split"])
    bad = tmp_path / "olab"
    shutil.copytree(both["olab"], bad)
    (bad / "labels" / "FLARE22_Tr_0002_3.png").unlink()
    with pytest.raises(
        UserError, match=r"image slice .*FLARE22_Tr_0002_0000_3.png has no label .*FLARE22_Tr_0002_3.png"
    ):
        data.list_finetune_pairs(bad, split, 2, "original")
    (bad / "imgs" / "FLARE22_Tr_0002_0000_3.png").unlink()
    with pytest.raises(UserError, match=r"case 'FLARE22_Tr_0002' in .* lacks slice 3 of 0\.\.7"):
        data.list_finetune_pairs(bad, split, 2, "original")
    # a folder mixing both kinds of names is refused when recognised, and --slice_layout decides
    shutil.copy(next((both["lab"] / "imgs").glob("*.png")), bad / "imgs")
    with pytest.raises(UserError, match=r"mixes this project's preprocessing .* --slice_layout"):
        data.labelled_slice_layout(bad)
    assert data.labelled_slice_layout(bad, "original") == "original"
    with pytest.raises(UserError, match=r"is not named <stem>_<i>.png"):
        data.list_finetune_pairs(bad, split, 2, "original")


def test_finetune_data_of_an_original_folder(both):
    """The voxel size of the scores and the model's preprocessing record come from the
    preprocessing flags (the original writes no manifest): 1 x 1 x 2.5 by default."""

    def dat(folder, *extra):
        a = main_finetune.get_args_parser().parse_args(
            ["--data_dir", str(folder), "--split_path", both["split"], "--no-progress", "--low_resource_mode", *extra]
        )
        finetune.check_args(a)
        return finetune.FinetuneData(a, engine.DistInfo(), need_train=True)

    a, b = dat(both["lab"]), dat(both["olab"])
    assert b.layout == "original" and a.layout == "ioupos"
    assert [c.spacing for c in b.val_cases] == [c.spacing for c in a.val_cases] == [(1.0, 1.0, 2.5)] * 2
    assert len(a.train_ds) == len(b.train_ds)
    for x, y in zip(a.val_cases, b.val_cases):
        for u, v in zip(a.load_case(x), b.load_case(y)):
            np.testing.assert_array_equal(u, v)
    rec = b.preprocessing
    assert (rec["png_bits"], rec["png_quantization"], rec["min_xy"]) == (8, "truncate", 96)
    assert "original" in rec["source"]
    c = dat(both["olab"], "--size_z", "3", "--a_min", "-1000")
    assert [r.spacing for r in c.val_cases] == [(1.0, 1.0, 3.0)] * 2
    assert c.preprocessing["a_min"] == -1000.0 and c.preprocessing["pixdim"] == [1.0, 1.0, 3.0]
    check_preprocessing_record(c.preprocessing, "x")  # predict.py can apply it
    with pytest.raises(UserError, match=r"--size_z 3 differs from the 2.5"):
        dat(both["lab"], "--size_z", "3")


def test_a_val_fraction_split_of_an_original_folder(both, tmp_path):
    """``--val_fraction`` lists the cases of an original-layout folder in its layout: the same
    split and slices as of our folder of the same cases."""

    def dat(folder, name):
        a = main_finetune.get_args_parser().parse_args(
            ["--data_dir", str(folder), "--val_fraction", "0.34", "--no-progress", "--low_resource_mode"]
        )
        finetune.check_args(a)
        a.chkpt_dir, a.run_name = str(tmp_path), name
        a.split_path = finetune.resolve_split_path(a)
        return finetune.FinetuneData(a, engine.DistInfo(), need_train=True)

    assert data.finetune_cases(both["olab"], 2, "original") == data.finetune_cases(both["lab"], 2)
    a, b = dat(both["lab"], "ours"), dat(both["olab"], "theirs")
    assert (a.layout, b.layout) == ("ioupos", "original")
    assert b.split == a.split and len(a.split["val"]) == 1 and len(a.split["train"]) == 2
    written = [json.loads((tmp_path / f"{n}_files" / data.SPLIT_NAME).read_text()) for n in ("ours", "theirs")]
    assert written[0] == written[1]
    for part in ("train_items", "val_items"):
        ours, theirs = getattr(a, part), getattr(b, part)
        assert ours and [(i["case"], i["slice"]) for i in ours] == [(i["case"], i["slice"]) for i in theirs]


def test_original_checkpoints_load_strictly(tmp_path, caplog):
    cfg = models.encoder_config("swin", 2, 12, low_resource_mode=True)
    torch.manual_seed(3)
    orig = _OriginalSimSiam()
    swin = orig.backbone.model.state_dict()
    n_heads = len(orig.projection_head.state_dict()) + len(orig.prediction_head.state_dict())
    torch.save(orig.state_dict(), tmp_path / "simsiam.pt")  # the original: torch.save(model.state_dict(), ...)
    torch.save(swin, tmp_path / "dino.pt")  # the original: torch.save(student[0].model.state_dict(), ...)
    caplog.set_level(logging.INFO)
    for name in ("simsiam.pt", "dino.pt"):
        seg = models.build_segmenter(cfg, 14)
        assert models.load_pretrained_encoder(seg, str(tmp_path / name), cfg) == len(swin)
        got = models.segmenter_encoder(seg).state_dict()
        assert set(got) == set(swin) and all(torch.equal(got[k], swin[k]) for k in swin)
    assert f"{len(swin)} encoder tensors (backbone.model.*); its {n_heads} projection / prediction head" in caplog.text
    assert "a bare encoder state dict" in caplog.text
    # strict: a missing encoder tensor or an encoder of another size is refused, nothing loaded
    broken = orig.state_dict()
    broken.pop("backbone.model.patch_embed.proj.weight")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"1 missing \(patch_embed.proj.weight\)"):
        models.load_pretrained_encoder(models.build_segmenter(cfg, 14), str(tmp_path / "broken.pt"), cfg)
    torch.save(_OriginalSimSiam(embed=24, heads=(3, 6, 12, 24)).state_dict(), tmp_path / "e24.pt")
    with pytest.raises(UserError, match=r"mis-shaped"):
        models.load_pretrained_encoder(models.build_segmenter(cfg, 14), str(tmp_path / "e24.pt"), cfg)


def test_png_values_are_truncated_as_the_original():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.random(10_000, dtype=np.float32), np.float32([0, 1, 0.5, 0.2, 1 / 255, 254.5 / 255])])
    np.testing.assert_array_equal(data.float_to_stored(v, 8, "truncate"), (v * 255).astype("uint8"))
    assert data.float_to_stored(np.float32([0.5]), 8, "truncate")[0] == 127
    assert data.float_to_stored(np.float32([0.5]), 8, "round")[0] == 128
    assert data.float_to_stored(np.float32([0.5]), 16, "truncate")[0] == 32767
    with pytest.raises(ValueError, match="png quantization must be one of"):
        data.float_to_stored(v, 8, "floor")
    # predict.py applies what the model's record says; a record written before the key existed rounded
    base = {"version": 1, "spatial_dims": 2, "orientation": "RAS", "pixdim": [1, 1, 2.5], "a_min": -500.0}
    base |= {"a_max": 500.0, "min_xy": 96, "png_bits": 8, "source": "s"}
    assert check_preprocessing_record(base, "x")["png_quantization"] == "round"
    rec = check_preprocessing_record(base | {"png_quantization": "truncate"}, "x")
    p = predict.Predictor.__new__(predict.Predictor)
    p.preprocessing = rec
    np.testing.assert_array_equal(
        p.model_input(torch.from_numpy(v.reshape(1, -1, 1))), (v * 255).astype("uint8").reshape(-1, 1)
    )


def test_png_quantization_is_recorded_and_pinned(tmp_path):
    raw = make_phantoms.generate_dataset(tmp_path / "raw", n_labelled=0, n_unlabelled=1, size_xy=48, n_slices=8)

    def run(out, *extra):
        return preprocess_flare_unlabelled.main(
            preprocess_flare_unlabelled.get_args_parser().parse_args(
                ["--data_dir", raw["unlabelled_dir"], "--output_dir", str(out), *extra]
            )
        )

    run(tmp_path / "t")
    run(tmp_path / "r", "--png_quantization", "round")
    assert data.read_manifest(str(tmp_path / "r"))["args"]["png_quantization"] == "round"
    ta = [data.read_image_2d_stored(p) for p in data.list_pretrain_images(tmp_path / "t", 2)]
    ra = [data.read_image_2d_stored(p) for p in data.list_pretrain_images(tmp_path / "r", 2)]
    diff = np.concatenate([(r.astype(int) - t.astype(int)).ravel() for r, t in zip(ra, ta)])
    assert set(np.unique(diff)) <= {0, 1} and (diff == 1).any()  # rounding is truncation or one level up
    with pytest.raises(UserError, match=r"png_quantization='round' \(now 'truncate'\)"):
        run(tmp_path / "r")
    # a folder written before the flag existed was rounded: its args.json has no png_quantization
    args_json = tmp_path / "r" / ".manifest" / "args.json"
    legacy = json.loads(args_json.read_text())
    del legacy["png_quantization"]
    args_json.write_text(json.dumps(legacy))
    run(tmp_path / "r", "--png_quantization", "round")
    with pytest.raises(UserError, match=r"png_quantization='round' \(now 'truncate'\)"):
        run(tmp_path / "r")
    assert preprocessing.PreprocessConfig("unlabelled").png_quantization == "truncate"


# ---------------------------------------------------------------------------------------
# 5. DINO as the original
# ---------------------------------------------------------------------------------------


def _dino(*extra):
    args = main_dino.get_args_parser().parse_args(
        [
            "--data_dir",
            "x",
            "--low_resource_mode",
            "--drop_path_rate",
            "0.5",
            "--n_epochs",
            "2",
            "--warmup_epochs",
            "0",
            *extra,
        ]
    )
    pretrain.apply_low_resource_mode(args)
    main_dino.DINOMethod.adjust_args(args)
    cfg = pretrain.model_config(args)
    return main_dino.DINOMethod(args, cfg, engine.DistInfo(), iters_per_epoch=2)


def test_dino_teacher_as_the_original_by_default():
    x = torch.rand(2, 1, 64, 64)
    m = _dino()
    assert m.args.teacher_style == "original" and m.teacher.training
    assert m.teacher.encoder.backbone.layers1[0].blocks[1].drop_path.drop_prob > 0  # the student's drop path
    with torch.no_grad():
        torch.manual_seed(0)
        a = m.teacher(x)
        b = m.teacher(x)
    assert not torch.equal(a, b)  # stochastic depth in the teacher, as the original
    p = _dino("--teacher_style", "dino")
    assert not p.teacher.training
    assert isinstance(p.teacher.encoder.backbone.layers1[0].blocks[1].drop_path, nn.Identity)
    with torch.no_grad():
        assert torch.equal(p.teacher(x), p.teacher(x))
    # a state saved before the flag existed had the DINO-paper teacher: resuming it with the default is refused
    with pytest.raises(UserError, match=r"teacher_style: 'dino' -> 'original'"):
        engine.check_resume_args(
            {**engine.RESUME_KEY_DEFAULTS}, {"teacher_style": "original"}, main_dino.DINOMethod.resume_keys, "old.pt"
        )


def test_finetune_resume_keys_refuse_old_states_with_other_batching():
    """A fine-tuning state saved before the last batch was kept (it dropped it) cannot be resumed by default."""
    with pytest.raises(UserError, match=r"drop_last: True -> False"):
        engine.check_resume_args({**engine.RESUME_KEY_DEFAULTS}, {"drop_last": False}, finetune.RESUME_KEYS, "old.pt")
    engine.check_resume_args(
        {**engine.RESUME_KEY_DEFAULTS, "drop_last": False, "patience": 20},
        {**engine.RESUME_KEY_DEFAULTS, "drop_last": False, "patience": 20},
        finetune.RESUME_KEYS,
        "new.pt",
    )

"""Tests of reproduce_table.py, runqueue.py and report.py: the plan, locks, workers, collection, the table,
bad input, and the whole grid end to end at a tiny size (killed, resumed, rerun, re-collected).
The grid on SLURM: tests/test_slurm.py."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import main_finetune
import main_simsiam
import metrics
import report
import reproduce_table as rt
import runqueue
from data import encode_png_2d
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    return rt.get_args_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------
# The paper's numbers and the plan
# ---------------------------------------------------------------------------------------


def test_population_std_reproduces_the_papers_plus_minus():
    """The paper's ± is the population std of its four DSCs (to within their rounding);
    the sample std (ddof=1) is not, for at least one row."""
    sample_off = 0
    for key, row in report.PAPER_TABLE.items():
        mean, std = report.mean_std(row["dsc"])
        # each DSC is rounded to 0.001 (moves std by <= 0.0005), the paper's std too (0.0005)
        assert abs(std - row["std"]) <= 0.001 + 1e-12, key
        assert abs(mean - row["mean"]) <= 0.001 + 1e-12, key  # same two roundings
        sample_off += abs(float(np.std(row["dsc"], ddof=1)) - row["std"]) > 0.001
    assert sample_off >= 1


def test_rows_parse_to_the_papers_labels():
    rows = runqueue.parse_rows(",".join(report.PAPER_ROW_KEYS))
    assert [r.label for r in rows] == [
        "- (no pretraining)",
        "[0, 0]",
        "[0.0001, 0.3]",
        "[0.3, 0.6]",
        "[0.6, 1]",
        "Random crop ([0, 1])",
    ]
    assert [r.key for r in rows] == list(report.PAPER_ROW_KEYS)
    assert rows[3].tag == "iou0.30-0.60" and rows[2].tag == "iou0.0001-0.30"
    for bad in ("0.6-0.3", "abc", "0.2-1.5", "0.1-0.2-0.3"):
        with pytest.raises(UserError):
            runqueue.parse_row(bad)
    with pytest.raises(UserError, match="twice"):
        runqueue.parse_rows("0.3-0.6,0.30-0.6")
    with pytest.raises(UserError):
        runqueue.parse_seeds("1,x", "--pretrain_seeds")


def test_paper_plan_has_34_runs_with_fixed_shared_seeds(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "l").mkdir()
    args = parse(
        [
            "--preset",
            "paper",
            "--output_dir",
            str(tmp_path / "out"),
            "--unlabelled_dir",
            str(tmp_path / "u"),
            "--labelled_dir",
            str(tmp_path / "l"),
        ]
    )
    s = rt.resolve_settings(args)
    rows = runqueue.parse_rows(args.rows)
    data = rt.data_paths(args, str(tmp_path / "out"))
    chk = str(tmp_path / "out" / "runs")
    plan = rt.build_plan(args, s, rows, list(rt.PAPER_SEEDS), list(rt.PAPER_SEEDS), data, chk)
    assert len(plan) == 34
    pre = [r for r in plan if r.kind == "pretrain"]
    ft = [r for r in plan if r.kind == "finetune"]
    assert len(pre) == 10 and len(ft) == 24
    assert len({r.name for r in plan}) == 34
    assert plan.index(pre[-1]) < min(plan.index(r) for r in ft)  # pretrainings are claimed first
    names = {r.name for r in pre}
    assert "pre_iou0.30-0.60_s4294967295" in names and "ft_iou0.30-0.60_s4294967295_ft381122412" in {r.name for r in ft}
    for r in pre:
        a = r.argv
        assert a[a.index("--seed") + 1] in {"4294967295", "381122412"}
        assert a[a.index("--batch_size") + 1] == "128" and a[a.index("--n_epochs") + 1] == "100"
        assert a[a.index("--base_lr") + 1] == "0.025" and "--use_amp" in a
    for r in ft:
        a = r.argv
        assert a[a.index("--split_path") + 1] == data["split"]
        assert a[a.index("--n_epochs") + 1] == "225" and a[a.index("--patience") + 1] == "20"
        weights = a[a.index("--chkpt_path") + 1]
        if r.row == "none":
            assert r.depends is None and r.init is not None and weights == r.init["path"]
        else:
            assert r.depends in names and weights == os.path.join(chk, r.depends + ".pt")
    per_row = {}
    for r in ft:
        per_row.setdefault(r.row, set()).add((r.pretrain_seed, r.finetune_seed))
    expected = {(a, b) for a in rt.PAPER_SEEDS for b in rt.PAPER_SEEDS}
    assert all(v == expected for v in per_row.values()) and len(per_row) == 6
    # every argv is accepted by the real scripts' parsers
    assert main_simsiam.get_args_parser().parse_args(pre[0].argv).iou_sampler == "exact"
    main_finetune.get_args_parser().parse_args(ft[0].argv)
    # the original's sampler is a grid option: in grid.json's settings and in every pretraining command
    args_o = parse(["--iou_sampler", "original", *_paper_argv(tmp_path)])
    s_o = rt.resolve_settings(args_o)
    plan_o = rt.build_plan(args_o, s_o, rows, list(rt.PAPER_SEEDS), list(rt.PAPER_SEEDS), data, chk)
    for r in plan_o:
        if r.kind == "pretrain":
            assert main_simsiam.get_args_parser().parse_args(r.argv).iou_sampler == "original"
        else:
            assert "--iou_sampler" not in r.argv
    meta = rt.grid_meta(args_o, s_o, rows, list(rt.PAPER_SEEDS), list(rt.PAPER_SEEDS))
    assert meta["settings"]["iou_sampler"] == "original"
    assert rt.grid_meta(args, s, rows, list(rt.PAPER_SEEDS), list(rt.PAPER_SEEDS))["settings"]["iou_sampler"] == "exact"
    with pytest.raises(SystemExit):
        parse(["--iou_sampler", "thesis", *_paper_argv(tmp_path)])


def _paper_argv(tmp_path):
    return ["--preset", "paper", "--output_dir", str(tmp_path / "out"), "--unlabelled_dir", str(tmp_path / "u"),
            "--labelled_dir", str(tmp_path / "l")]  # fmt: skip


def test_organ_sharing_leaves_out_pairs_of_two_background_crops(tmp_path):
    """16 x 16 label slices with one organ in the 4 x 4 corner, 8-pixel crops, IoU [0, 1]: both crops
    are uniform over the 9 x 9 starts, a crop holds the organ with p = (4/9)^2; of the pairs not
    both background (1 - (1 - p)^2), those sharing the organ (p^2): the fraction p / (2 - p)."""
    lab = np.zeros((16, 16), np.uint8)
    lab[0:4, 0:4] = 1
    paths = []
    for i in range(3):
        path = tmp_path / f"case_{i}.png"
        path.write_bytes(encode_png_2d(lab, is_label=True))
        paths.append(str(path))
    (tmp_path / "empty.png").write_bytes(encode_png_2d(np.zeros((16, 16), np.uint8), is_label=True))  # not drawn on
    paths.append(str(tmp_path / "empty.png"))
    p = (4 / 9) ** 2
    rows = runqueue.parse_rows("none,0-1")
    for sampler in ("exact", "original"):
        got = report.organ_sharing(paths, rows, 8, n_pairs=4000, seed=1, iou_sampler=sampler)
        assert set(got) == {"0-1"}
        g = got["0-1"]
        assert g["n_pairs"] == 4000 and g["n_pairs_considered"] + g["n_pairs_left_out"] == 4000
        assert g["n_slices"] == 3 and g["iou_sampler"] == sampler
        assert g["n_pairs_left_out"] / 4000 == pytest.approx((1 - p) ** 2, abs=0.03)
        assert g["fraction"] == pytest.approx(p / (2 - p), abs=0.035)  # counting every pair would give p^2 = 0.04
        assert g["fraction"] == g["n_shared"] / g["n_pairs_considered"]


def test_random_init_depends_on_the_seed_only(tmp_path):
    cfg = {
        "arch": "swin",
        "spatial_dims": 2,
        "embedding_size": 12,
        "low_resource_mode": True,
        "drop_path_rate": 0.0,
        "crop_size": 64,
    }
    paths = [
        runqueue.ensure_random_init({"path": str(tmp_path / f"{i}.pt"), "seed": seed, "config": cfg})
        for i, seed in enumerate((5, 5, 6))
    ]
    a, b, c = (torch.load(p, weights_only=True)["encoder"] for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------
# Locks and workers
# ---------------------------------------------------------------------------------------


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock_in_child(path) -> subprocess.Popen:
    """A child process that takes the lock ``path`` and keeps it until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_run_lock_is_exclusive_and_free_again_when_its_holder_dies(tmp_path):
    locks = tmp_path / "locks"
    lock = runqueue.try_lock(str(locks), "run_a")
    assert lock is not None and lock.is_locked
    assert runqueue.try_lock(str(locks), "run_a") is None  # another claim, even in this process
    lock.release()
    again = runqueue.try_lock(str(locks), "run_a")
    assert again is not None
    again.release()

    # a worker killed while it holds a run leaves no stale claim behind
    locks.mkdir(exist_ok=True)
    child = _hold_lock_in_child(locks / "run_b.lock")
    try:
        assert runqueue.try_lock(str(locks), "run_b") is None
    finally:
        child.kill()
        child.wait()
    taken = runqueue.try_lock(str(locks), "run_b")
    assert taken is not None
    taken.release()


def test_a_second_local_launch_of_a_grid_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cfg = runqueue.WorkerConfig(chkpt_dir=str(tmp_path / "runs"), state_dir=str(state))
    _, plan = _small_plan(str(tmp_path / "runs"))
    assert not runqueue.local_launch_running(str(state))
    child = _hold_lock_in_child(runqueue.local_lock_path(str(state)))
    try:
        assert runqueue.local_launch_running(str(state))
        with pytest.raises(UserError, match="another local launch of this grid is running"):
            runqueue.run_local(plan, cfg, progress=False)
    finally:
        child.kill()
        child.wait()
    assert not runqueue.local_launch_running(str(state))
    assert not (tmp_path / "runs").exists()  # nothing ran


# A stand-in training script for the worker tests: module-level functions, so that spawned
# workers receive them by reference (they import this test module).


def fake_get_args_parser():
    p = argparse.ArgumentParser()
    for flag in ("--run_name", "--chkpt_dir", "--claims", "--needs"):
        p.add_argument(flag)
    p.add_argument("--resume", nargs="?", const="auto")
    return p


def fake_main(args):
    if args.needs:
        assert os.path.isfile(os.path.join(args.chkpt_dir, args.needs + "_files", "result.json")), args.needs
    with open(args.claims, "a") as f:
        f.write(f"start {args.run_name} {os.getpid()}\n")
    time.sleep(0.3)
    d = os.path.join(args.chkpt_dir, args.run_name + "_files")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"run_name": args.run_name, "best_dice_paper": 0.5}, f)
    with open(args.claims, "a") as f:
        f.write(f"end {args.run_name} {os.getpid()}\n")
    return {"run_name": args.run_name}


FAKE_TRAINERS = {"fake_train": runqueue.Trainer(fake_get_args_parser, fake_main)}


def test_two_spawned_workers_run_every_run_once_in_dependency_order(tmp_path):
    chk, claims = str(tmp_path / "runs"), str(tmp_path / "claims.txt")
    rows = runqueue.parse_rows("0-0,0.3-0.6")
    plan = runqueue.plan_grid(
        rows,
        [1, 2],
        [3, 4],
        chk,
        lambda row, seed, name: ["--run_name", name, "--chkpt_dir", chk, "--claims", claims],
        lambda row, ps, fs, name, w: [
            "--run_name",
            name,
            "--chkpt_dir",
            chk,
            "--claims",
            claims,
            "--needs",
            runqueue.pretrain_name(row, ps),
        ],
        pretrain_script="fake_train",
        finetune_script="fake_train",
    )
    assert len(plan) == 12
    with pytest.raises(ValueError, match="no trainer for script 'fake_train'"):
        runqueue.trainer_for("fake_train")  # the project's scripts only, unless given others
    cfg = runqueue.WorkerConfig(chkpt_dir=chk, state_dir=str(tmp_path / "state"), poll_s=0.1)
    ctx = mp.get_context("spawn")
    procs = []
    for i in range(2):
        c = {**cfg.__dict__, "owner": f"w{i}"}
        procs.append(
            ctx.Process(
                target=runqueue.worker_entry,
                args=([r.to_dict() for r in plan], c, {}, 1, logging.INFO, FAKE_TRAINERS),
            )
        )
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = [ln.split() for ln in Path(claims).read_text().splitlines()]
    starts = [ln[1] for ln in lines if ln[0] == "start"]
    assert sorted(starts) == sorted(r.name for r in plan)  # every run exactly once
    assert len({ln[2] for ln in lines}) == 2  # by both workers
    order = [(ln[0], ln[1]) for ln in lines]
    for r in plan:
        if r.depends:
            assert order.index(("end", r.depends)) < order.index(("start", r.name))
    for r in plan:  # every lock released
        lock = runqueue.try_lock(str(tmp_path / "state" / "locks"), r.name)
        assert lock is not None
        lock.release()


# ---------------------------------------------------------------------------------------
# Collecting and rendering
# ---------------------------------------------------------------------------------------


def _fake_finished(chk: Path, name: str, dice: float, organ_dice: float = 0.5, split_path: str | None = None) -> None:
    files = chk / f"{name}_files"
    files.mkdir(parents=True, exist_ok=True)
    scores = {
        "summary": {
            "n_cases": 1,
            "dice_mean": organ_dice,
            "nsd_mean": organ_dice / 2,
            "per_organ": {
                "liver": {"organ_id": 1, "dice": organ_dice, "nsd": organ_dice / 2},
                "spleen": {"organ_id": 3, "dice": organ_dice, "nsd": organ_dice / 2},
            },
        }
    }
    (files / "val_scores.json").write_text(json.dumps(scores))
    (files / "result.json").write_text(
        json.dumps({"run_name": name, "best_dice_paper": dice, "scores": str(files / "val_scores.json")})
    )
    if split_path:
        (chk / f"{name}_args.json").write_text(json.dumps({"split_path": split_path}))


def _small_plan(chk: str):
    rows = runqueue.parse_rows("none,0.3-0.6")
    enc = {
        "arch": "swin",
        "spatial_dims": 2,
        "embedding_size": 12,
        "low_resource_mode": True,
        "drop_path_rate": 0.0,
        "crop_size": 64,
    }
    plan = runqueue.plan_grid(
        rows, [1, 2], [3, 4], chk, lambda r, s, n: [], lambda r, p, f, n, w: [], encoder_config=enc
    )
    return rows, plan


def test_table_and_organs_come_from_the_run_folders(tmp_path):
    chk = tmp_path / "runs"
    rows, plan = _small_plan(str(chk))
    ft = [r for r in plan if r.kind == "finetune"]
    values = {r.name: 0.1 * (i + 1) for i, r in enumerate(ft)}
    for r in ft[:-1]:  # the last run is not finished
        _fake_finished(chk, r.name, values[r.name], organ_dice=values[r.name])
    collected = report.collect(plan, rows, str(chk))
    out = report.render_table(rows, collected, str(tmp_path))
    report.render_organs(rows, collected, str(tmp_path))
    with open(out["csv"]) as f:
        lines = list(csv.reader(f))
    header = lines[0]
    assert header[:5] == ["interval", "min_iou", "max_iou", "mean_dsc", "std_dsc"] and header[5:9] == [
        "dsc_1",
        "dsc_2",
        "dsc_3",
        "dsc_4",
    ]
    assert len(lines) == 3 and lines[2][0] == "[0.3, 0.6]" and lines[2][-2:] == ["3", "4"]
    none_row = dict(zip(header, lines[1]))
    expect = [values[r.name] for r in ft if r.row == "none"]
    assert [float(none_row[f"dsc_{i}"]) for i in range(1, 5)] == pytest.approx(expect, abs=1e-6)
    assert float(none_row["mean_dsc"]) == pytest.approx(np.mean(expect), abs=1e-6)
    assert float(none_row["std_dsc"]) == pytest.approx(np.std(expect), abs=1e-6)
    assert float(none_row["paper_mean"]) == 0.843 and none_row["n_finished"] == "4"
    md = Path(out["md"]).read_text()
    assert "| [0.3, 0.6] |" in md and "3/4" in md and "population standard deviation" in md
    organs = Path(tmp_path / "organs.csv").read_text()
    assert "liver" in organs and "spleen" in organs
    # change a run's result: the table follows
    first = ft[0]
    res = json.loads((chk / f"{first.name}_files" / "result.json").read_text())
    res["best_dice_paper"] = 0.777
    (chk / f"{first.name}_files" / "result.json").write_text(json.dumps(res))
    again = report.table_rows(rows, report.collect(plan, rows, str(chk)))
    assert again[0]["dsc"][0] == pytest.approx(0.777)
    res["best_dice_paper"] = None
    (chk / f"{first.name}_files" / "result.json").write_text(json.dumps(res))
    with pytest.raises(UserError, match="best_dice_paper"):
        report.collect(plan, rows, str(chk))


def test_runs_that_disagree_on_the_split_are_refused(tmp_path):
    chk = tmp_path / "runs"
    rows, plan = _small_plan(str(chk))
    split_a = {"train": ["A"], "val": ["B"]}
    (tmp_path / "a.json").write_text(json.dumps(split_a))
    (tmp_path / "b.json").write_text(json.dumps({"train": ["A"], "val": ["C"]}))
    ft = [r for r in plan if r.kind == "finetune"]
    _fake_finished(chk, ft[0].name, 0.5, split_path=str(tmp_path / "a.json"))
    rt.check_runs_split(plan, str(chk), split_a)
    _fake_finished(chk, ft[1].name, 0.5, split_path=str(tmp_path / "b.json"))
    with pytest.raises(UserError, match=ft[1].name):
        rt.check_runs_split(plan, str(chk), split_a)


# ---------------------------------------------------------------------------------------
# Bad input, grid.json, dry run, shell files
# ---------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "reproduce_table.py"), "--preset", "nope", "--output_dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "error: --preset 'nope' does not exist; choose one of paper, demo"
    with pytest.raises(UserError, match="--unlabelled_dir"):
        rt.main(parse(["--preset", "paper", "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(UserError, match="does not exist"):
        rt.main(
            parse(
                [
                    "--preset",
                    "paper",
                    "--output_dir",
                    str(tmp_path / "o"),
                    "--unlabelled_dir",
                    str(tmp_path / "missing"),
                    "--labelled_dir",
                    str(tmp_path / "missing2"),
                ]
            )
        )
    with pytest.raises(UserError, match="only applies to --preset demo"):
        rt.resolve_settings(parse(["--output_dir", str(tmp_path), "--phantom_slices", "3"]))
    assert not (tmp_path / "o" / "grid.json").exists()


def _paper_args(tmp_path, *extra):
    for d in ("u", "l"):
        (tmp_path / d).mkdir(exist_ok=True)
    split = tmp_path / "split.json"
    if not split.exists():
        split.write_text(json.dumps({"train": ["A"], "val": ["B"]}))
    return parse(
        [
            "--preset",
            "paper",
            "--output_dir",
            str(tmp_path / "out"),
            "--unlabelled_dir",
            str(tmp_path / "u"),
            "--labelled_dir",
            str(tmp_path / "l"),
            "--split",
            str(split),
            "--embedding_size",
            "12",
            "--low_resource_mode",
            "--rows",
            "none,0.3-0.6",
            *extra,
        ]
    )


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path, capsys):
    out = rt.main(_paper_args(tmp_path, "--dry_run"))
    text = capsys.readouterr().out
    assert len(out["plan"]) == 10
    cmds = [ln for ln in text.splitlines() if ln.startswith("python ")]
    assert len(cmds) == 10 and cmds[0].startswith("python main_simsiam.py ")
    assert sum(c.startswith("python main_finetune.py ") for c in cmds) == 8
    assert not (tmp_path / "out").exists()


def test_write_scripts_and_refusing_another_grid(tmp_path):
    out = rt.main(_paper_args(tmp_path, "--write_scripts", str(tmp_path / "jobs")))
    scripts = sorted(p for p in out["scripts"] if not p.endswith("all.sh"))
    assert len(scripts) == 10
    ft = next(p for p in scripts if "ft_iou0.30-0.60" in p)
    text = Path(ft).read_text()
    assert "# depends on: pre_iou0.30-0.60_s" in text and "--resume" in text and "result.json" in text
    for p in out["scripts"]:
        subprocess.run(["bash", "-n", p], check=True)
    none = next(p for p in scripts if "ft_none" in p)
    init = Path(none).read_text().split("--chkpt_path ")[1].split()[0]
    assert os.path.isfile(init)  # the random encoder of the no-pretraining row is written with the scripts
    grid_json = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert grid_json["format"] == rt.GRID_FORMAT and grid_json["split"] == {"train": ["A"], "val": ["B"]}
    assert grid_json["pretrain_seeds"] == list(rt.PAPER_SEEDS)
    # another grid in the same folder is refused, naming the difference
    with pytest.raises(UserError, match="n_pretrain_epochs"):
        rt.main(_paper_args(tmp_path, "--write_scripts", str(tmp_path / "jobs"), "--n_pretrain_epochs", "5"))
    with pytest.raises(UserError, match="rows"):
        rt.main(_paper_args(tmp_path, "--write_scripts", str(tmp_path / "jobs"), "--rows", "none"))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["A"], "val": ["C"]}))
    with pytest.raises(UserError, match="split"):
        rt.main(_paper_args(tmp_path, "--write_scripts", str(tmp_path / "jobs")))
    # a folder of another version of the table
    grid_json["format"] = "ioupos-table-v0"
    (tmp_path / "out" / "grid.json").write_text(json.dumps(grid_json))
    with pytest.raises(UserError, match="another version"):
        rt.main(_paper_args(tmp_path, "--collect_only"))


# ---------------------------------------------------------------------------------------
# End to end: real data, real runs, killed, resumed, rerun, re-collected
# ---------------------------------------------------------------------------------------

TINY = [
    "--preset",
    "demo",
    "--rows",
    "none,0.3-0.6",
    "--pretrain_seeds",
    "7",
    "--finetune_seeds",
    "1,2",
    "--phantom_labelled",
    "3",
    "--phantom_unlabelled",
    "2",
    "--phantom_train",
    "1",
    "--phantom_size_xy",
    "64",
    "--phantom_slices",
    "12",
    "--n_pretrain_epochs",
    "2",
    "--max_pretrain_images",
    "16",
    "--n_finetune_epochs",
    "1",
    "--max_finetune_images",
    "8",
    "--eval_every",
    "1",
    "--figure_pairs",
    "100",
    "--workers",
    "1",
    "--no-progress",
]


@pytest.mark.slow
def test_grid_end_to_end_killed_resumed_rerun_recollected(tmp_path, caplog, capsys):
    out = tmp_path / "grid"
    chk = out / "runs"
    pre = "pre_iou0.30-0.60_s7"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    # 1) start the grid in a subprocess and SIGKILL it once the pretraining has checkpointed its first epoch
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "reproduce_table.py"), "--output_dir", str(out), *TINY],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    log = chk / f"{pre}_log.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().strip() and (chk / f"{pre}_last.pt").exists():
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not (chk / f"{pre}_files" / "result.json").exists()

    # 2) rerun in-process: the killed process held the run's lock and the grid's, both free now;
    # the pretraining resumes, the grid completes
    args = parse(["--output_dir", str(out), *TINY])
    with caplog.at_level(logging.INFO):
        res = rt.main(args)
    assert "resuming from" in caplog.text
    epochs = [json.loads(ln)["epoch"] for ln in log.read_text().splitlines()]
    assert epochs == [1, 2]
    assert res["n_runs"] == 5 and res["n_finished"] == 5
    printed = capsys.readouterr().out
    assert "| - (no pretraining) |" in printed and "| [0.3, 0.6] |" in printed

    # the table: 2 rows x 2 DSCs, each the run's own best_dice_paper
    with open(res["table_csv"]) as f:
        lines = list(csv.reader(f))
    header = lines[0]
    assert len(lines) == 3 and "dsc_2" in header and "dsc_3" not in header
    for line, key in zip(lines[1:], ("none", "0.3-0.6")):
        row = dict(zip(header, line))
        runs = [
            r
            for r in rt.build_plan(
                args,
                rt.resolve_settings(args),
                runqueue.parse_rows(args.rows),
                [7],
                [1, 2],
                rt.data_paths(args, str(out)),
                str(chk),
            )
            if r.kind == "finetune" and r.row == key
        ]
        got = [float(row["dsc_1"]), float(row["dsc_2"])]
        want = [json.loads((chk / f"{r.name}_files" / "result.json").read_text())["best_dice_paper"] for r in runs]
        assert got == pytest.approx(want, abs=1e-6)
        assert row["n_finished"] == "2"
    for fig in ("collapse.png", "organ_sharing.png", "crop_pairs.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    sharing = json.loads((out / "figures" / "organ_sharing.json").read_text())["0.3-0.6"]
    assert sharing["n_pairs_considered"] + sharing["n_pairs_left_out"] == sharing["n_pairs"] > 0
    assert json.loads((out / "grid.json").read_text())["settings"]["iou_sampler"] == "exact"
    assert "liver" in (out / "organs.md").read_text()

    # 3) a second invocation runs nothing
    results = sorted(chk.glob("*_files/result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    timings = (out / "state" / "timings.jsonl").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        res2 = rt.main(args)
    assert "5 of 5 runs are finished already" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert (out / "state" / "timings.jsonl").read_text() == timings
    assert res2["rows"][0]["dsc"] == res["rows"][0]["dsc"]

    # 4) the scores come from the run folders: change one, collect again
    ft = chk / "ft_none_init7_ft2_files" / "result.json"
    obj = json.loads(ft.read_text())
    obj["best_dice_paper"] = 0.777
    ft.write_text(json.dumps(obj))
    res3 = rt.main(parse(["--output_dir", str(out), *TINY, "--collect_only", "--no_figures"]))
    assert res3["rows"][0]["dsc"][1] == pytest.approx(0.777)
    assert "0.777" in Path(res3["table"]).read_text()
    assert res3["native"] is None  # off by default for the demo

    # 5) the native-resolution table: each row's best fine-tuning predicts the raw validation
    # scans in their own geometry (predict.py), scored against the raw labels as metrics.py does
    res4 = rt.main(parse(["--output_dir", str(out), *TINY, "--collect_only", "--no_figures", "--native_table"]))
    md = Path(res4["native"]["md"]).read_text()
    assert "Scores per organ at native resolution" in md and "| liver |" in md
    split = json.loads((out / "data" / "phantoms" / "split.json").read_text())
    labels = out / "data" / "phantoms" / "labelled" / "labels"
    collected = report.collect(
        rt.build_plan(
            args,
            rt.resolve_settings(args),
            runqueue.parse_rows(args.rows),
            [7],
            [1, 2],
            rt.data_paths(args, str(out)),
            str(chk),
        ),
        runqueue.parse_rows(args.rows),
        str(chk),
    )
    for key in ("none", "0.3-0.6"):
        best = max(zip(collected[key]["dsc"], collected[key]["runs"]))[1]
        pred_dir = out / "native" / best
        assert best in md
        for case in split["val"]:
            pred, lab = nib.load(pred_dir / f"{case}.nii.gz"), nib.load(labels / f"{case}.nii.gz")
            assert pred.shape == lab.shape and np.array_equal(pred.affine, lab.affine)
        mine = json.loads((pred_dir / "native_scores.json").read_text())["summary"]
        # metrics.py scores every case of its --label_dir: give it the validation cases' labels
        val_labels = tmp_path / "val_labels"
        val_labels.mkdir(exist_ok=True)
        for case in split["val"]:
            shutil.copy(labels / f"{case}.nii.gz", val_labels / f"{case}.nii.gz")
        route = metrics.main(
            metrics.get_args_parser().parse_args(["--pred_dir", str(pred_dir), "--label_dir", str(val_labels)])
        )
        assert route["dice_mean"] == pytest.approx(mine["dice_mean"]) and route["nsd_mean"] == pytest.approx(
            mine["nsd_mean"]
        )
    assert res3["rows"][0]["dsc"][1] == pytest.approx(0.777) and "ft_none_init7_ft2" in md  # the best of its row now


def test_native_table_needs_the_raw_validation_scans(tmp_path):
    raw = tmp_path / "img_0000.nii.gz"
    raw.write_bytes(b"x")
    manifest = {"args": {}, "cases": {"a": {"source": str(raw), "label_source": str(tmp_path / "gone.nii.gz")}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserError, match=r"the raw label of validation case a \(.*gone.nii.gz\) is gone.*--no-native_table"
    ):
        rt.native_inputs(str(tmp_path), {"train": [], "val": ["a"]})
    with pytest.raises(UserError, match="validation case b is not in"):
        rt.native_inputs(str(tmp_path), {"train": [], "val": ["b"]})
    (tmp_path / "gone.nii.gz").write_bytes(b"y")
    assert rt.native_inputs(str(tmp_path), {"train": [], "val": ["a"]}) == {
        "a": (str(raw), str(tmp_path / "gone.nii.gz"))
    }

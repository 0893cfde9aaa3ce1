"""Reproduce the paper's IoU-interval table with one command (and the embedded demo).

The grid: one row per IoU interval of the positive pairs (default the paper's six:
no pretraining, [0, 0], [0.0001, 0.3], [0.3, 0.6], [0.6, 1], random crop [0, 1]); per
pretrained row, SimSiam pretrainings with the seeds 4294967295 and 381122412, each
fine-tuned with the seeds 4294967295 and 381122412 (4 Dice scores per row); the "no
pretraining" row fine-tunes a random encoder with the 2 x 2 (initialisation seed,
fine-tuning seed) pairs. 34 runs in all. Runs are called in-process
(``main_simsiam.main`` / ``main_finetune.main``) and are resumable. ``--launcher local``
(the default) spreads them over processes and GPUs of this machine; ``--launcher slurm``
submits one SLURM job per run (fine-tunings after their pretraining), which is also how
several machines share one ``--output_dir``. This script is the command line (flags,
presets, the plan's argv, data preparation, ``grid.json``); ``runqueue.py`` runs the plan
on this machine, ``slurm.py`` submits it to SLURM, ``report.py`` renders the results.

Output folder::

    <output_dir>/grid.json                 format version, rows, seeds, preset, settings, split
    <output_dir>/table.md, table.csv       the table (ours beside the paper's), printed at the end
    <output_dir>/organs.md, organs.csv     challenge-grade per-organ Dice and NSD per row
    <output_dir>/table_n<N>.*, organs_n<N>.*  with --n_train_cases: the same per label budget N
    <output_dir>/budget.md, budget.csv     with --n_train_cases: Dice per interval and budget
                                           (figures/label_budget.png: Dice against N per interval)
    <output_dir>/native.md, native.csv     the same at native resolution: the raw validation scans
                                           predicted by each row's best model (predict.py), scored
                                           against the raw labels (--native_table; paper preset)
    <output_dir>/native/<run>/             those predictions (<case>.nii.gz) and native_scores.*
    <output_dir>/figures/collapse.png      collapse coefficient over pretraining epochs
    <output_dir>/figures/organ_sharing.png fraction of positive pairs sharing an organ
    <output_dir>/figures/crop_pairs.png    example crop pairs per interval
    <output_dir>/runs/                     every run's files (engine.run_paths)
    <output_dir>/state/                    logs/ (one per run), timings.jsonl, slurm_jobs.json (SLURM: each
                                           run's job), failed/ and locks/ (local launcher)
    <output_dir>/slurm/                    SLURM job scripts and logs (<job id>_<task>_log.out / .err)
    <output_dir>/data/                     demo only: phantoms and their preprocessed slices

Usage::

    # the demo: synthetic CT, the whole grid at laptop size, the table (= make demo)
    .venv/bin/python reproduce_table.py --preset demo --output_dir demo_output

    # the paper on FLARE 2022, preprocessed slices (see preprocess_flare_*.py)
    python reproduce_table.py --preset paper --output_dir table_flare \\
        --unlabelled_dir flare_2d/unlabelled --labelled_dir flare_2d/labelled

    # the same from the raw FLARE download: preprocessing first (resumable)
    python reproduce_table.py --preset paper --output_dir table_flare \\
        --raw_unlabelled_dir FLARE22/unlabelled --raw_labelled_dir FLARE22Train \\
        --unlabelled_dir flare_2d/unlabelled --labelled_dir flare_2d/labelled

    # four GPUs of one machine: one worker per GPU
    python reproduce_table.py --preset paper ... --gpus 0,1,2,3

    # a SLURM cluster: 34 jobs of 4 GPUs each (4 ranks, the paper's global batch); again to resubmit failed runs
    python reproduce_table.py --preset paper ... --launcher slurm --slurm_partition gpu --slurm_gpus_per_job 4
    python reproduce_table.py --preset demo --output_dir demo_slurm --launcher slurm --slurm_gpus_per_job 0 \
        --slurm_cpus_per_task 1 --slurm_wait        # the demo on CPU nodes, waiting for the table

    # the commands only (34 lines), or one shell file per run for a scheduler of your own
    python reproduce_table.py --preset paper ... --dry_run
    python reproduce_table.py --preset paper ... --write_scripts jobs/

    # the table from whatever has finished so far
    python reproduce_table.py --preset paper ... --collect_only

    # two rows, shorter runs
    python reproduce_table.py --preset demo --output_dir demo_small --rows none,0.3-0.6 --n_pretrain_epochs 1

    # the same table with the original's trial-and-error sampler (Algorithm 1), in its own folder
    python reproduce_table.py --preset paper --output_dir table_flare_original --iou_sampler original ...

    # your own data (preprocess_labelled.py output: label set and split.json inside), with the label-budget
    # axis: every pretraining fine-tuned on the first 1, 2, 5 and 15 training cases of the split
    python reproduce_table.py --preset paper --output_dir table_liver --unlabelled_dir liver_2d_unlabelled \
        --labelled_dir liver_2d --nsd_tolerance_mm 2 --n_train_cases 1,2,5,15

Bad input (missing data folders, an unknown preset, a results folder written by another
version of this script or for another grid, runs that disagree on the fine-tuning split,
no ``sbatch`` here or a job that ``sbatch`` refuses) stops with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

import make_phantoms
import metrics
import predict
import preprocess_flare_labelled
import preprocess_flare_unlabelled
import report
import runqueue
import slurm
from data import DEFAULT_SPLIT_PATH, SPLIT_NAME, LabelSet, load_nifti, load_split, manifest_labels, read_manifest
from engine import run_paths
from iou_crops import IOU_SAMPLERS
from report import PAPER_ROW_KEYS
from runqueue import Row, Run
from utils import TrainingError, UserError, atomic_write_json, check_outputs_apart, prepare_output_dir, run_cli

logger = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))

#: Version of the results-folder layout (``grid.json``); a folder of another version is refused.
GRID_FORMAT = "ioupos-table-v1"
#: The two seeds of the paper, used for pretraining and for fine-tuning.
PAPER_SEEDS: tuple[int, int] = (4294967295, 381122412)

#: Hyper-parameters of each preset; every one can be overridden by the flag of the same name.
PRESETS: dict[str, dict[str, Any]] = {
    # every value as in the paper (DESIGN.md)
    "paper": {
        "spatial_dims": 2,
        "arch": "swin",
        "embedding_size": 48,
        "low_resource_mode": False,
        "crop_size": 96,
        "finetune_crop_size": 96,
        # the original passes drop path 0.1 to its pretraining and none (MONAI's 0.0) to its fine-tuning
        "pretrain_drop_path_rate": 0.1,
        "finetune_drop_path_rate": 0.0,
        "iou_sampler": "exact",
        "use_amp": True,
        "n_pretrain_epochs": 100,
        "pretrain_batch_size": 128,
        "pretrain_lr": 0.025,
        "pretrain_end_lr": 1e-6,
        "pretrain_wd": 1e-5,
        "pretrain_warmup_epochs": 0,
        "max_pretrain_images": 0,
        "n_finetune_epochs": 225,
        "finetune_batch_size": 32,
        "finetune_lr": 1e-3,
        "finetune_end_lr": 5e-5,
        "finetune_wd": 1e-5,
        "finetune_warmup_epochs": 10,
        "patience": 20,
        "sw_batch_size": 64,
        "eval_every": 10,
        "eval_every_from": 90,
        "n_vis": 4,
        "max_finetune_images": 0,
        "num_workers": -1,
        "workers": 1,
        # the validation cases predicted in their own geometry by the best model of each row
        "native_table": True,
    },
    # the same grid on synthetic CT at a size a 2-core CPU finishes in minutes
    "demo": {
        "spatial_dims": 2,
        "arch": "swin",
        "embedding_size": 12,
        "low_resource_mode": True,
        "crop_size": 32,
        "finetune_crop_size": 64,
        "pretrain_drop_path_rate": 0.1,
        "finetune_drop_path_rate": 0.0,
        "iou_sampler": "exact",
        "use_amp": False,
        "n_pretrain_epochs": 2,
        "pretrain_batch_size": 16,
        "pretrain_lr": 0.025,
        "pretrain_end_lr": 1e-6,
        "pretrain_wd": 1e-5,
        "pretrain_warmup_epochs": 0,
        "max_pretrain_images": 32,
        "n_finetune_epochs": 2,
        "finetune_batch_size": 2,
        "finetune_lr": 5e-3,
        "finetune_end_lr": 5e-5,
        "finetune_wd": 1e-5,
        "finetune_warmup_epochs": 0,
        "patience": 20,
        "sw_batch_size": 16,
        "eval_every": 2,
        "eval_every_from": 1000,
        "n_vis": 0,
        "max_finetune_images": 20,
        "num_workers": 0,
        # the synthetic data set
        "phantom_labelled": 8,
        "phantom_unlabelled": 12,
        "phantom_train": 4,
        "phantom_size_xy": 96,
        "phantom_slices": 24,
        # execution (not part of grid.json): two single-threaded workers on a 2-core CPU
        "workers": 2,
        "native_table": False,
    },
}
#: Settings that are not hyper-parameters of the runs (kept out of grid.json's comparison).
_EXECUTION_KEYS = ("num_workers", "workers", "native_table")


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "reproduce_table",
        description="Run the IoU-interval grid (pretraining + fine-tuning) and render the paper's table and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--preset",
        default="paper",
        help="'paper': every hyper-parameter as in the paper, on the FLARE folders you give; "
        "'demo': synthetic CT and tiny runs (make demo). Flags below override single values",
    )
    g.add_argument(
        "--output_dir",
        required=True,
        help="results folder (grid.json, tables, figures, runs/); on a shared file system for --launcher slurm",
    )
    g.add_argument(
        "--rows",
        default=",".join(PAPER_ROW_KEYS),
        help="comma-separated rows: 'none' (no pretraining) or an IoU interval 'LO-HI'; the paper's six by default",
    )
    g.add_argument(
        "--pretrain_seeds",
        default=",".join(map(str, PAPER_SEEDS)),
        help="pretraining seeds (for 'none': encoder initialisation seeds); the paper's two by default",
    )
    g.add_argument(
        "--finetune_seeds",
        default=",".join(map(str, PAPER_SEEDS)),
        help="fine-tuning seeds, each applied to every pretraining; the paper's two by default",
    )
    g.add_argument(
        "--method",
        default="simsiam",
        choices=("simsiam", "dino"),
        help="pretraining method; the paper's table is SimSiam",
    )
    g.add_argument(
        "--n_train_cases",
        default="",
        help="the label-budget axis, e.g. '1,2,5,15': every pretraining (and the no-pretraining row) is fine-tuned "
        "with the first N training cases of the split for each N, the same cases for every row; one table per "
        "budget (table_n<N>.md), budget.md and figures/label_budget.png (Dice against N per IoU interval). "
        "Default: no axis, every training case",
    )

    g = p.add_argument_group("data (paper preset; the demo makes its own)")
    g.add_argument(
        "--unlabelled_dir",
        help="preprocessed unlabelled slices for pretraining (preprocess_flare_unlabelled.py output)",
    )
    g.add_argument(
        "--labelled_dir", help="preprocessed labelled slices for fine-tuning (preprocess_flare_labelled.py output)"
    )
    g.add_argument(
        "--raw_unlabelled_dir",
        help="raw FLARE unlabelled .nii.gz; preprocessed into --unlabelled_dir first (resumable)",
    )
    g.add_argument(
        "--raw_labelled_dir",
        help="raw FLARE labelled folder (images/, labels/); preprocessed into --labelled_dir first",
    )
    g.add_argument(
        "--split",
        help="fine-tuning split JSON {'train': [...], 'val': [...]}; default the split.json the preprocessing wrote "
        "into --labelled_dir (nnU-Net / Decathlon data, or an automatic split), else the paper's data/split.json "
        "(the demo uses its phantoms' split)",
    )
    g.add_argument(
        "--nsd_tolerance_mm",
        help="NSD tolerance of the challenge-grade scores for a data set that is not FLARE 2022 (required there): one "
        "number of mm, or a JSON object of label id -> mm; passed to every fine-tuning and to the native table. "
        "FLARE data: its per-organ tolerances by default",
    )
    g.add_argument(
        "--preprocess_workers",
        type=int,
        default=1,
        help="processes for preprocessing (1 = in this process, fastest for the small demo; more for FLARE)",
    )
    g.add_argument("--phantom_labelled", type=int, help="demo: labelled phantom cases")
    g.add_argument("--phantom_unlabelled", type=int, help="demo: unlabelled phantom cases")
    g.add_argument(
        "--phantom_train", type=int, help="demo: labelled cases in the fine-tuning train split (the rest: validation)"
    )
    g.add_argument("--phantom_size_xy", type=int, help="demo: phantom voxels along x and y")
    g.add_argument("--phantom_slices", type=int, help="demo: slices of a labelled phantom")

    g = p.add_argument_group("hyper-parameters (default: the preset's value)")
    g.add_argument("--spatial_dims", type=int, choices=(2, 3), help="2D slices (the paper) or 3D volumes")
    g.add_argument("--arch", choices=("swin", "unetr"), help="encoder / segmenter architecture (the paper: swin)")
    g.add_argument("--embedding_size", type=int, help="Swin embedding size (paper 48, demo 12)")
    g.add_argument(
        "--low_resource_mode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shrink the networks for CPU demos and tests",
    )
    g.add_argument(
        "--crop_size", type=int, help="crop size of the pretraining views (Swin: a multiple of 32; paper 96, demo 32)"
    )
    g.add_argument(
        "--finetune_crop_size",
        type=int,
        help="crop and sliding-window size of fine-tuning (Swin-UNETR: a multiple of 32, >= 64; paper 96)",
    )
    g.add_argument(
        "--pretrain_drop_path_rate",
        type=float,
        help="stochastic depth of the encoder in pretraining (paper 0.1, as the original's main_simsiam.py)",
    )
    g.add_argument(
        "--finetune_drop_path_rate",
        type=float,
        help="stochastic depth of the Swin-UNETR encoder in fine-tuning (paper 0.0: the original's main_finetune.py "
        "builds SwinUNETR without it)",
    )
    g.add_argument(
        "--iou_sampler",
        choices=IOU_SAMPLERS,
        help="crop-pair sampler of every pretraining: exact (this project's, the default of both presets) or "
        "original (the thesis' Algorithm 1 with its fallback to a random pair); run the grid once with each, "
        "in two --output_dir, to see what the exact sampler changes in the table",
    )
    g.add_argument(
        "--use_amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision on CUDA (paper: on)"
    )
    g.add_argument("--n_pretrain_epochs", type=int, help="pretraining epochs (paper 100)")
    g.add_argument("--pretrain_batch_size", type=int, help="pretraining batch size (paper 128)")
    g.add_argument("--pretrain_lr", type=float, help="pretraining base learning rate (paper 0.025)")
    g.add_argument("--pretrain_end_lr", type=float, help="pretraining final learning rate (paper 1e-6)")
    g.add_argument("--pretrain_wd", type=float, help="pretraining weight decay (paper 1e-5)")
    g.add_argument("--pretrain_warmup_epochs", type=int, help="pretraining warm-up epochs (paper 0)")
    g.add_argument("--max_pretrain_images", type=int, help="use only the first N pretraining slices (0 = all)")
    g.add_argument("--n_finetune_epochs", type=int, help="maximum fine-tuning epochs (paper 225)")
    g.add_argument("--finetune_batch_size", type=int, help="fine-tuning batch size in slices (paper 32)")
    g.add_argument("--finetune_lr", type=float, help="fine-tuning base learning rate (paper 1e-3)")
    g.add_argument("--finetune_end_lr", type=float, help="fine-tuning final learning rate (paper 5e-5)")
    g.add_argument("--finetune_wd", type=float, help="fine-tuning weight decay (paper 1e-5)")
    g.add_argument("--finetune_warmup_epochs", type=int, help="fine-tuning warm-up epochs (paper 10)")
    g.add_argument(
        "--patience", type=int, help="fine-tuning early stop after this many evaluations without improvement (paper 20)"
    )
    g.add_argument("--sw_batch_size", type=int, help="sliding-window batch size of the evaluation (paper 64)")
    g.add_argument(
        "--eval_every", type=int, help="fine-tuning: evaluate every this many epochs (paper 10; the last epoch always)"
    )
    g.add_argument(
        "--eval_every_from", type=int, help="fine-tuning: evaluate every epoch from this epoch on (paper 90)"
    )
    g.add_argument("--n_vis", type=int, help="validation slices drawn in each fine-tuning's predictions.png (0: none)")
    g.add_argument("--max_finetune_images", type=int, help="use only the first N fine-tuning slices (0 = all)")
    g.add_argument("--pretrain_args", default="", help="extra flags for every pretraining, one shell-quoted string")
    g.add_argument("--finetune_args", default="", help="extra flags for every fine-tuning, one shell-quoted string")

    g = p.add_argument_group("execution")
    g.add_argument(
        "--launcher",
        default="local",
        choices=("local", "slurm"),
        help="'local': workers on this machine (--workers, --gpus); 'slurm': one SLURM job per run through "
        "submitit, fine-tunings after their pretraining (the --slurm_* flags); machines sharing --output_dir "
        "must use 'slurm'",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="local worker processes claiming runs (1 = run in this process; paper preset 1, demo 2 single-threaded)",
    )
    g.add_argument(
        "--gpus",
        default="",
        help="comma-separated GPU ids, one worker per GPU (CUDA_VISIBLE_DEVICES each); overrides --workers",
    )
    g.add_argument(
        "--threads_per_worker", type=int, default=0, help="torch threads per worker (0 = CPU cores / workers)"
    )
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of every run")
    g.add_argument("--num_workers", type=int, help="data-loader processes per run (-1 = measured; demo 0)")
    g.add_argument("--use_wandb", action="store_true", help="log every run to Weights & Biases")
    g.add_argument("--wandb_project", default="ioupos-table", help="wandb project of the runs")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    g.add_argument(
        "--poll_s", type=float, default=2.0, help="seconds between checks while waiting for runs of other workers"
    )

    g = p.add_argument_group("SLURM (--launcher slurm; README: On a SLURM cluster)")
    g.add_argument("--slurm_partition", help="partition of every job (default: the cluster's default partition)")
    g.add_argument(
        "--slurm_gpus_per_job",
        type=int,
        default=1,
        help="GPUs per job, one training process (srun task) each; the grid's batch sizes are split over them, "
        "so every run keeps the global batch of the preset (4 on 4-GPU nodes); 0: one CPU-only task",
    )
    g.add_argument(
        "--slurm_cpus_per_task",
        type=int,
        default=8,
        help="CPU cores per process (torch threads, data-loader workers); raise it for data loading on big nodes",
    )
    g.add_argument("--slurm_mem_gb", type=float, default=0.0, help="memory per job in GB (0: the partition's default)")
    g.add_argument(
        "--slurm_time_min",
        type=int,
        default=1440,
        help="time limit per job in minutes; a job that reaches it requeues itself and resumes, so a limit "
        "shorter than a run works (it must fit one epoch); choose what your partition allows",
    )
    g.add_argument("--slurm_account", help="account to charge (sbatch --account), if your cluster wants one")
    g.add_argument("--slurm_qos", help="quality of service (sbatch --qos), if your cluster wants one")
    g.add_argument(
        "--slurm_max_parallel",
        type=int,
        default=0,
        help="at most this many of the grid's jobs run at a time (job names <grid>_slot<i> with "
        "--dependency=singleton); 0: as many as SLURM allows",
    )
    g.add_argument(
        "--slurm_extra",
        default="",
        help="further sbatch options for every job, one shell-quoted string such as "
        "'--constraint=v100 --exclusive' (not the options set by the flags above)",
    )
    g.add_argument(
        "--slurm_setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line every job runs before the training, e.g. 'module load cuda/12.1' (repeat the flag "
        "for several lines); the job's python is this one (sys.executable)",
    )
    g.add_argument(
        "--slurm_wait",
        action="store_true",
        help="after submitting, wait until every job has ended, then render the table (default: submit and exit; "
        "--collect_only later)",
    )
    g.add_argument(
        "--slurm_poll_s", type=float, default=30.0, help="seconds between squeue queries while waiting (--slurm_wait)"
    )

    g = p.add_argument_group("modes")
    g.add_argument("--dry_run", action="store_true", help="print the command of every run and exit; nothing is written")
    g.add_argument(
        "--write_scripts",
        metavar="DIR",
        help="write one shell file per run (and all.sh) into DIR to run them yourself or with a scheduler of your own "
        "(SLURM: --launcher slurm submits them), then exit",
    )
    g.add_argument(
        "--collect_only", action="store_true", help="run nothing; render the table and figures from finished runs"
    )
    g.add_argument("--no_figures", action="store_true", help="skip the figures")
    g.add_argument(
        "--native_table",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the grid, predict the raw validation scans (the sources recorded in --labelled_dir's "
        "manifest.json) with each row's best fine-tuning (highest validation dice_paper) in their own geometry "
        "(predict.py) and score them against the raw labels: native.md / native.csv. Default: on for --preset "
        "paper, off for the demo",
    )
    g.add_argument("--figure_pairs", type=int, default=2000, help="crop pairs per interval for organ_sharing.png")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's values with the flags that were given on top.

    Raises:
        UserError: unknown preset, or a value out of range.
    """
    if args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset!r} does not exist; choose one of {', '.join(PRESETS)}")
    s = dict(PRESETS[args.preset])
    for key in ("phantom_labelled", "phantom_unlabelled", "phantom_train", "phantom_size_xy", "phantom_slices"):
        if getattr(args, key, None) is not None and key not in s:
            raise UserError(f"--{key} only applies to --preset demo (the synthetic data set)")
    for key in list(s):
        v = getattr(args, key, None)
        if v is not None:
            s[key] = v
    for key in (
        "n_pretrain_epochs",
        "n_finetune_epochs",
        "pretrain_batch_size",
        "finetune_batch_size",
        "crop_size",
        "embedding_size",
    ):
        if s[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {s[key]}")
    if s["arch"] == "swin" and s["crop_size"] % 32:
        raise UserError(f"--crop_size {s['crop_size']} must be a multiple of 32 for Swin")
    return s


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _require_dir(path: str | None, flag: str) -> str:
    if not path:
        raise UserError(f"{flag} is required with --preset paper")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path} does not exist")
    return path


def data_paths(args: argparse.Namespace, out: str) -> dict[str, str]:
    """Where the grid's data is (or will be), without touching anything (for --dry_run)."""
    if args.preset == "demo":
        root = os.path.join(out, "data")
        return {
            "unlabelled_dir": os.path.join(root, "slices", "unlabelled"),
            "labelled_dir": os.path.join(root, "slices", "labelled"),
            "split": os.path.join(root, "phantoms", "split.json"),
        }
    res = {}
    for key in ("unlabelled_dir", "labelled_dir"):
        v = getattr(args, key)
        if not v:
            raise UserError(
                f"--{key} is required with --preset {args.preset} (the preprocessed slices, or where --raw_{key} goes)"
            )
        res[key] = os.path.abspath(os.path.expanduser(v))
    res["split"] = os.path.abspath(os.path.expanduser(args.split)) if args.split else default_split(res["labelled_dir"])
    return res


def default_split(labelled_dir: str) -> str:
    """The fine-tuning split of a preprocessed folder: the ``split.json`` its preprocessing wrote
    (nnU-Net / Decathlon data, an automatic split), else the paper's FLARE split."""
    own = os.path.join(labelled_dir, SPLIT_NAME)
    return own if os.path.isfile(own) else DEFAULT_SPLIT_PATH


def prepare_data(args: argparse.Namespace, settings: dict[str, Any], out: str) -> dict[str, str]:
    """Make the demo data, or preprocess the raw FLARE folders, or check the given folders.

    Every step is resumable (finished cases are skipped), so a rerun costs seconds.
    """
    paths = data_paths(args, out)
    if args.preset == "demo":
        root = os.path.join(out, "data")
        logger.info(
            "demo data: %d labelled + %d unlabelled phantoms of %d x %d x %d in %s",
            settings["phantom_labelled"],
            settings["phantom_unlabelled"],
            settings["phantom_size_xy"],
            settings["phantom_size_xy"],
            settings["phantom_slices"],
            root,
        )
        made = make_phantoms.generate_dataset(
            os.path.join(root, "phantoms"),
            n_labelled=settings["phantom_labelled"],
            n_unlabelled=settings["phantom_unlabelled"],
            seed=0,
            size_xy=settings["phantom_size_xy"],
            n_slices=settings["phantom_slices"],
            n_train=settings["phantom_train"],
            num_workers=min(2, os.cpu_count() or 1),
        )
        _preprocess(
            "labelled", made["labelled_dir"], paths["labelled_dir"], made["split_path"], args.preprocess_workers
        )
        _preprocess("unlabelled", made["unlabelled_dir"], paths["unlabelled_dir"], None, args.preprocess_workers)
        return paths
    if args.raw_labelled_dir:
        _preprocess(
            "labelled",
            _require_dir(args.raw_labelled_dir, "--raw_labelled_dir"),
            paths["labelled_dir"],
            paths["split"] if args.split else None,  # else the preprocessing's own (FLARE: the paper's)
            args.preprocess_workers,
        )
        paths["split"] = data_paths(args, out)["split"]  # the split.json it may have written
    if args.raw_unlabelled_dir:
        _preprocess(
            "unlabelled",
            _require_dir(args.raw_unlabelled_dir, "--raw_unlabelled_dir"),
            paths["unlabelled_dir"],
            None,
            args.preprocess_workers,
        )
    _require_dir(paths["unlabelled_dir"], "--unlabelled_dir")
    _require_dir(paths["labelled_dir"], "--labelled_dir")
    if not os.path.isfile(paths["split"]):
        raise UserError(f"--split {paths['split']} does not exist")
    return paths


def grid_outputs(out: str) -> dict[str, str]:
    """``{description: path}`` of what the grid writes in ``out`` (its data, in the demo, is made there too)."""
    names = (
        "runs",
        "state",
        "slurm",
        "figures",
        "grid.json",
        "table.md",
        "table.csv",
        "organs.md",
        "organs.csv",
        "budget.md",
        "budget.csv",
    )
    return {f"--output_dir's {n}": os.path.join(out, n) for n in names}


def check_grid_inputs(args: argparse.Namespace, out: str) -> None:
    """Refuse inputs (raw or preprocessed data folders, the split) on, inside or around what
    the grid writes (UserError naming both)."""
    inputs = {
        "--raw_labelled_dir": args.raw_labelled_dir,
        "--raw_unlabelled_dir": args.raw_unlabelled_dir,
        "--split": args.split,
    }
    if args.preset != "demo":
        inputs.update({"--labelled_dir": args.labelled_dir, "--unlabelled_dir": args.unlabelled_dir})
    check_outputs_apart(grid_outputs(out), {k: os.path.abspath(os.path.expanduser(v)) for k, v in inputs.items() if v})


def prepare_data_once(args: argparse.Namespace, settings: dict[str, Any], out: str) -> dict[str, str]:
    """:func:`prepare_data` under a lock on ``<out>/state/data.lock``: two grids started on one
    fresh ``--output_dir`` cooperate (the second waits, then finds every case finished)
    instead of writing the same files at once."""
    state = os.path.join(out, "state")
    os.makedirs(state, exist_ok=True)
    lock = FileLock(os.path.join(state, "data.lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        logger.info("another reproduce_table.py is preparing the data in %s; waiting for it", out)
        lock.acquire()
    try:
        return prepare_data(args, settings, out)
    finally:
        lock.release()


def preprocess_argv(raw: str, out: str, split: str | None, workers: int) -> list[str]:
    """The flags of the grid's ``preprocess_flare_*.py`` runs: the folders and workers only,
    every preprocessing setting at the script's default (the paper's)."""
    argv = ["--data_dir", raw, "--output_dir", out, "--num_workers", str(max(1, workers))]
    return argv + (["--split_path", split] if split else [])


def _preprocess(kind: str, raw: str, out: str, split: str | None, workers: int) -> None:
    """Run ``preprocess_flare_<kind>.py`` on ``raw`` into ``out`` (its summary goes to stderr)."""
    mod = preprocess_flare_labelled if kind == "labelled" else preprocess_flare_unlabelled
    logger.info("preprocessing %s: %s -> %s", kind, raw, out)
    with contextlib.redirect_stdout(sys.stderr):  # its summary table; stdout is for our table
        mod.main(mod.get_args_parser().parse_args(preprocess_argv(raw, out, split, workers)))


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def _common_argv(s: dict[str, Any]) -> list[str]:
    argv = [
        "--spatial_dims",
        str(s["spatial_dims"]),
        "--arch",
        s["arch"],
        "--embedding_size",
        str(s["embedding_size"]),
    ]
    if s["low_resource_mode"]:
        argv.append("--low_resource_mode")
    if s["use_amp"]:
        argv.append("--use_amp")
    return argv


def build_plan(
    args: argparse.Namespace,
    s: dict[str, Any],
    rows: list[Row],
    pre_seeds: list[int],
    ft_seeds: list[int],
    data: dict[str, str],
    chkpt_dir: str,
    ranks: int = 1,
) -> list[Run]:
    """Every run of the grid with its full argv (see runqueue.plan_grid for the order).

    ``ranks``: processes per run (``--slurm_gpus_per_job``); the batch sizes of the settings
    are global and each process gets its share, so every layout trains with the same batch.

    Raises:
        UserError: a batch size that ``ranks`` does not divide.
    """
    pre_extra = shlex.split(args.pretrain_args)
    ft_extra = shlex.split(args.finetune_args)
    common = _common_argv(s)
    pre_batch = _per_rank(s["pretrain_batch_size"], ranks, "pretrain_batch_size")
    ft_batch = _per_rank(s["finetune_batch_size"], ranks, "finetune_batch_size")

    def pre_argv(row: Row, seed: int, name: str) -> list[str]:
        return [
            "--data_dir",
            data["unlabelled_dir"],
            *common,
            "--crop_size",
            str(s["crop_size"]),
            "--drop_path_rate",
            f"{s['pretrain_drop_path_rate']:g}",
            "--min_iou",
            f"{row.min_iou:g}",
            "--max_iou",
            f"{row.max_iou:g}",
            "--iou_sampler",
            s["iou_sampler"],
            "--batch_size",
            str(pre_batch),
            "--n_epochs",
            str(s["n_pretrain_epochs"]),
            "--base_lr",
            f"{s['pretrain_lr']:g}",
            "--end_lr",
            f"{s['pretrain_end_lr']:g}",
            "--warmup_epochs",
            str(s["pretrain_warmup_epochs"]),
            "--wd",
            f"{s['pretrain_wd']:g}",
            "--max_images",
            str(s["max_pretrain_images"]),
            "--seed",
            str(seed),
            "--run_name",
            name,
            "--chkpt_dir",
            chkpt_dir,
            *pre_extra,
        ]

    def ft_argv(row: Row, pre_seed: int, ft_seed: int, name: str, weights: str) -> list[str]:
        return [
            "--data_dir",
            data["labelled_dir"],
            "--split_path",
            data["split"],
            *common,
            "--crop_size",
            str(s["finetune_crop_size"]),
            "--drop_path_rate",
            f"{s['finetune_drop_path_rate']:g}",
            "--chkpt_path",
            weights,
            "--batch_size",
            str(ft_batch),
            "--n_epochs",
            str(s["n_finetune_epochs"]),
            "--base_lr",
            f"{s['finetune_lr']:g}",
            "--end_lr",
            f"{s['finetune_end_lr']:g}",
            "--warmup_epochs",
            str(s["finetune_warmup_epochs"]),
            "--wd",
            f"{s['finetune_wd']:g}",
            "--patience",
            str(s["patience"]),
            "--eval_every",
            str(s["eval_every"]),
            "--eval_every_from",
            str(s["eval_every_from"]),
            "--sw_batch_size",
            str(s["sw_batch_size"]),
            "--n_vis",
            str(s["n_vis"]),
            "--max_images",
            str(s["max_finetune_images"]),
            "--seed",
            str(ft_seed),
            "--run_name",
            name,
            "--chkpt_dir",
            chkpt_dir,
            *(["--nsd_tolerance_mm", args.nsd_tolerance_mm] if args.nsd_tolerance_mm else []),
            *ft_extra,
        ]

    # the random encoders of the "no pretraining" row: the fine-tuning's own encoder config
    enc = {
        "arch": s["arch"],
        "spatial_dims": s["spatial_dims"],
        "embedding_size": s["embedding_size"],
        "low_resource_mode": bool(s["low_resource_mode"]),
        "drop_path_rate": float(s["finetune_drop_path_rate"]),
        "crop_size": s["finetune_crop_size"],
    }
    script = "main_simsiam" if args.method == "simsiam" else "main_dino"
    return runqueue.plan_grid(
        rows,
        pre_seeds,
        ft_seeds,
        chkpt_dir,
        pre_argv,
        ft_argv,
        encoder_config=enc,
        pretrain_script=script,
        budgets=parse_budgets(args.n_train_cases) or (None,),
    )


def parse_budgets(spec: str | None) -> list[int] | None:
    """``--n_train_cases '1,2,5,15'`` -> ``[1, 2, 5, 15]`` (sorted); empty: None (no budget axis).

    Raises:
        UserError: not positive integers, or a number given twice.
    """
    items = [x.strip() for x in (spec or "").split(",") if x.strip()]
    if not items:
        return None
    try:
        budgets = [int(x) for x in items]
    except ValueError:
        raise UserError(f"--n_train_cases {spec!r} must be comma-separated numbers of cases, e.g. '1,2,5,15'") from None
    if any(n < 1 for n in budgets):
        raise UserError(f"--n_train_cases {spec!r}: every number of labelled cases must be at least 1")
    if len(set(budgets)) != len(budgets):
        raise UserError(f"--n_train_cases {spec!r} lists a number twice")
    return sorted(budgets)


def _per_rank(total: int, ranks: int, key: str) -> int:
    if total % ranks:
        raise UserError(
            f"--{key} {total} is the batch of all {ranks} processes of a job (--slurm_gpus_per_job {ranks}) "
            f"and must be a multiple of {ranks}"
        )
    return total // ranks


def execution_argv(args: argparse.Namespace, s: dict[str, Any], progress_bars: bool) -> dict[str, list[str]]:
    """Flags per run kind that change how a run executes, not what it computes (not in grid.json).
    ``progress_bars``: the runs' own bars (one run at a time in this terminal)."""
    argv = [
        "--device",
        args.device,
        "--num_workers",
        str(s["num_workers"]),
        "--progress" if (args.progress and progress_bars) else "--no-progress",
    ]
    if args.use_wandb:
        argv += ["--use_wandb", "--wandb_project", args.wandb_project]
    return {"pretrain": list(argv), "finetune": argv + ["--ignore_user_warning"]}


# ---------------------------------------------------------------------------------------
# grid.json
# ---------------------------------------------------------------------------------------


def grid_meta(
    args: argparse.Namespace, s: dict[str, Any], rows: list[Row], pre_seeds: list[int], ft_seeds: list[int]
) -> dict[str, Any]:
    """What ``grid.json`` records of a grid (execution settings left out), compared on every invocation."""
    return {
        "format": GRID_FORMAT,
        "preset": args.preset,
        "method": args.method,
        "rows": [r.key for r in rows],
        "pretrain_seeds": pre_seeds,
        "finetune_seeds": ft_seeds,
        "settings": {
            k: v
            for k, v in s.items()
            if k not in _EXECUTION_KEYS and (args.preset == "demo" or not k.startswith("phantom_"))
        },
        "pretrain_args": args.pretrain_args,
        "finetune_args": args.finetune_args,
        # recorded since the label-budget axis and other data sets (None in folders made before: the same grid)
        "n_train_cases": parse_budgets(args.n_train_cases),
        "nsd_tolerance_mm": args.nsd_tolerance_mm or None,
    }


def check_grid_file(out: str, meta: dict[str, Any], split: dict[str, list[str]] | None = None) -> dict[str, Any] | None:
    """Compare ``meta`` (and the split) with ``<out>/grid.json``; return what is stored.

    Raises:
        UserError: the folder was written by another version of this script or for
            another grid (the first difference is named).
    """
    path = os.path.join(out, "grid.json")
    if not os.path.isfile(path):
        if os.path.isdir(out) and any(os.path.exists(os.path.join(out, d)) for d in ("runs", "table.md")):
            raise UserError(
                f"--output_dir {out} holds results but no grid.json: not written by this version of reproduce_table.py; choose another folder"
            )
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(old, dict) or old.get("format") != GRID_FORMAT:
        raise UserError(
            f"{path} was written by another version of the table (format {old.get('format') if isinstance(old, dict) else None!r}, "
            f"this is {GRID_FORMAT!r}); use another --output_dir"
        )
    for key, new in meta.items():
        if key == "settings":
            for k in sorted(set(new) | set(old.get("settings", {}))):
                a, b = old.get("settings", {}).get(k), new.get(k)
                if a != b:
                    raise UserError(
                        f"{path} is a grid with {k}={a!r}, this command asks for {k}={b!r}; use the same flags or another --output_dir"
                    )
        elif old.get(key) != new:
            raise UserError(
                f"{path} is a grid with {key}={old.get(key)!r}, this command asks for {key}={new!r}; use another --output_dir"
            )
    if split is not None and old.get("split") is not None and old["split"] != split:
        raise UserError(
            f"{path} was made with another fine-tuning split ({_split_diff(old['split'], split)}); use another --output_dir"
        )
    return old


def _split_diff(a: dict[str, list[str]], b: dict[str, list[str]]) -> str:
    for key in ("train", "val"):
        x, y = set(a.get(key, [])), set(b.get(key, []))
        if x != y:
            only_a, only_b = sorted(x - y), sorted(y - x)
            return f"{key}: {len(x)} vs {len(y)} cases, e.g. {(only_a or only_b)[0]!r} only in {'the folder' if only_a else 'this split'}"
    return "different order"


def check_runs_split(plan: list[Run], chkpt_dir: str, split: dict[str, list[str]]) -> None:
    """Every finished fine-tuning must have used the grid's split (read from its ``_args.json``).

    Raises:
        UserError: a run used another split (named).
    """
    for r in plan:
        if r.kind != "finetune" or not runqueue.is_finished(chkpt_dir, r.name):
            continue
        args_path = run_paths(chkpt_dir, r.name)["args"]
        try:
            with open(args_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {args_path}: {e}") from None
        sp = saved.get("split_path")
        if not sp:
            raise UserError(f"{args_path} records no fine-tuning split")
        if not os.path.isfile(sp):
            raise UserError(f"run {r.name} was fine-tuned with split {sp}, which no longer exists")
        if load_split(sp) != split:
            raise UserError(
                f"run {r.name} was fine-tuned with split {sp}, which differs from the grid's split "
                f"({_split_diff(load_split(sp), split)}); the runs of one table must share one split"
            )


# ---------------------------------------------------------------------------------------
# Scores at native resolution
# ---------------------------------------------------------------------------------------


def native_inputs(labelled_dir: str, split: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """The raw (image, label) files of the validation cases, as ``--labelled_dir``'s
    ``manifest.json`` recorded them at preprocessing time: ``{case: (image, label)}``.

    Raises:
        UserError: the manifest is missing, a validation case is not in it, or its raw files are gone.
    """
    if not os.path.isfile(os.path.join(labelled_dir, "manifest.json")):
        raise UserError(
            f"{labelled_dir} has no manifest.json naming the raw scans of its cases (e.g. the original code's "
            "preprocessing writes none); the native-resolution table needs them: pass --no-native_table to skip it"
        )
    cases = read_manifest(labelled_dir)["cases"]
    out = {}
    for case in split["val"]:
        entry = cases.get(case)
        if entry is None:
            raise UserError(
                f"validation case {case} is not in {os.path.join(labelled_dir, 'manifest.json')}; "
                "pass --no-native_table to skip the native-resolution table"
            )
        for key in ("source", "label_source"):
            p = entry.get(key)
            if not p or not os.path.isfile(p):
                raise UserError(
                    f"the raw {'image' if key == 'source' else 'label'} of validation case {case} ({p}) is gone; "
                    "the native-resolution table needs the raw FLARE files (pass --no-native_table to skip it)"
                )
        out[case] = (entry["source"], entry["label_source"])
    return out


def _read_ids(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label ids and voxel size (mm) of a NIfTI label volume."""
    img = load_nifti(path)  # read in full, the gzip checksum checked
    try:
        return np.asarray(img.dataobj).round().astype(np.int64), tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as e:  # nibabel raises many types for a bad file
        raise UserError(f"cannot read label volume {path}: {type(e).__name__}: {e}") from None


def native_table(
    rows: list[Row],
    collected: dict[str, dict[str, Any]],
    chkpt_dir: str,
    items: dict[str, tuple[str, str]],
    out: str,
    s: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, str]:
    """Predict the raw validation scans with each row's best fine-tuning (``predict.py``, in
    their own geometry; resumable) and score them against the raw labels with the official
    FLARE 2022 conventions (:func:`metrics.organ_scores`, each label's voxel size): writes
    ``native/<run>/<case>.nii.gz`` and ``native_scores.*`` per row, and ``native.md`` / ``native.csv``.

    Raises:
        TrainingError: a scan could not be predicted (named in the log).
    """
    device = predict.resolve_device(args.device)
    native: dict[str, dict[str, Any]] = {}
    chosen = []
    for row in rows:
        c = collected[row.key]
        done = [(d, name) for d, name in zip(c["dsc"], c["runs"]) if d is not None]
        if not done:
            continue
        dsc, name = max(done)
        weights = run_paths(chkpt_dir, name)["weights"]
        pred_dir = os.path.join(out, "native", name)
        predictor = predict.Predictor.from_checkpoint(
            weights, device, bool(s["use_amp"]), sw_batch_size=s["sw_batch_size"]
        )
        todo = [
            predict.CaseInput(case, img, os.path.join(pred_dir, case + ".nii.gz")) for case, (img, _) in items.items()
        ]
        logger.info(
            "native resolution, row %s: %d validation scans with %s (dice_paper %.4f)", row.label, len(todo), name, dsc
        )
        res = predict.predict_cases(predictor, todo, progress=args.progress)
        if res["failed"]:
            raise TrainingError(
                f"native-resolution table: {res['n_failed']} scan(s) could not be predicted with {name}: "
                f"{', '.join(res['failed'])} (reasons logged above)"
            )
        per_case = {}
        labels = LabelSet(tuple(predictor.label_names), predictor.path)
        rules = metrics.scoring_rules(labels, metrics.parse_tolerance_mm(args.nsd_tolerance_mm))
        for it in todo:
            pred, _ = _read_ids(it.output)
            label, spacing = _read_ids(items[it.case][1])
            if pred.shape != label.shape:
                raise UserError(f"{it.output} has shape {pred.shape}, its label {items[it.case][1]} has {label.shape}")
            per_case[it.case] = metrics.organ_scores(
                pred,
                label,
                spacing,
                n_classes=predictor.n_classes,
                tolerance_mm=rules.tolerance_mm,
                z_axis=rules.z_axis,
            )
        metrics.write_scores(per_case, pred_dir, prefix="native", label_names=labels.names, scoring=rules.record())
        native[row.key] = {"organs": [metrics.summarize_case_scores(per_case, labels.names)]}
        chosen.append(f"{row.label}: {name} (validation dice_paper {dsc:.4f})")
    intro = (
        "Per-organ Dice and NSD of each row's best fine-tuning (highest validation dice_paper) on the raw "
        "validation scans, predicted in their own geometry with predict.py (the training preprocessing and its "
        "inverse) and scored against the raw labels at their native voxel size (FLARE 2022 conventions and "
        "tolerances for its organs, --nsd_tolerance_mm for another label set); mean over cases. Models: "
        + "; ".join(chosen)
        + "."
    )
    return report.render_organs(
        rows, native, out, stem="native", title="Scores per organ at native resolution", intro=intro
    )


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def slurm_config(args: argparse.Namespace) -> slurm.SlurmConfig:
    """The ``--slurm_*`` flags as a checked :class:`slurm.SlurmConfig`.

    Raises:
        UserError: a value out of range, or ``--slurm_extra`` setting what a flag sets.
    """
    cfg = slurm.SlurmConfig(
        partition=args.slurm_partition or None,
        gpus_per_job=args.slurm_gpus_per_job,
        cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem_gb,
        time_min=args.slurm_time_min,
        account=args.slurm_account or None,
        qos=args.slurm_qos or None,
        max_parallel=args.slurm_max_parallel,
        extra=slurm.parse_sbatch_extra(args.slurm_extra),
        setup=list(args.slurm_setup),
    )
    cfg.check()
    return cfg


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, (prepare data,) run or submit, collect, render. Returns the paths written and the table rows.

    Raises:
        UserError: bad input (see the module docstring).
        TrainingError: some runs failed (the table of the others is written first).
    """
    t_start = time.time()
    s = resolve_settings(args)
    budgets = parse_budgets(args.n_train_cases)
    metrics.parse_tolerance_mm(args.nsd_tolerance_mm)  # a bad value is refused before anything runs
    rows = runqueue.parse_rows(args.rows)
    pre_seeds = runqueue.parse_seeds(args.pretrain_seeds, "--pretrain_seeds")
    ft_seeds = runqueue.parse_seeds(args.finetune_seeds, "--finetune_seeds")
    out = os.path.abspath(os.path.expanduser(args.output_dir))
    chkpt_dir = os.path.join(out, "runs")
    state_dir = os.path.join(out, "state")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    n_workers = len(gpus) or s["workers"]
    on_slurm = args.launcher == "slurm" and not args.collect_only
    slurm_cfg = None
    if on_slurm:
        if gpus or args.workers is not None:
            raise UserError(
                "--gpus and --workers are for --launcher local; SLURM jobs get their GPUs from --slurm_gpus_per_job"
            )
        if args.write_scripts:
            raise UserError("--write_scripts writes shell files to run yourself; --launcher slurm submits the jobs")
        slurm_cfg = slurm_config(args)
    ranks = slurm_cfg.ranks if slurm_cfg else 1
    progress_bars = n_workers == 1 and not on_slurm
    meta = grid_meta(args, s, rows, pre_seeds, ft_seeds)

    if args.dry_run:
        plan = build_plan(args, s, rows, pre_seeds, ft_seeds, data_paths(args, out), chkpt_dir, ranks)
        extra = execution_argv(args, s, progress_bars)
        for i, r in enumerate(plan, 1):
            dep = f" (after {r.depends})" if r.depends else ""
            if r.init:
                dep = f" (from the random encoder reproduce_table.py writes with seed {r.init['seed']})"
            print(f"# {i}/{len(plan)} {r.name}{dep}")
            print(runqueue.command_line(r, "python", extra[r.kind]))
        return {"plan": [r.to_dict() for r in plan]}

    check_grid_file(out, meta)
    check_grid_inputs(args, out)
    # before the data is prepared (minutes for FLARE): is there a SLURM to submit to, or
    # SLURM jobs of this grid that a local launch would run a second time?
    if on_slurm:
        slurm.require_slurm()
    elif not args.collect_only and not args.write_scripts:
        names = build_plan(args, s, rows, pre_seeds, ft_seeds, data_paths(args, out), chkpt_dir, ranks)
        active = slurm.active_jobs_of_grid(state_dir, names)
        if active:
            run, job = next(iter(active.items()))
            raise UserError(
                f"{len(active)} SLURM job(s) of this grid are queued or running (e.g. job {job} for {run}); wait for "
                "them (the same command with --launcher slurm --slurm_wait) or scancel them before running it locally"
            )
    prepare_output_dir(out, "--output_dir")  # created and write-tested before the data and the runs
    if args.collect_only:
        data = data_paths(args, out)
    else:
        data = prepare_data_once(args, s, out)
    split = load_split(data["split"])
    if budgets and budgets[-1] > len(split["train"]):
        raise UserError(
            f"--n_train_cases {budgets[-1]}: the split {data['split']} has {len(split['train'])} training cases"
        )
    check_grid_file(out, meta, split)
    atomic_write_json(
        os.path.join(out, "grid.json"),
        {**meta, "split": split, "data": data, "updated": time.strftime("%Y-%m-%d %H:%M:%S")},
    )
    plan = build_plan(args, s, rows, pre_seeds, ft_seeds, data, chkpt_dir, ranks)
    logger.info(
        "grid: %d rows, %d runs (%d pretrainings, %d fine-tunings), results in %s",
        len(rows),
        len(plan),
        sum(r.kind == "pretrain" for r in plan),
        sum(r.kind == "finetune" for r in plan),
        out,
    )

    if args.write_scripts:
        written = runqueue.write_run_scripts(
            plan,
            os.path.abspath(args.write_scripts),
            chkpt_dir,
            PROJECT_ROOT,
            execution_argv(args, s, True),
            python=sys.executable,
        )
        logger.info("wrote %d shell files to %s (all.sh runs them in order)", len(written) - 1, args.write_scripts)
        return {"scripts": written}

    native_items = None
    if s["native_table"]:  # refused before the grid runs
        native_items = native_inputs(data["labelled_dir"], split)
        labels = manifest_labels(read_manifest(data["labelled_dir"]), data["labelled_dir"])
        metrics.scoring_rules(labels, metrics.parse_tolerance_mm(args.nsd_tolerance_mm))

    failed: list[str] = []
    failed_how = ""
    if on_slurm:
        sub = slurm.launch_slurm(
            plan,
            chkpt_dir,
            state_dir,
            os.path.join(out, "slurm"),
            execution_argv(args, s, False),
            slurm_cfg,
            PROJECT_ROOT,
            slurm.grid_id(out),
        )
        for run, why in sub.resubmitted.items():
            logger.warning("resubmitted %s: %s", run, why)
        slurm.print_summary(sub, len(plan))
        if not args.slurm_wait:
            logger.info(
                "follow the jobs with: squeue -u %s; the table of what has finished: the same command with "
                "--collect_only; job logs in %s",
                getpass.getuser(),
                os.path.join(out, "slurm"),
            )
            return {
                "output_dir": out,
                "submitted": sub.submitted,
                "active": sub.active,
                "resubmitted": sub.resubmitted,
                "finished": sub.finished,
                "n_runs": len(plan),
            }
        final = slurm.wait_for_jobs(sub.jobs, plan, chkpt_dir, poll_s=args.slurm_poll_s, progress=args.progress)
        failed = [r.name for r in plan if not runqueue.is_finished(chkpt_dir, r.name)]
        failed_how = (
            "did not finish on SLURM ("
            + ", ".join(f"{r}: job {sub.jobs[r]} {final.get(r, '?')}" for r in failed if r in sub.jobs)
            + f"; job logs in {os.path.join(out, 'slurm')}, run logs in {os.path.join(state_dir, 'logs')})"
        )
    elif not args.collect_only:
        cleared = runqueue.clear_failures(state_dir)
        if cleared:
            logger.info("retrying %d run(s) that failed before: %s", len(cleared), ", ".join(cleared))
        cfg = runqueue.WorkerConfig(
            chkpt_dir=chkpt_dir,
            state_dir=state_dir,
            extra_argv=execution_argv(args, s, progress_bars),
            poll_s=args.poll_s,
            owner="main",
            timings_path=os.path.join(state_dir, "timings.jsonl"),
        )
        if n_workers < 1:
            raise UserError(f"--workers must be at least 1, got {n_workers}")
        res = runqueue.run_local(
            plan,
            cfg,
            n_workers=n_workers,
            gpus=gpus,
            threads_per_worker=args.threads_per_worker,
            progress=args.progress,
        )
        failed = res["failed"]
        failed_how = f"failed (see {os.path.join(state_dir, 'failed')} and logs/)"

    check_runs_split(plan, chkpt_dir, split)
    sampler_note = "" if s["iou_sampler"] == "exact" else f", {s['iou_sampler']} sampler"
    title = f"IoU-based positives: Dice per IoU interval ({args.preset} preset, {args.method}{sampler_note})"
    budget_files: dict[str, Any] = {}
    if budgets is None:
        collected = report.collect(plan, rows, chkpt_dir)
        table = report.render_table(rows, collected, out, title=title)
        organs = report.render_organs(rows, collected, out)
        texts = [table["text"]]
        table_rows = report.table_rows(rows, collected)
    else:  # one table per label budget, the budget table and its figure
        per_budget = {n: report.collect(plan, rows, chkpt_dir, budget=n) for n in budgets}
        tables = {}
        for n in budgets:
            t = report.render_table(
                rows,
                per_budget[n],
                out,
                title=f"{title}, {n} labelled training case{'s' if n > 1 else ''}",
                stem=f"table_n{n}",
                paper=n == len(split["train"]),  # the paper fine-tuned on every training case
            )
            o = report.render_organs(rows, per_budget[n], out, stem=f"organs_n{n}")
            tables[n] = {"table": t["md"], "table_csv": t["csv"], "organs": o["md"], "organs_csv": o["csv"]}
        budget = report.render_budget(rows, per_budget, out, title=f"{title}: the label budget")
        budget_files = {"budget": budget["md"], "budget_csv": budget["csv"], "tables": tables}
        collected = per_budget[budgets[-1]]  # the native table: the models of the largest budget
        table = {"md": tables[budgets[-1]]["table"], "csv": tables[budgets[-1]]["table_csv"]}
        organs = {"md": tables[budgets[-1]]["organs"], "csv": tables[budgets[-1]]["organs_csv"]}
        texts = [budget["text"]]
        table_rows = report.budget_rows(rows, per_budget)
    native_files = None
    if native_items is not None:
        native_files = native_table(rows, collected, chkpt_dir, native_items, out, s, args)
    figures = {}
    if not args.no_figures:
        figures = report.make_figures(
            plan,
            rows,
            chkpt_dir,
            os.path.join(out, "figures"),
            data["labelled_dir"],
            split,
            s["crop_size"],
            spatial_dims=s["spatial_dims"],
            n_pairs=args.figure_pairs,
            iou_sampler=s["iou_sampler"],
        )
        if budgets is not None:
            p = report.plot_label_budget(rows, per_budget, os.path.join(out, "figures", "label_budget.png"))
            if p:
                figures["label_budget"] = p
    print("\n\n".join(texts), flush=True)
    result = {
        "output_dir": out,
        "table": table["md"],
        "table_csv": table["csv"],
        "organs": organs["md"],
        "organs_csv": organs["csv"],
        **budget_files,
        "native": native_files,
        "figures": figures,
        "rows": table_rows,
        "n_runs": len(plan),
        "n_finished": runqueue.n_finished(chkpt_dir, plan),
        "seconds": round(time.time() - t_start, 1),
    }
    if failed:
        raise TrainingError(
            f"{len(failed)} run(s) {failed_how}: {', '.join(failed)}; rerun the same command to retry them"
        )
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())

"""What every ``main_*.py`` shares: distributed set-up, seeding, schedules, parameter
groups, AMP, the training loop of one epoch, data loaders, checkpoints and logging.

A training script is a sequence of named phases built from these pieces::

    dist_info = init_distributed()                      # torchrun, srun or a single process
    fix_random_seeds(args.seed + dist_info.rank)
    paths = run_paths(args.chkpt_dir, args.run_name)     # every file the run writes
    lr = cosine_schedule(base, final, n_epochs, iters_per_epoch, warmup_epochs)
    for epoch in range(start_epoch, n_epochs):
        loader = build_loader(dataset, ..., seed=args.seed, epoch=epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, ...)
        log_epoch(paths, {"epoch": epoch, **stats})
        save_training_state(paths["last"], {...})

Determinism and resume: everything random in an epoch (shuffling, every transform's
random state in every worker, drop path) is drawn from generators seeded by
(seed, epoch, rank) or restored from the checkpoint, so a run killed at any point and
resumed from its last checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from monai.data import DataLoader
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from data import SLICE_LAYOUTS
from models import ARCHS
from utils import (
    TrainingError,
    UserError,
    append_jsonl_atomic,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_outputs_apart,
    launch_env,
    prepare_output_dir,
    remove_stale_temporaries,
    surface_user_errors,
    torch_load,
)

logger = logging.getLogger(__name__)

STATE_FORMAT = "ioupos-state-v1"
DEFAULT_CHKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


# ---------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE, srun's tasks on this node)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Set up torch.distributed when launched by torchrun or by srun with several tasks.

    The ranks come from :func:`utils.launch_env` (torchrun's ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK``, or srun's ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``
    with the first host of the job's node list as the rendezvous). NCCL on CUDA (each
    process on GPU ``local_rank``), gloo on the CPU. ``device``: "auto" (CUDA when
    available), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    le = launch_env()
    if device == "cuda":
        n_gpus = torch.cuda.device_count()
        # srun may bind one GPU to each task (--gpus-per-task, --gpu-bind): then it is device 0
        index = 0 if (le.launcher == "srun" and n_gpus == 1) else le.local_rank
        if index >= n_gpus:
            raise UserError(
                f"local rank {le.local_rank} ({le.launcher}) has no GPU: this process sees {n_gpus}; "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if le.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if le.launcher == "srun":
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{le.master_addr}:{le.master_port}",
                rank=le.rank,
                world_size=le.world_size,
            )
        else:
            dist.init_process_group(backend=backend)
    info = DistInfo(
        rank=le.rank,
        world_size=le.world_size,
        local_rank=le.local_rank,
        device=dev,
        local_world_size=le.local_world_size,
    )
    if info.distributed:
        where = f" (rendezvous {le.master_addr}:{le.master_port})" if le.launcher == "srun" else ""
        logger.info("distributed (%s): rank %d of %d on %s%s", le.launcher, le.rank, le.world_size, dev, where)
    return info


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` for the length of a run. The process group is torn down at the
    end only when this call created it: a caller that set one up (a driver running several
    scripts' ``main`` in one torchrun) keeps it."""
    created = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    ok = False
    try:
        yield info
        ok = True
    finally:
        if created and dist.is_available() and dist.is_initialized():
            if ok:
                cleanup_distributed()
            else:
                dist.destroy_process_group()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``module`` when running with several processes."""
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a Python float across ranks (identity when not distributed)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------
# Seeds, schedules, parameter groups
# ---------------------------------------------------------------------------------------


def fix_random_seeds(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integers (epoch, rank, ...), stable across runs."""
    ss = np.random.SeedSequence([int(seed) % (2**63)] + [int(p) for p in parts])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 2**31]) % (2**63))


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up from ``start_warmup_value`` to ``base_value``
    over ``warmup_epochs``, then a half cosine from ``base_value`` to ``final_value``.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warm = (
        np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False) if warmup_iters > 0 else np.array([])
    )
    n = epochs * niter_per_ep - warmup_iters
    iters = np.arange(max(n, 0))
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    sched = np.concatenate((warm, cos))
    assert len(sched) == epochs * niter_per_ep, (len(sched), epochs, niter_per_ep)
    return sched


def param_groups(model: nn.Module, fixed_lr_prefixes: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Split parameters into groups with and without weight decay (biases and norm
    parameters, i.e. every tensor with one dimension, get none), and mark those whose
    name starts with one of ``fixed_lr_prefixes`` as ``fixed_lr`` (kept at the base lr).
    """
    fixed = tuple(fixed_lr_prefixes)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(".bias")
        is_fixed = bool(fixed) and name.startswith(fixed)
        buckets.setdefault((decay, is_fixed), []).append(p)
    return [
        {"params": ps, "apply_wd": decay, "fixed_lr": is_fixed, "weight_decay": 0.0}
        for (decay, is_fixed), ps in sorted(buckets.items())
    ]


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float | None, base_lr: float) -> None:
    """Set lr (``base_lr`` for fixed-lr groups) and weight decay (groups with ``apply_wd``)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr if g.get("fixed_lr") else lr
        if wd is not None:
            g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0


# ---------------------------------------------------------------------------------------
# AMP
# ---------------------------------------------------------------------------------------


class Amp:
    """Autocast and gradient scaling. fp16 uses a GradScaler (as the paper); bf16 does not.

    AMP is a CUDA feature here: on the CPU ``use_amp`` is refused with a warning in the log
    and the run stays in float32 (the numbers of a CPU run are then exact).
    """

    def __init__(self, device: torch.device, use_amp: bool, amp_dtype: str = "fp16"):
        if amp_dtype not in ("fp16", "bf16"):
            raise UserError(f"--amp_dtype must be fp16 or bf16, got {amp_dtype!r}")
        self.enabled = bool(use_amp) and device.type == "cuda"
        if use_amp and not self.enabled:
            logger.warning("--use_amp has no effect on the CPU; training in float32")
        self.device_type = device.type
        self.dtype = torch.float16 if amp_dtype == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


# ---------------------------------------------------------------------------------------
# Speed options shared by the training scripts
# ---------------------------------------------------------------------------------------

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


def add_speed_args(group: argparse._ArgumentGroup) -> None:
    """Precision and speed flags of every training script (pretraining and fine-tuning).

    ``--fused_optimizer``, ``--compile*`` and ``--check_every`` change nothing beyond rounding
    and may differ on ``--resume``; the precision flags are in the scripts' resume keys.
    """
    group.add_argument(
        "--use_amp",
        action="store_true",
        help="Mixed precision on CUDA (fp16 with a gradient scaler, as the paper). No effect on the CPU.",
    )
    group.add_argument(
        "--amp_dtype",
        type=str,
        default="fp16",
        choices=("fp16", "bf16"),
        help="Autocast dtype with --use_amp; bf16 needs no gradient scaler (Ampere GPUs and newer) "
        "and so avoids the scaler's host sync at every step.",
    )
    group.add_argument(
        "--fused_optimizer",
        action="store_true",
        help="Use the optimizer's fused kernel (torch.optim fused=True): one kernel for all "
        "parameters instead of one per tensor group. Same update up to rounding.",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward pass (a few minutes of compilation on the first "
        "steps, then faster steps on a GPU; on the CPU compilation alone takes minutes). Checkpoints "
        "are unchanged. Try it for long runs.",
    )
    group.add_argument(
        "--compile_backend",
        type=str,
        default="inductor",
        choices=COMPILE_BACKENDS,
        help="torch.compile backend: inductor generates kernels (the fast one); aot_eager / eager "
        "only trace the model (to check that --compile works, no speed-up).",
    )
    group.add_argument(
        "--compile_mode",
        type=str,
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode (inductor): max-autotune* search kernel configurations (longer "
        "compilation); reduce-overhead / max-autotune add CUDA graphs (not measured here).",
    )
    group.add_argument(
        "--check_every",
        type=int,
        default=20,
        help="Batches between two reads of the loss on the host (non-finite loss check, progress bar). "
        "Each read waits for the GPU; 1 reads every loss before its backward pass, so no step ever "
        "uses a non-finite loss. Either way a non-finite loss stops the run with exit code 1 "
        "before the epoch's checkpoint.",
    )


def check_speed_args(args: argparse.Namespace) -> None:
    if args.check_every < 1:
        raise UserError(f"--check_every must be at least 1, got {args.check_every}")


# ---------------------------------------------------------------------------------------
# Flags shared by the training scripts (pretraining and fine-tuning)
# ---------------------------------------------------------------------------------------

#: flags that define a run in every training script: a ``--resume`` with another value is
#: refused (each script adds its own, e.g. the IoU interval or the fine-tuning split)
COMMON_RESUME_KEYS = (
    "data_dir",
    "spatial_dims",
    "arch",
    "embedding_size",
    "crop_size",
    "low_resource_mode",
    "drop_path_rate",
    "use_gradient_checkpointing",
    "max_images",
    "batch_size",
    "accum_iters",
    "n_epochs",
    "base_lr",
    "end_lr",
    "warmup_epochs",
    "seed",
    "use_amp",
    "amp_dtype",
    "batch_augment",
)
#: values of resume keys that states saved before the key existed had implicitly
RESUME_KEY_DEFAULTS = {
    "batch_augment": False,
    "iou_sampler": "exact",
    "n_train_cases": 0,
    "drop_last": True,
    "slice_layout": "auto",
    "teacher_style": "dino",
    **{k: None for k in ("a_min", "a_max", "size_x", "size_y", "size_z")},
}

#: help texts of :func:`add_training_args`, in the pretraining scripts' words; main_finetune.py gives its own
#: for the flags that mean something else in fine-tuning (data_dir, crop_size, batch_size, ...)
_COMMON_HELP = {
    "data_dir": "Folder of preprocessed pretraining data, searched recursively: PNG slices (--spatial_dims 2, from "
    "preprocess_flare_unlabelled.py) or NIfTI volumes (3). Required.",
    "spatial_dims": "2: train on 2D slices (the paper); 3: on 3D volumes with cubic crops. Must match --data_dir.",
    "crop_size": "Side of each crop in pixels (96 in the paper). Swin needs a multiple of 32, UNETR a multiple of 16. "
    "Images smaller than this are zero-padded to it.",
    "max_images": "Use only the first N images of the sorted list (demos, tests); 0 = all.",
    "batch_augment": "Run the view augmentations on the training device as batched tensor operations "
    "(batch_augment.BatchViewAugment, same distributions as the MONAI chain) instead of per sample in "
    "the data workers. Use it on a GPU when the data workers cannot keep up (GPU idle between steps); "
    "on the CPU it brings little. It changes the random stream, so a run cannot be resumed with a "
    "different value.",
    "cache_images": "Decode every 2D slice once at start-up and keep it in memory as stored (uint8, or uint16 for 16-bit "
    "PNGs); the workers then skip PNG decoding. Needs X*Y bytes per slice and process (twice that for "
    "16-bit PNGs; on every rank): 8.75 GB per 100k slices of 350 x 250 pixels; the size is read from the "
    "PNG headers first and a cache that would not fit in the available memory is refused before "
    "decoding. Use it when PNG decoding limits the workers; the numbers do not change. 2D only.",
    "arch": "Encoder: 'swin' = Swin-UNETR's SwinTransformer (the paper); 'unetr' = UNETR's ViT.",
    "embedding_size": "Swin embedding size C (48 in the paper; the representation has 16*C values). Must be a "
    "multiple of 12. For UNETR the ViT hidden size is 16*C.",
    "drop_path_rate": "Stochastic depth rate of the Swin encoder (0.1 in the paper's pretraining).",
    "use_gradient_checkpointing": "Recompute Swin activations in the backward pass: less GPU memory, about 30%% slower "
    "(large 3D crops). Swin only.",
    "low_resource_mode": "Tiny model for tests and CPU demos: embedding 12, Swin heads (3, 3, 3, 3), batch size at "
    "most 4, and smaller projection heads (see the method's flags).",
    "batch_size": "Images per process and per backward pass (the effective batch is batch_size x accum_iters x number "
    "of processes). 128 in the paper.",
    "n_epochs": "Epochs of pretraining (100 in the paper).",
    "base_lr": "Peak learning rate, used as given (no scaling with the batch size).",
    "end_lr": "Learning rate at the end of the cosine schedule.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up from 0 before the cosine decay.",
    "accum_iters": "Backward passes accumulated per optimizer step (a larger effective batch on a small GPU). "
    "Pretraining skips the last incomplete step of an epoch; fine-tuning trains on it (a step of fewer backward "
    "passes, its loss the mean over them) unless --drop_last.",
    "seed": "Random seed (the paper's: 4294967295; its second seed is 381122412).",
    "run_name": "Name of the run; its files are <chkpt_dir>/<run_name>.pt, _last.pt, _log.jsonl, _args.json and _files/.",
    "chkpt_dir": "Folder for every file the run writes (default: the project's runs/ folder).",
    "resume": "Continue an interrupted run: alone, from this run's <run_name>_last.pt; with a path, from that file. The "
    "flags that define the run must be unchanged.",
    "use_wandb": "Also log every epoch to Weights & Biases (works offline with WANDB_MODE=offline).",
    "wandb_project": "W&B project name.",
    "progress": "Show tqdm progress bars (--no-progress for batch jobs).",
    "device": "'auto' uses CUDA when available. Several GPUs: launch with torchrun or srun (one task per GPU).",
    "num_workers": "Data-loading processes per GPU; -1 times a few batches with 0, 2, 4, ... workers and keeps the "
    "fastest. The crops depend on it (each worker has its own random stream): keep it fixed to "
    "reproduce or resume a run exactly.",
    "slice_layout": "How the 2D slices of --data_dir lie on disk: ioupos (this project's preprocess_flare_*.py: "
    "<case>_<zzzz>.png, manifest.json) or original (the original code's scripts: <stem>_<i>.png, each PNG the raw "
    "(X, Y) array); auto recognises the original's names (<stem>_0.png ...). Pass it only if auto guesses wrong.",
    "preprocessing_flags": "The data are preprocessed already (preprocess_flare_*.py): a value given here must equal "
    "the one recorded in --data_dir's manifest.json (a mismatch is refused); for a folder without one (the "
    "original's preprocessing) it states how the data were made (voxel size of the scores, the model's "
    "preprocessing record); only 3D fine-tuning, which preprocesses raw NIfTI on the fly, applies it. Default: "
    "the recorded value, else the paper's.",
}

#: The original's preprocessing flags on the training scripts and what each sets.
PREPROCESSING_FLAG_HELP = {
    "a_min": "Lower end of the HU window (mapped to 0; the paper's -500).",
    "a_max": "Upper end of the HU window (mapped to 1; the paper's 500).",
    "size_x": "Voxel size along x in mm (the paper's 1.0).",
    "size_y": "Voxel size along y in mm (the paper's 1.0).",
    "size_z": "Slice spacing along z in mm (the paper's 2.5).",
}
#: The paper's preprocessing, in the flags' names.
PAPER_PREPROCESSING = {"a_min": -500.0, "a_max": 500.0, "size_x": 1.0, "size_y": 1.0, "size_z": 2.5}


def preprocessing_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``{"a_min", "a_max", "pixdim": [x, y, z]}`` from ``--a_min ... --size_z``, the paper's
    value for each flag not given.

    Raises:
        UserError: ``--a_max`` not above ``--a_min``, or a voxel size that is not positive.
    """
    v = {
        k: float(getattr(args, k)) if getattr(args, k, None) is not None else d for k, d in PAPER_PREPROCESSING.items()
    }
    if not v["a_max"] > v["a_min"]:
        raise UserError(f"--a_max ({v['a_max']:g}) must be greater than --a_min ({v['a_min']:g})")
    for k in ("size_x", "size_y", "size_z"):
        if not v[k] > 0:
            raise UserError(f"--{k} must be a positive voxel size in mm, got {v[k]:g}")
    return {"a_min": v["a_min"], "a_max": v["a_max"], "pixdim": [v["size_x"], v["size_y"], v["size_z"]]}


def check_preprocessing_flags(args: argparse.Namespace, recorded: dict[str, Any], where: str) -> None:
    """Refuse a given ``--a_min ... --size_z`` that differs from the preprocessing ``recorded``
    for the data (a ``manifest.json``'s ``args``: ``a_min``, ``a_max``, ``pixdim`` [x, y, z]).

    Raises:
        UserError: one line naming the flag, both values and ``where``.
    """
    pix = list(recorded.get("pixdim") or [None, None, None])
    have = {"a_min": recorded.get("a_min"), "a_max": recorded.get("a_max"), "size_x": pix[0], "size_y": pix[1]}
    have["size_z"] = pix[2]
    for k in PAPER_PREPROCESSING:
        given = getattr(args, k, None)
        if given is None or have[k] is None:
            continue
        if not math.isclose(float(given), float(have[k]), rel_tol=1e-9, abs_tol=1e-9):
            raise UserError(
                f"--{k} {float(given):g} differs from the {float(have[k]):g} that {where} records: the data were "
                f"preprocessed with {k} {float(have[k]):g}; omit --{k}, or preprocess the data again with it"
            )


def add_training_args(
    parser: argparse.ArgumentParser,
    defaults: dict[str, Any],
    helps: dict[str, str] | None = None,
    batch_size_aliases: tuple[str, ...] = (),
) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags every training script shares, in groups; return the groups by name
    ("data", "model", "optim", "run", "hardware") so a script can add its own flags to them.

    Args:
        defaults: the script's defaults for ``num_workers``, ``embedding_size``,
            ``drop_path_rate``, ``batch_size``, ``n_epochs``, ``base_lr``, ``end_lr``,
            ``warmup_epochs`` and ``wandb_project`` (they differ between pretraining and
            fine-tuning); a default that appears in the help text is added to it.
        helps: help texts that replace the shared ones where a flag means more in a script
            (e.g. what ``--data_dir`` holds).
        batch_size_aliases: other names of ``--batch_size`` (the original DINO script's
            ``--batch_size_per_gpu``).
    """
    text = {**_COMMON_HELP, **(helps or {})}
    d = defaults

    g_data = parser.add_argument_group("data")
    g_data.add_argument("--data_dir", type=str, default=None, help=text["data_dir"])
    g_data.add_argument("--spatial_dims", type=int, default=2, choices=(2, 3), help=text["spatial_dims"])
    g_data.add_argument("--crop_size", type=int, default=96, help=text["crop_size"])
    g_data.add_argument("--max_images", type=int, default=0, help=text["max_images"])
    g_data.add_argument("--batch_augment", action="store_true", help=text["batch_augment"])
    g_data.add_argument("--cache_images", action="store_true", help=text["cache_images"])
    g_data.add_argument(
        "--slice_layout", type=str, default="auto", choices=("auto", *SLICE_LAYOUTS), help=text["slice_layout"]
    )
    g_pre = parser.add_argument_group(
        "preprocessing (the original's flags: checked against the data's manifest.json, or, where nothing "
        "records it, taken as how the data were preprocessed)"
    )
    for flag, what in PREPROCESSING_FLAG_HELP.items():
        g_pre.add_argument(f"--{flag}", type=float, default=None, help=f"{what} {text['preprocessing_flags']}")

    g_model = parser.add_argument_group("model")
    g_model.add_argument("--arch", type=str, default="swin", choices=ARCHS, help=text["arch"])
    g_model.add_argument("--embedding_size", type=int, default=d["embedding_size"], help=text["embedding_size"])
    g_model.add_argument("--drop_path_rate", type=float, default=d["drop_path_rate"], help=text["drop_path_rate"])
    g_model.add_argument("--use_gradient_checkpointing", action="store_true", help=text["use_gradient_checkpointing"])
    g_model.add_argument("--low_resource_mode", action="store_true", help=text["low_resource_mode"])

    g_opt = parser.add_argument_group("optimisation")
    g_opt.add_argument(
        "--batch_size",
        *batch_size_aliases,
        dest="batch_size",
        type=int,
        default=d["batch_size"],
        help=text["batch_size"],
    )
    g_opt.add_argument("--n_epochs", type=int, default=d["n_epochs"], help=text["n_epochs"])
    g_opt.add_argument("--base_lr", type=float, default=d["base_lr"], help=text["base_lr"])
    g_opt.add_argument("--end_lr", type=float, default=d["end_lr"], help=text["end_lr"])
    g_opt.add_argument("--warmup_epochs", type=int, default=d["warmup_epochs"], help=text["warmup_epochs"])
    g_opt.add_argument("--accum_iters", type=int, default=1, help=text["accum_iters"])

    g_run = parser.add_argument_group("run")
    g_run.add_argument("--run_name", type=str, default=None, help=text["run_name"])
    g_run.add_argument("--chkpt_dir", type=str, default=DEFAULT_CHKPT_DIR, help=text["chkpt_dir"])
    g_run.add_argument("--resume", type=str, nargs="?", const="auto", default=None, help=text["resume"])
    g_run.add_argument("--seed", type=int, default=4294967295, help=text["seed"])
    g_run.add_argument("--use_wandb", action="store_true", help=text["use_wandb"])
    g_run.add_argument("--wandb_project", type=str, default=d["wandb_project"], help=text["wandb_project"])
    g_run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=text["progress"])

    g_hw = parser.add_argument_group("hardware")
    g_hw.add_argument("--device", type=str, default="auto", choices=("auto", "cpu", "cuda"), help=text["device"])
    g_hw.add_argument("--num_workers", type=int, default=d["num_workers"], help=text["num_workers"])
    add_speed_args(g_hw)
    return {"data": g_data, "model": g_model, "optim": g_opt, "run": g_run, "hardware": g_hw}


def check_training_args(args: argparse.Namespace, min_crop_windows: int = 1) -> None:
    """Refuse bad values of the shared flags with one line each (UserError).

    ``min_crop_windows``: the smallest crop, in multiples of the encoder's size unit (32 for
    Swin, 16 for UNETR); fine-tuning needs 2 (at one unit Swin-UNETR's bottleneck is one
    voxel, which its InstanceNorm cannot train on).
    """
    if not args.data_dir:
        raise UserError("--data_dir is required (a folder of preprocessed data)")
    unit = 32 if args.arch == "swin" else 16
    least = unit * min_crop_windows
    if args.crop_size < least or args.crop_size % unit:
        why = " (at 32 its bottleneck is one voxel, which its InstanceNorm cannot train on)" if least == 64 else ""
        net = "Swin-UNETR" if args.arch == "swin" else "UNETR"
        raise UserError(f"--crop_size {args.crop_size}: {net} needs a multiple of {unit} of at least {least}{why}")
    if args.embedding_size <= 0 or args.embedding_size % 12:
        raise UserError(f"--embedding_size must be a positive multiple of 12, got {args.embedding_size}")
    for name in ("batch_size", "n_epochs", "accum_iters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_epochs <= args.n_epochs:
        raise UserError(
            f"--warmup_epochs must lie in [0, --n_epochs={args.n_epochs}], got {args.warmup_epochs}; "
            f"lower it for short runs"
        )
    if not (args.base_lr >= 0 and args.end_lr >= 0):
        raise UserError(f"--base_lr and --end_lr must not be negative, got {args.base_lr} and {args.end_lr}")
    if args.max_images < 0:
        raise UserError(f"--max_images must be 0 (all) or positive, got {args.max_images}")
    if not 0.0 <= args.drop_path_rate < 1.0:
        raise UserError(f"--drop_path_rate must lie in [0, 1), got {args.drop_path_rate}")
    if args.num_workers < -1:
        raise UserError(f"--num_workers must be -1 (measure) or at least 0, got {args.num_workers}")
    if args.use_gradient_checkpointing and args.arch != "swin":
        raise UserError("--use_gradient_checkpointing is only available with --arch swin")
    if args.cache_images and args.spatial_dims != 2:
        raise UserError("--cache_images keeps decoded 2D slices in memory; it is not available with --spatial_dims 3")
    preprocessing_from_flags(args)  # refuses an empty HU window or a voxel size that is not positive
    check_speed_args(args)


def make_optimizer(
    cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], fused: bool, **kwargs: Any
) -> torch.optim.Optimizer:
    """``cls(groups, **kwargs)``, with its fused implementation when ``fused`` (``--fused_optimizer``)."""
    if fused:
        kwargs["fused"] = True
    try:
        return cls(groups, **kwargs)
    except RuntimeError as e:  # e.g. a device without a fused kernel
        raise UserError(f"--fused_optimizer: {cls.__name__} has no fused kernel here ({e})") from None


def maybe_compile(module: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``torch.compile(module)`` with ``--compile``; the module itself otherwise.

    Only the training forward pass goes through the compiled wrapper; state dicts are read
    from the original module, so checkpoints do not change (no ``_orig_mod.`` prefix).
    Shapes are static: pretraining drops the last incomplete batch; fine-tuning keeps it (as
    the original), so a second graph is compiled once for its smaller batch and both are kept.
    """
    if not getattr(args, "compile", False):
        return module
    kwargs: dict[str, Any] = {"backend": args.compile_backend, "dynamic": False}
    if args.compile_backend == "inductor":
        kwargs["mode"] = args.compile_mode
    logger.info(
        "torch.compile of %s (%s); the first steps compile",
        type(module).__name__,
        ", ".join(f"{k}={v}" for k, v in kwargs.items()),
    )
    return torch.compile(module, **kwargs)


# ---------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------


def build_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    info: DistInfo,
    shuffle: bool = True,
    drop_last: bool = True,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
):
    """A MONAI DataLoader whose whole randomness is a function of (seed, epoch, rank).

    Shuffling uses a generator seeded from (seed, epoch) (or a DistributedSampler with
    that seed and epoch); MONAI seeds every Randomizable transform of every worker from
    the same generator, so an epoch can be replayed exactly after a resume.
    """
    g = torch.Generator()
    g.manual_seed(derived_seed(seed, epoch, info.rank))
    sampler = None
    if info.distributed:
        sampler = DistributedSampler(
            dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=shuffle,
            seed=int(seed) % (2**31),
            drop_last=drop_last,
        )
        sampler.set_epoch(epoch)
        shuffle = False
    kwargs = {}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=g,
        pin_memory=pin_memory,
        **kwargs,
    )


def pick_num_workers(dataset, batch_size: int, n_batches: int = 4) -> int:
    """``--num_workers -1``: time a few batches with 0, 2, 4, ... workers and keep the fastest."""
    candidates = sorted({0, *range(2, (os.cpu_count() or 1) + 1, 2)})
    best, best_t = 0, float("inf")
    for n in candidates:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=n)
        t0 = time.perf_counter()
        for i, _ in enumerate(loader):
            if i + 1 >= n_batches:
                break
        dt = time.perf_counter() - t0
        logger.info("--num_workers -1: %d workers load %d batches in %.2f s", n, n_batches, dt)
        if dt < best_t:
            best, best_t = n, dt
    logger.info("--num_workers -1: using %d workers", best)
    return best


def resolve_num_workers(requested: int, state: dict[str, Any] | None, dataset, batch_size: int) -> int:
    """The data workers of a run: ``--num_workers``, or with -1 the measured count
    (:func:`pick_num_workers`; a resumed run keeps the count it measured). Resuming with
    another count than the run started with is allowed but logged: the crops then differ
    from an uninterrupted run's (each worker has its own random stream)."""
    saved = state.get("num_workers") if state is not None else None
    if requested == -1 and saved is not None:
        return int(saved)
    n = pick_num_workers(dataset, batch_size) if requested == -1 else requested
    if saved is not None and int(saved) != n:
        logger.warning(
            "resuming with %d data workers, the run started with %d: the remaining epochs see other random crops "
            "than an uninterrupted run would",
            n,
            int(saved),
        )
    return n


# ---------------------------------------------------------------------------------------
# One epoch of training
# ---------------------------------------------------------------------------------------


class Averages:
    """Running means of named scalars (Python numbers)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class LossCheck:
    """The host's view of the per-batch losses, read every ``check_every`` batches.

    Reading a CUDA tensor on the host (``.item()``) waits for the GPU, so the CPU cannot
    queue the next step's kernels while the GPU works. Here the losses (and the scalars a
    loss function returns as tensors) stay on the device until ``check_every`` batches are
    pending; then one stacked copy (and, when distributed, one all-reduce) brings them to
    the host, adds them to the averages and stops the run at the first non-finite loss.

    ``check_every=1`` reads every loss before its backward pass, so the weights never see a
    non-finite loss. With N > 1 up to N - 1 steps may have run on it before the check;
    nothing of them is saved (the last good checkpoint is that of the previous epoch), so
    the outcome is the same: the run stops with exit code 1 and its last good checkpoint.
    """

    def __init__(self, check_every: int, info: DistInfo, epoch: int):
        if check_every < 1:
            raise UserError(f"--check_every must be at least 1, got {check_every}")
        self.check_every = int(check_every)
        self.info = info
        self.epoch = epoch
        self.avg = Averages()
        self.pending: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
        self.last_loss = float("nan")

    def add(self, it: int, loss: torch.Tensor, logs: dict[str, Any]) -> bool:
        """Queue one batch's loss (and logs); read them when ``check_every`` batches are
        pending. Returns whether this call read them (``last_loss`` is then new)."""
        self.pending.append((it, loss.detach().float().reshape(()), logs))
        if len(self.pending) >= self.check_every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Bring the pending losses to the host; raise TrainingError at a non-finite one."""
        if not self.pending:
            return
        losses = torch.stack([loss for _, loss, _ in self.pending])
        if self.info.distributed:
            dist.all_reduce(losses)
            losses = losses / self.info.world_size
        values = losses.tolist()
        keys = sorted({k for _, _, logs in self.pending for k in logs})
        tensor_keys = [k for k in keys if any(isinstance(logs.get(k), torch.Tensor) for _, _, logs in self.pending)]
        log_values: dict[str, list[float]] = {}
        if tensor_keys:
            stacked = torch.stack(
                [
                    torch.as_tensor(logs[k], dtype=torch.float32, device=losses.device).reshape(())
                    for k in tensor_keys
                    for _, _, logs in self.pending
                ]
            )
            flat = stacked.tolist()
            n = len(self.pending)
            log_values = {k: flat[i * n : (i + 1) * n] for i, k in enumerate(tensor_keys)}
        for j, ((it, _, logs), value) in enumerate(zip(self.pending, values)):
            if not math.isfinite(value):
                self.pending = []
                late = (
                    ""
                    if self.check_every == 1
                    else (
                        f" (losses are read every {self.check_every} batches, --check_every; the steps since are not saved)"
                    )
                )
                raise TrainingError(
                    f"loss is {value} at epoch {self.epoch + 1}, iteration {it}; stopping{late} "
                    f"(the last good checkpoint is kept; lower the learning rate or try --amp_dtype bf16)"
                )
            row = {k: (log_values[k][j] if k in log_values else v) for k, v in logs.items()}
            self.avg.update(loss=value, **row)
            self.last_loss = value
        self.pending = []


def clip_gradients(model: nn.Module, max_norm: float, mode: str = "global") -> None:
    """Clip gradients: "global" scales all of them so that their joint L2 norm is at most
    ``max_norm`` (``clip_grad_norm_``); "per_param" scales each parameter's gradient to a
    norm of at most ``max_norm`` on its own, as DINO's reference code does.
    """
    if mode == "global":
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    elif mode == "per_param":
        for p in model.parameters():
            if p.grad is not None:
                norm = p.grad.detach().norm(2)
                p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    else:
        raise ValueError(f"clip mode must be 'global' or 'per_param', got {mode!r}")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    *,
    epoch: int,
    n_epochs: int,
    iters_per_epoch: int,
    lr_schedule: np.ndarray,
    base_lr: float,
    wd_schedule: np.ndarray | None = None,
    amp: Amp,
    accum_iters: int = 1,
    clip_grad: float = 0.0,
    clip_mode: str = "global",
    before_optimizer_step: Callable[[int], None] | None = None,
    after_optimizer_step: Callable[[int], None] | None = None,
    info: DistInfo = DistInfo(),
    progress: bool = True,
    check_every: int = 1,
    n_batches: int | None = None,
) -> dict[str, float]:
    """Train for one epoch of ``iters_per_epoch`` optimizer steps; return the averages.

    ``loss_fn(batch)`` runs the forward pass (inside autocast) and returns the loss and a
    dict of scalars to average. Each optimizer step accumulates ``accum_iters`` batches.
    ``n_batches`` (default ``iters_per_epoch * accum_iters``): the batches of the epoch to
    train on; batches after them are skipped (pretraining: those that would not complete a
    step, like the last incomplete batch). Fine-tuning passes every batch of its loader,
    the last incomplete one included (``iters_per_epoch = ceil(n_batches / accum_iters)``):
    a last step of fewer than ``accum_iters`` batches averages the ones it has. Learning
    rate and weight decay follow the per-iteration
    schedules (index ``epoch * iters_per_epoch + step``). ``clip_grad`` > 0 clips the
    gradients before each step (``clip_mode``: see :func:`clip_gradients`). A non-finite loss stops the run
    (TrainingError, exit code 1); the losses and the logs returned as tensors are read on the
    host every ``check_every`` batches (:class:`LossCheck`; 1 = before each backward pass).
    """
    model.train()
    check = LossCheck(check_every, info, epoch)
    if n_batches is None:
        n_batches = iters_per_epoch * accum_iters
    if math.ceil(n_batches / accum_iters) != iters_per_epoch:
        raise ValueError(f"{n_batches} batches in steps of {accum_iters} are not {iters_per_epoch} steps")
    it0 = epoch * iters_per_epoch
    bar = tqdm(
        total=iters_per_epoch,
        desc=f"epoch {epoch + 1}/{n_epochs}",
        disable=not (progress and info.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    optimizer.zero_grad(set_to_none=True)
    with surface_user_errors():  # a corrupt file read by a data worker: its one line, not a traceback
        for b, batch in enumerate(loader):
            if b >= n_batches:
                break
            step, micro = divmod(b, accum_iters)
            in_step = min(accum_iters, n_batches - step * accum_iters)  # fewer in a last partial step
            it = it0 + step
            if micro == 0:
                wd = float(wd_schedule[it]) if wd_schedule is not None else None
                apply_schedules(optimizer, float(lr_schedule[it]), wd, base_lr)
            last_micro = micro == in_step - 1
            sync = contextlib.nullcontext()
            if info.distributed and not last_micro and hasattr(model, "no_sync"):
                sync = model.no_sync()
            with sync:
                with amp.autocast():
                    loss, logs = loss_fn(batch)
                read = check.add(it, loss, logs)  # with check_every=1: read (and maybe stop) before the backward pass
                amp.backward(loss / in_step)
            if not last_micro:
                continue
            if clip_grad > 0:
                amp.unscale(optimizer)
                clip_gradients(model, clip_grad, clip_mode)
            if before_optimizer_step is not None:
                before_optimizer_step(it)
            amp.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if after_optimizer_step is not None:
                after_optimizer_step(it)
            bar.update(1)
            if read:
                bar.set_postfix(loss=f"{check.last_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    check.flush()
    bar.close()
    out = check.avg.means()
    out["lr"] = float(lr_schedule[min(it0 + iters_per_epoch - 1, len(lr_schedule) - 1)])
    if wd_schedule is not None:
        out["wd"] = float(wd_schedule[min(it0 + iters_per_epoch - 1, len(wd_schedule) - 1)])
    return {k: all_reduce_mean(v, info) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# Run files, checkpoints, resume
# ---------------------------------------------------------------------------------------


def run_paths(chkpt_dir: str, run_name: str) -> dict[str, str]:
    """Every file a run writes, all in ``chkpt_dir`` and named after the run.

    weights: ``<run>.pt`` (pretrained encoder, or best fine-tuned model); last: ``<run>_last.pt``
    (full training state, for ``--resume``); log: ``<run>_log.jsonl`` (one JSON line per
    epoch); args: ``<run>_args.json``; dir: ``<run>_files/`` for anything else (scores,
    figures, predictions).
    """
    if not run_name or os.sep in run_name:
        raise UserError(f"--run_name must be a plain file name, got {run_name!r}")
    base = os.path.join(os.path.abspath(chkpt_dir), run_name)
    return {
        "chkpt_dir": os.path.abspath(chkpt_dir),
        "weights": base + ".pt",
        "last": base + "_last.pt",
        "log": base + "_log.jsonl",
        "args": base + "_args.json",
        "dir": base + "_files",
    }


def prepare_run_dir(paths: dict[str, str], resume: bool, info: DistInfo) -> None:
    """Create the checkpoint folder and check that it can be written (at start-up, not after the
    first epoch); refuse to overwrite an existing run unless resuming. A run exists when it
    saved a training state or logged an epoch; its weights file alone (a kill before the
    first state) does not count.
    """
    if not info.is_main:
        return
    prepare_output_dir(paths["chkpt_dir"], "--chkpt_dir")
    if not resume and any(os.path.exists(paths[k]) for k in ("last", "log")):
        raise UserError(
            f"run {os.path.basename(paths['weights'])[:-3]!r} already exists in {paths['chkpt_dir']!r}; "
            f"pass --resume to continue it, or choose another --run_name"
        )


def resolve_resume(resume: str | None, paths: dict[str, str]) -> str | None:
    """The training state ``--resume`` points to: None (no resume), this run's
    ``<run>_last.pt`` for ``--resume`` alone ("auto"), or the given path. ``--resume`` alone
    on a run that never saved a state (killed before its first epoch ended, or not started)
    gives None: the run starts from the beginning, with a warning.

    Raises:
        UserError: a given path does not exist.
    """
    if resume is None:
        return None
    path = paths["last"] if resume == "auto" else os.path.abspath(resume)
    if resume == "auto" and not os.path.isfile(path):
        logger.warning("--resume: %s does not exist (no epoch was saved); the run starts from the beginning", path)
        return None
    if not os.path.isfile(path):
        raise UserError(f"--resume: {path!r} does not exist")
    return path


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable objects."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[1], tuple(py[0]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str, state: dict[str, Any], info: DistInfo) -> None:
    """Write the full training state atomically (rank 0 only)."""
    if not info.is_main:
        return
    atomic_torch_save({"format": STATE_FORMAT, **state}, path)


def load_training_state(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``<run>_last.pt`` written by :func:`save_training_state` (weights_only)."""
    state = torch_load(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {path!r} is not a training state of this project (expected format {STATE_FORMAT!r})")
    return state


def check_resume_args(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str], path: str) -> None:
    """Refuse to resume with model / method args that differ from the saved run's."""
    diffs = [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if _jsonish(saved.get(k)) != _jsonish(current.get(k))
    ]
    if diffs:
        raise UserError(
            f"cannot resume {path!r} with different arguments ({'; '.join(diffs)}); start a new --run_name instead"
        )


def _jsonish(v: Any) -> Any:
    return json.loads(json.dumps(v)) if v is not None else None


def args_dict(args) -> dict[str, Any]:
    """``vars(args)`` made JSON- and weights_only-safe (tuples as lists)."""
    return json.loads(json.dumps(vars(args), default=str))


# ---------------------------------------------------------------------------------------
# Logging: JSON lines and wandb
# ---------------------------------------------------------------------------------------


class EpochLogger:
    """One JSON line per epoch in ``<run>_log.jsonl``, and the same to wandb when enabled."""

    def __init__(
        self,
        paths: dict[str, str],
        info: DistInfo,
        use_wandb: bool = False,
        wandb_project: str = "",
        args: dict | None = None,
        wandb_id: str | None = None,
    ):
        self.paths = paths
        self.info = info
        self.wandb_run = None
        if use_wandb and info.is_main:
            try:
                # imported here: wandb is heavy and only --use_wandb needs it
                import wandb  # noqa: PLC0415
            except ImportError:  # pragma: no cover - wandb is in requirements.txt
                raise UserError("--use_wandb needs the wandb package (pip install wandb)") from None
            self.wandb_run = wandb.init(
                project=wandb_project,
                name=os.path.basename(paths["weights"])[:-3],
                id=wandb_id,
                resume="allow",
                config=args or {},
                dir=paths["chkpt_dir"],
            )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        append_jsonl_atomic(self.paths["log"], record)
        if self.wandb_run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb_run.log(flat, step=int(record.get("epoch", 0)))

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_log(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (``[]`` when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def truncate_log(path: str, n_epochs_done: int) -> list[dict[str, Any]]:
    """After a resume, drop log lines of epochs that will be redone; returns the records kept
    (``[]`` when the file does not exist).

    Records carry ``"epoch"``: the 1-based number of the epoch they describe; lines with
    ``epoch > n_epochs_done`` were written after the checkpoint being resumed.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [(ln, rec) for ln in lines if (rec := json.loads(ln)).get("epoch", 0) <= n_epochs_done]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(ln for ln, _ in keep))
    return [rec for _, rec in keep]


def write_args(paths: dict[str, str], args_d: dict[str, Any], info: DistInfo) -> None:
    if info.is_main:
        atomic_write_json(paths["args"], args_d)


class RunFiles:
    """The files of one training run and the one protocol that keeps them resumable.

    Pretraining and fine-tuning both go through it. At the end of every epoch a run
    writes, in this order: its weights (``<run>.pt``, by the caller), the full training
    state ``<run>_last.pt`` (which holds the epoch's log record and the fingerprints of the
    run's inputs), then that record as a line of ``<run>_log.jsonl`` (each file atomically).
    The state decides what exists: a run killed before its first state was saved has not
    started (a plain rerun, or ``--resume``, starts it afresh), and ``--resume`` makes the log
    agree with the state (lines of epochs after it dropped; its record appended when the kill
    came between the two writes). Temporary files of killed writes are removed at start-up.

    What a run is made of is pinned: :meth:`pin_inputs` records fingerprints of the inputs
    that define it (the data folder's manifest and listing, the split's contents, the
    checkpoint it started from) and refuses a resume where one of them changed::

        run = RunFiles(args.chkpt_dir, args.run_name, "finetune", info)
        state = run.open(args.resume, args_dict(args), resume_keys, inputs={"--data_dir": ...})  # None: a new run
        run.pin_inputs(state, {"data folder": ..., "split": ...})
        ...
        run.end_epoch({"epoch": epoch + 1, ...}, record, epoch_logger)
    """

    def __init__(self, chkpt_dir: str, run_name: str, method: str, info: DistInfo):
        self.paths = run_paths(chkpt_dir, run_name)
        self.method = method
        self.info = info
        self.resume_path: str | None = None
        self.inputs: dict[str, str] = {}

    def output_locations(self) -> dict[str, str]:
        """``{description: path}`` of everything the run writes (for :func:`utils.check_outputs_apart`)."""
        return {
            "the run file": self.paths["weights"],
            "the run's state": self.paths["last"],
            "the run's log": self.paths["log"],
            "the run's arguments": self.paths["args"],
            "the run's folder": self.paths["dir"],
        }

    def open(
        self,
        resume: str | None,
        args_d: dict[str, Any],
        resume_keys: Iterable[str],
        inputs: dict[str, str | None] | None = None,
    ) -> dict[str, Any] | None:
        """Check the run folder; with ``--resume`` load the saved state, check that it is a
        state of this method saved with the same ``resume_keys``, and return it.

        Args:
            inputs: ``{flag: path}`` of what the run reads; no run file may be one of them,
                lie inside one (a data folder) or contain one.

        Raises:
            UserError: the state is foreign or was saved with other flags; a given ``--resume``
                path is missing; the run exists and ``--resume`` was not given; a run file
                overlaps an input; the folder cannot be created or written.
        """
        check_outputs_apart(self.output_locations(), inputs or {})
        self.resume_path = resolve_resume(resume, self.paths)
        state = None
        if self.resume_path is not None:
            state = load_training_state(self.resume_path)
            if state.get("method") != self.method:
                raise UserError(
                    f"--resume {self.resume_path!r} is a {state.get('method')!r} run, "
                    f"not a {self.method!r} one (not a training state of this script)"
                )
            check_resume_args({**RESUME_KEY_DEFAULTS, **state["args"]}, args_d, resume_keys, self.resume_path)
        prepare_run_dir(self.paths, resume=resume is not None, info=self.info)
        if self.info.is_main:
            self._remove_leftovers(started=state is not None)
        return state

    def _remove_leftovers(self, started: bool) -> None:
        """Temporary files of killed atomic writes of this run's files; and, for a run that
        never saved a state, log lines of epochs that are redone from the start."""
        removed = [t for k in ("weights", "last", "log", "args") for t in remove_stale_temporaries(self.paths[k])]
        if os.path.isdir(self.paths["dir"]):
            for n in os.listdir(self.paths["dir"]):
                if n.startswith(".") and n.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.paths["dir"], n))
                        removed.append(os.path.join(self.paths["dir"], n))
        if removed:
            logger.info("removed %d temporary file(s) of interrupted writes: %s", len(removed), ", ".join(removed))
        if not started:
            truncate_log(self.paths["log"], 0)

    def pin_inputs(self, state: dict[str, Any] | None, fingerprints: dict[str, str | None]) -> None:
        """Record what defines the run (``{what: fingerprint}``, e.g. ``{"data folder --data_dir
        D": "1,234 files, sha256 ..."}``; None entries are skipped) for every state it saves,
        and on a resume refuse inputs that changed since the state was saved.

        A state saved before fingerprints existed is resumed with a warning.

        Raises:
            UserError: an input differs from the recorded one (one line naming it).
        """
        self.inputs = {k: v for k, v in fingerprints.items() if v is not None}
        if state is None:
            return
        saved = state.get("inputs")
        if saved is None:
            logger.warning("%s records no fingerprints of its inputs (an older version); not checked", self.resume_path)
            return
        for what, now in self.inputs.items():
            before = saved.get(what)
            if before is not None and before != now:
                raise UserError(
                    f"cannot resume {self.resume_path!r}: the {what} changed since the run started "
                    f"(was {before}, now {now}); restore it or start a new --run_name"
                )

    def restore_log(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """After loading ``state``: make the log hold exactly the records of its epochs (rank 0).
        Returns the state's record of its last epoch (None if it has none), on every rank."""
        # "last_record": the name in states of older versions
        record = state.get("record", state.get("last_record"))
        if self.info.is_main:
            repair_log(self.paths["log"], int(state["epoch"]), record)
        return record

    def end_epoch(self, state: dict[str, Any], record: dict[str, Any], epoch_logger: "EpochLogger") -> None:
        """Save the full state (with ``record`` and the inputs' fingerprints in it), then log ``record``."""
        full = {"method": self.method, **state, "record": record, "inputs": dict(self.inputs)}
        save_training_state(self.paths["last"], full, self.info)
        epoch_logger.log(record)

    def write_result(self, result: dict[str, Any]) -> None:
        """``<run>_files/result.json`` (written last: the run is finished)."""
        if self.info.is_main:
            atomic_write_json(os.path.join(self.paths["dir"], "result.json"), result)


def repair_log(path: str, epochs_done: int, record: dict[str, Any] | None) -> None:
    """Make the log of a resumed run hold the records of its ``epochs_done`` epochs: lines of
    later epochs dropped; ``record`` (the last saved epoch's, from the state) appended
    when the kill came between saving the state and writing its line."""
    logged = [r.get("epoch", 0) for r in truncate_log(path, epochs_done)]
    if record is not None and int(record.get("epoch", 0)) == epochs_done and epochs_done not in logged:
        append_jsonl_atomic(path, record)

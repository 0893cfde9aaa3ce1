"""What every ``main_*.py`` shares: distributed set-up, seeding, schedules, parameter
groups, AMP, the training loop of one epoch, data loaders, checkpoints and logging.

A training script is a sequence of named phases built from these pieces::

    dist_info = init_distributed()                      # torchrun or a single process
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
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils import TrainingError, UserError, append_jsonl, atomic_torch_save, atomic_write_json

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
    local_world_size: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Set up torch.distributed when launched by torchrun (RANK / WORLD_SIZE set).

    NCCL on CUDA, gloo on the CPU. ``device``: "auto" (CUDA when available), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, local_world_size=local_world)
    if info.distributed:
        logger.info("distributed: rank %d of %d on %s", rank, world, dev)
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    warm = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False) if warmup_iters > 0 else np.array([])
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
    group.add_argument("--use_amp", action="store_true",
                       help="Mixed precision on CUDA (fp16 with a gradient scaler, as the paper). No effect on the CPU.")
    group.add_argument("--amp_dtype", type=str, default="fp16", choices=("fp16", "bf16"),
                       help="Autocast dtype with --use_amp; bf16 needs no gradient scaler (Ampere GPUs and newer) "
                            "and so avoids the scaler's host sync at every step.")
    group.add_argument("--fused_optimizer", action="store_true",
                       help="Use the optimizer's fused kernel (torch.optim fused=True): one kernel for all "
                            "parameters instead of one per tensor group. Same update up to rounding.")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the training forward pass (a few minutes of compilation on the first "
                            "steps, then faster steps on a GPU; on the CPU compilation alone takes minutes). Checkpoints "
                            "are unchanged. Try it for long runs.")
    group.add_argument("--compile_backend", type=str, default="inductor", choices=COMPILE_BACKENDS,
                       help="torch.compile backend: inductor generates kernels (the fast one); aot_eager / eager "
                            "only trace the model (to check that --compile works, no speed-up).")
    group.add_argument("--compile_mode", type=str, default="default", choices=COMPILE_MODES,
                       help="torch.compile mode (inductor): max-autotune* search kernel configurations (longer "
                            "compilation); reduce-overhead / max-autotune add CUDA graphs (not measured here).")
    group.add_argument("--check_every", type=int, default=20,
                       help="Batches between two reads of the loss on the host (non-finite loss check, progress bar). "
                            "Each read waits for the GPU; 1 reads every loss before its backward pass, so no step ever "
                            "uses a non-finite loss. Either way a non-finite loss stops the run with exit code 1 "
                            "before the epoch's checkpoint.")


def check_speed_args(args: argparse.Namespace) -> None:
    if args.check_every < 1:
        raise UserError(f"--check_every must be at least 1, got {args.check_every}")


def make_optimizer(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], fused: bool, **kwargs: Any) -> torch.optim.Optimizer:
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
    Shapes are static (the training loaders drop the last incomplete batch).
    """
    if not getattr(args, "compile", False):
        return module
    kwargs: dict[str, Any] = {"backend": args.compile_backend, "dynamic": False}
    if args.compile_backend == "inductor":
        kwargs["mode"] = args.compile_mode
    logger.info("torch.compile of %s (%s); the first steps compile", type(module).__name__,
                ", ".join(f"{k}={v}" for k, v in kwargs.items()))
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
    from monai.data import DataLoader
    from torch.utils.data import DistributedSampler

    g = torch.Generator()
    g.manual_seed(derived_seed(seed, epoch, info.rank))
    sampler = None
    if info.distributed:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=int(seed) % (2**31), drop_last=drop_last)
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
    from monai.data import DataLoader

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
            stacked = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=losses.device).reshape(())
                                   for k in tensor_keys for _, _, logs in self.pending])
            flat = stacked.tolist()
            n = len(self.pending)
            log_values = {k: flat[i * n:(i + 1) * n] for i, k in enumerate(tensor_keys)}
        for j, ((it, _, logs), value) in enumerate(zip(self.pending, values)):
            if not math.isfinite(value):
                self.pending = []
                late = "" if self.check_every == 1 else (
                    f" (losses are read every {self.check_every} batches, --check_every; the steps since are not saved)")
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
) -> dict[str, float]:
    """Train for one epoch of ``iters_per_epoch`` optimizer steps; return the averages.

    ``loss_fn(batch)`` runs the forward pass (inside autocast) and returns the loss and a
    dict of scalars to average. Each optimizer step accumulates ``accum_iters`` batches;
    batches that would not complete a step at the end of the epoch are skipped, like the
    last incomplete batch. Learning rate and weight decay follow the per-iteration
    schedules (index ``epoch * iters_per_epoch + step``). ``clip_grad`` > 0 clips the
    gradients before each step (``clip_mode``: see :func:`clip_gradients`). A non-finite loss stops the run
    (TrainingError, exit code 1); the losses and the logs returned as tensors are read on the
    host every ``check_every`` batches (:class:`LossCheck`; 1 = before each backward pass).
    """
    from tqdm import tqdm

    model.train()
    check = LossCheck(check_every, info, epoch)
    n_batches = iters_per_epoch * accum_iters
    it0 = epoch * iters_per_epoch
    bar = tqdm(total=iters_per_epoch, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for b, batch in enumerate(loader):
        if b >= n_batches:
            break
        step, micro = divmod(b, accum_iters)
        it = it0 + step
        if micro == 0:
            wd = float(wd_schedule[it]) if wd_schedule is not None else None
            apply_schedules(optimizer, float(lr_schedule[it]), wd, base_lr)
        last_micro = micro == accum_iters - 1
        sync = contextlib.nullcontext()
        if info.distributed and not last_micro and hasattr(model, "no_sync"):
            sync = model.no_sync()
        with sync:
            with amp.autocast():
                loss, logs = loss_fn(batch)
            read = check.add(it, loss, logs)  # with check_every=1: read (and maybe stop) before the backward pass
            amp.backward(loss / accum_iters)
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
    """Check that the checkpoint folder can be written; refuse to overwrite an existing
    run unless resuming. A missing folder is not created here (the run's first write
    creates it), so a run refused later for bad data leaves nothing behind.
    """
    if not info.is_main:
        return
    folder = paths["chkpt_dir"]
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--chkpt_dir {folder!r} cannot be created: {existing!r} is not a folder")
    try:
        probe = os.path.join(existing, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--chkpt_dir {folder!r} is not writable ({e.strerror})") from None
    if not resume and any(os.path.exists(paths[k]) for k in ("last", "log")):
        raise UserError(
            f"run {os.path.basename(paths['weights'])[:-3]!r} already exists in {paths['chkpt_dir']!r}; "
            f"pass --resume to continue it, or choose another --run_name"
        )


def resolve_resume(resume: str | None, paths: dict[str, str]) -> str | None:
    """The training state ``--resume`` points to: None (no resume), this run's
    ``<run>_last.pt`` for ``--resume`` alone ("auto"), or the given path.

    Raises:
        UserError: the file does not exist.
    """
    if resume is None:
        return None
    path = paths["last"] if resume == "auto" else os.path.abspath(resume)
    if not os.path.isfile(path):
        hint = " (the run has not finished an epoch yet; start it again without --resume)" if resume == "auto" else ""
        raise UserError(f"--resume: {path!r} does not exist{hint}")
    return path


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable objects."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
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
    from models import torch_load

    state = torch_load(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {path!r} is not a training state of this project (expected format {STATE_FORMAT!r})")
    return state


def check_resume_args(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str], path: str) -> None:
    """Refuse to resume with model / method args that differ from the saved run's."""
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if _jsonish(saved.get(k)) != _jsonish(current.get(k))]
    if diffs:
        raise UserError(f"cannot resume {path!r} with different arguments ({'; '.join(diffs)}); start a new --run_name instead")


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

    def __init__(self, paths: dict[str, str], info: DistInfo, use_wandb: bool = False, wandb_project: str = "", args: dict | None = None, wandb_id: str | None = None):
        self.paths = paths
        self.info = info
        self.wandb_run = None
        if use_wandb and info.is_main:
            try:
                import wandb
            except ImportError:  # pragma: no cover - wandb is in requirements.txt
                raise UserError("--use_wandb needs the wandb package (pip install wandb)") from None
            os.makedirs(paths["chkpt_dir"], exist_ok=True)
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
        append_jsonl(self.paths["log"], record)
        if self.wandb_run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb_run.log(flat, step=int(record.get("epoch", 0)))

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def truncate_log(path: str, n_epochs_done: int) -> None:
    """After a resume, drop log lines of epochs that will be redone.

    Records carry ``"epoch"``: the 1-based number of the epoch they describe; lines with
    ``epoch > n_epochs_done`` were written after the checkpoint being resumed.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= n_epochs_done]
    if len(keep) != len(lines):
        from utils import atomic_write_text

        atomic_write_text(path, "".join(keep))


def write_args(paths: dict[str, str], args_d: dict[str, Any], info: DistInfo) -> None:
    if info.is_main:
        atomic_write_json(paths["args"], args_d)

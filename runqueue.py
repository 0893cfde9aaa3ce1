"""The runs of the IoU-interval table: the plan, and a lock-file queue that runs it.

The paper's table has one row per IoU interval. A pretrained row is
``len(pretrain_seeds) x len(finetune_seeds)`` runs (2 x 2 in the paper): every
pretraining (SimSiam, one per pretraining seed) is fine-tuned once per fine-tuning
seed. The "no pretraining" row has the same number of fine-tunings, started from a
random encoder: its (pretraining seed, fine-tuning seed) pairs become
(initialisation seed, fine-tuning seed) pairs, so the four runs differ in their initial
weights and in their training randomness exactly like the four runs of a pretrained row.

Run names encode the row and the seeds (and are the file names in ``<output_dir>/runs``)::

    pre_iou0.30-0.60_s4294967295                   SimSiam on crops with IoU in [0.3, 0.6]
    ft_iou0.30-0.60_s4294967295_ft381122412        its fine-tuning with seed 381122412
    ft_none_init4294967295_ft381122412             no pretraining: init seed, fine-tuning seed

Executing a run (:func:`execute_run`) is a plain function call in this process:
``main(get_args_parser().parse_args(argv))`` of the training script the run names, looked
up in a mapping of :class:`Trainer` (:data:`TRAINERS` by default; the tests pass their own).

Claiming runs on one machine. Every worker (:func:`run_worker`: this process or a process
that :func:`run_local` spawned) loops over the plan and claims the first run that is not
finished, not claimed and whose pretraining is finished, by taking the lock
``<state_dir>/locks/<run>.lock`` (``filelock``: an OS lock on an open file, so the lock of
a worker that died is free again at once; the empty file may stay). A run is finished
exactly when ``<run>_files/result.json`` exists (the training scripts write it last).
:func:`run_local` holds ``<state_dir>/local.lock`` for the whole grid, so a second local
launch on the same folder is refused. Machines that share a folder go through SLURM
(``slurm.py``: one job per run, dependencies, requeue), not through lock files.

Launching. :func:`run_local` runs the plan in this process or in spawned worker processes
(one per GPU with ``gpus``); :func:`write_run_scripts` writes one shell file per run for
a scheduler of your own instead.

The results (tables, figures) are read from the run folders by ``report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

# The training scripts are imported here, at the top, so that a run is a plain call of
# their ``main``. They pull in torch and MONAI (a few seconds), which every worker needs
# anyway; none of them imports this module, so there is no cycle.
import main_dino
import main_finetune
import main_simsiam
import models
from engine import run_paths
from utils import TrainingError, UserError, append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: Files that mark a run's state inside ``<run>_files``.
RESULT_NAME = "result.json"

HOST = socket.gethostname()


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the table: an IoU interval, or no pretraining (``min_iou is None``)."""

    key: str
    min_iou: float | None = None
    max_iou: float | None = None

    @property
    def pretrained(self) -> bool:
        """False for the "no pretraining" row."""
        return self.min_iou is not None

    @property
    def label(self) -> str:
        """The row's name as the paper prints it."""
        if not self.pretrained:
            return "- (no pretraining)"
        text = f"[{_num(self.min_iou)}, {_num(self.max_iou)}]"
        return f"Random crop ({text})" if (self.min_iou, self.max_iou) == (0.0, 1.0) else text

    @property
    def tag(self) -> str:
        """The row's part of run names: ``none`` or ``iou0.30-0.60``."""
        if not self.pretrained:
            return "none"
        return f"iou{_tag_num(self.min_iou)}-{_tag_num(self.max_iou)}"


def _num(x: float) -> str:
    """A bound as the paper prints it (``0.3``, ``0.0001``, ``1``)."""
    return f"{x:g}"


def _tag_num(x: float) -> str:
    """A bound in run names: two decimals (``0.30``) unless that would round it (``0.0001``)."""
    two = f"{x:.2f}"
    return two if float(two) == x else f"{x:g}"


def parse_row(text: str) -> Row:
    """``"none"`` or ``"LO-HI"`` (e.g. ``"0.3-0.6"``, ``"0.0001-0.3"``) -> :class:`Row`.

    Raises:
        UserError: not of that form, or not 0 <= LO <= HI <= 1.
    """
    t = text.strip()
    if t.lower() in ("none", "-", "no_pretraining"):
        return Row("none")
    parts = t.split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"--rows entry {text!r} is neither 'none' nor an interval 'LO-HI' such as '0.3-0.6'") from None
    if not (0.0 <= lo <= hi <= 1.0) or not all(math.isfinite(v) for v in (lo, hi)):
        raise UserError(f"--rows entry {text!r}: need 0 <= LO <= HI <= 1")
    return Row(f"{_num(lo)}-{_num(hi)}", lo, hi)


def parse_rows(spec: str | Sequence[str]) -> list[Row]:
    """A comma-separated list (or a list) of row specs -> rows, duplicates refused."""
    items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("--rows is empty; give e.g. 'none,0-0,0.0001-0.3,0.3-0.6,0.6-1,0-1'")
    rows = [parse_row(s) for s in items]
    keys = [r.key for r in rows]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UserError(f"--rows lists {dup[0]!r} twice")
    return rows


def parse_seeds(spec: str | Sequence[int], flag: str) -> list[int]:
    """Comma-separated non-negative integers -> list, duplicates refused."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise UserError(f"{flag} {spec!r} must be comma-separated integers") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"{flag} {spec!r} must list at least one non-negative integer")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{flag} {spec!r} lists a seed twice")
    return seeds


# ---------------------------------------------------------------------------------------
# Runs and the plan
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of the grid.

    ``argv`` is exactly what the script's ``get_args_parser().parse_args`` gets (without
    ``--resume`` and the execution flags, which :func:`execute_run` adds); the same list is
    printed by ``--dry_run`` as ``python <script>.py ...``.
    """

    name: str
    kind: str  # "pretrain" or "finetune"
    row: str  # Row.key
    script: str  # training script, a key of TRAINERS: main_simsiam, main_dino, main_finetune
    argv: list[str]
    depends: str | None = None  # name of the pretraining run this fine-tuning needs
    pretrain_seed: int | None = None  # for "none": the initialisation seed
    finetune_seed: int | None = None
    init: dict[str, Any] | None = None  # "none" rows: {"path", "seed", "config"} of the random encoder to write first
    budget: int | None = None  # fine-tunings of the label-budget axis: --n_train_cases (None: every training case)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a spawned worker, or JSON)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Run":
        """The inverse of :meth:`to_dict`."""
        return Run(**d)


def pretrain_name(row: Row, seed: int) -> str:
    """``pre_<row tag>_s<seed>``."""
    return f"pre_{row.tag}_s{seed}"


def finetune_name(row: Row, pre_seed: int, ft_seed: int, budget: int | None = None) -> str:
    """``ft_<row tag>_s<pretraining seed>_ft<seed>``; "no pretraining": ``ft_none_init<seed>_ft<seed>``;
    on the label-budget axis ``_n<budget>`` is appended (``--n_train_cases``)."""
    tail = "" if budget is None else f"_n{budget}"
    if not row.pretrained:
        return f"ft_none_init{pre_seed}_ft{ft_seed}{tail}"
    return f"ft_{row.tag}_s{pre_seed}_ft{ft_seed}{tail}"


def init_weights_path(chkpt_dir: str, seed: int) -> str:
    """The random initial encoder of the "no pretraining" row for initialisation seed ``seed``."""
    return os.path.join(os.path.abspath(chkpt_dir), f"random_init_s{seed}.pt")


def plan_grid(
    rows: Sequence[Row],
    pretrain_seeds: Sequence[int],
    finetune_seeds: Sequence[int],
    chkpt_dir: str,
    pretrain_argv: Callable[[Row, int, str], list[str]],
    finetune_argv: Callable[[Row, int, int, str, str], list[str]],
    encoder_config: dict[str, Any] | None = None,
    pretrain_script: str = "main_simsiam",
    finetune_script: str = "main_finetune",
    budgets: Sequence[int | None] = (None,),
) -> list[Run]:
    """Every run of the grid, in the order workers claim them.

    Order: all pretrainings (rows in order), then the fine-tunings without pretraining
    (they can start at once), then the other fine-tunings, row by row.

    Args:
        pretrain_argv: ``(row, seed, run_name) -> argv`` of a pretraining.
        finetune_argv: ``(row, pre_seed, ft_seed, run_name, weights) -> argv`` of a
            fine-tuning; ``weights`` is the pretraining's ``<run>.pt``, or for "none" the
            random encoder :func:`init_weights_path` that :func:`execute_run` writes first.
        encoder_config: keyword arguments of ``models.encoder_config`` for the random
            encoders of the "none" row (must match the fine-tuning's model).
        budgets: the label-budget axis: each pretraining is fine-tuned once per budget N with
            ``--n_train_cases N`` added to its argv (the first N training cases of the split,
            the same for every row); ``(None,)``: every training case, no axis.
    """
    pre: list[Run] = []
    ft_none: list[Run] = []
    ft: list[Run] = []
    for row in rows:
        for ps in pretrain_seeds:
            dep = None
            init = None
            if row.pretrained:
                dep = pretrain_name(row, ps)
                weights = run_paths(chkpt_dir, dep)["weights"]
                pre.append(Run(dep, "pretrain", row.key, pretrain_script, pretrain_argv(row, ps, dep), None, ps, None))
            else:
                if encoder_config is None:
                    raise ValueError("plan_grid needs encoder_config for a 'none' row")
                weights = init_weights_path(chkpt_dir, ps)
                init = {"path": weights, "seed": int(ps), "config": dict(encoder_config)}
            for fs in finetune_seeds:
                for budget in budgets:
                    name = finetune_name(row, ps, fs, budget)
                    argv = finetune_argv(row, ps, fs, name, weights)
                    if budget is not None:
                        argv = [*argv, "--n_train_cases", str(int(budget))]
                    run = Run(name, "finetune", row.key, finetune_script, argv, dep, ps, fs, init, budget)
                    (ft if row.pretrained else ft_none).append(run)
    return pre + ft_none + ft


def ensure_random_init(init: dict[str, Any]) -> str:
    """Write the random encoder of the "no pretraining" row, if it is not there yet.

    The encoder is ``models.build_encoder(models.encoder_config(**config))`` initialised
    under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards), saved
    as an encoder file like a pretraining's (method "random_init", epoch 0). The file is a
    pure function of (config, seed), so workers that race to write it write the same bytes.
    """
    path = init["path"]
    if os.path.isfile(path):
        return path
    cfg = models.encoder_config(**init["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init["seed"]))
        enc = models.build_encoder(cfg)
    ckpt = models.encoder_checkpoint(
        enc, cfg, method="random_init", epoch=0, args={"seed": int(init["seed"]), **init["config"]}
    )
    atomic_torch_save(ckpt, path)
    logger.info("wrote the random initial encoder %s (seed %d)", path, init["seed"])
    return path


def command_line(run: Run, python: str = "python", extra: Sequence[str] = ()) -> str:
    """The shell command of a run: ``python main_simsiam.py --flag value ...``."""
    return " ".join(shlex.quote(a) for a in [python, f"{run.script}.py", *run.argv, *extra])


def write_run_scripts(
    plan: Sequence[Run],
    script_dir: str,
    chkpt_dir: str,
    project_root: str,
    extra: dict[str, list[str]] | None = None,
    python: str = "python",
) -> list[str]:
    """One shell file per run (``NN_<run>.sh``) to run by hand or with a scheduler, plus ``all.sh``.

    Each file names its run and its dependency in a comment, exits at once if the run
    is finished (``result.json``), resumes it when ``<run>_last.pt`` exists, and refuses
    to start a fine-tuning whose pretraining is not finished. ``extra``: execution flags
    per run kind ("pretrain" / "finetune"). The random encoders of the "no pretraining"
    row are written now. Returns the paths written.
    """
    os.makedirs(script_dir, exist_ok=True)
    written = []
    width = max(2, len(str(len(plan))))
    for i, run in enumerate(plan, 1):
        p = run_paths(chkpt_dir, run.name)
        if run.init is not None:
            ensure_random_init(run.init)
        lines = [
            "#!/usr/bin/env bash",
            f"# run {i}/{len(plan)}: {run.name} ({run.kind}, row {run.row})",
            f"# depends on: {run.depends or 'nothing'}"
            + (f" (starts from the random encoder {run.init['path']}, seed {run.init['seed']})" if run.init else ""),
            "set -euo pipefail",
            f"cd {shlex.quote(project_root)}",
            f"if [ -f {shlex.quote(result_path(chkpt_dir, run.name))} ]; then echo 'finished already: {run.name}'; exit 0; fi",
        ]
        if run.depends:
            lines.append(
                f"if [ ! -f {shlex.quote(result_path(chkpt_dir, run.depends))} ]; then "
                f"echo 'pretraining {run.depends} is not finished' >&2; exit 3; fi"
            )
        lines += [
            "RESUME=()",
            f"if [ -f {shlex.quote(p['last'])} ]; then RESUME=(--resume); fi",
            command_line(run, python, (extra or {}).get(run.kind, [])) + ' "${RESUME[@]}" "$@"',
            "",
        ]
        path = os.path.join(script_dir, f"{i:0{width}d}_{run.name}.sh")
        atomic_write_text(path, "\n".join(lines))
        os.chmod(path, 0o755)
        written.append(path)
    all_lines = (
        [
            "#!/usr/bin/env bash",
            "# every run of the grid in dependency order (skips finished runs)",
            "set -euo pipefail",
            'cd "$(dirname "$0")"',
        ]
        + [f"./{os.path.basename(w)}" for w in written]
        + [""]
    )
    all_path = os.path.join(script_dir, "all.sh")
    atomic_write_text(all_path, "\n".join(all_lines))
    os.chmod(all_path, 0o755)
    return written + [all_path]


# ---------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------


def result_path(chkpt_dir: str, name: str) -> str:
    """``<run>_files/result.json``: written last by a training script, so it marks a finished run."""
    return os.path.join(run_paths(chkpt_dir, name)["dir"], RESULT_NAME)


def is_finished(chkpt_dir: str, name: str) -> bool:
    """True when run ``name`` has written its ``result.json``."""
    return os.path.isfile(result_path(chkpt_dir, name))


def n_finished(chkpt_dir: str, plan: Sequence[Run]) -> int:
    """How many runs of ``plan`` have written their ``result.json``."""
    return sum(is_finished(chkpt_dir, r.name) for r in plan)


def read_result(chkpt_dir: str, name: str) -> dict[str, Any]:
    """The ``result.json`` of a finished run.

    Raises:
        UserError: unreadable, or not a JSON object.
    """
    path = result_path(chkpt_dir, name)
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return obj


def failed_path(state_dir: str, name: str) -> str:
    """``<state_dir>/failed/<run>.json``: the error of a failed run (the run is not retried
    by this invocation's workers; :func:`clear_failures` forgets it)."""
    return os.path.join(state_dir, "failed", name + ".json")


# ---------------------------------------------------------------------------------------
# Locks (several workers of one machine)
# ---------------------------------------------------------------------------------------

#: The lock a local launch holds on its grid (``<state_dir>/local.lock``).
LOCAL_LOCK_NAME = "local.lock"


def try_lock(lock_dir: str, name: str) -> FileLock | None:
    """Claim run ``name`` for this process: the lock ``<lock_dir>/<name>.lock``; None when
    another worker holds it. Release it with ``lock.release()``; the OS releases it when
    the process ends, however it ends."""
    os.makedirs(lock_dir, exist_ok=True)
    lock = FileLock(os.path.join(lock_dir, name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def local_lock_path(state_dir: str) -> str:
    """``<state_dir>/local.lock``: held by a local launch (:func:`run_local`) while it runs."""
    return os.path.join(state_dir, LOCAL_LOCK_NAME)


def local_launch_running(state_dir: str) -> bool:
    """True while a local launch of this grid holds :func:`local_lock_path` (another process)."""
    if not os.path.isfile(local_lock_path(state_dir)):
        return False
    lock = FileLock(local_lock_path(state_dir))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


# ---------------------------------------------------------------------------------------
# Training scripts
# ---------------------------------------------------------------------------------------


class Trainer(NamedTuple):
    """A training script as two plain functions: its argument parser and its entry point."""

    get_args_parser: Callable[[], argparse.ArgumentParser]
    main: Callable[[argparse.Namespace], Any]


#: The project's training scripts, by the module name a :class:`Run` gives in ``script``.
TRAINERS: dict[str, Trainer] = {
    "main_simsiam": Trainer(main_simsiam.get_args_parser, main_simsiam.main),
    "main_dino": Trainer(main_dino.get_args_parser, main_dino.main),
    "main_finetune": Trainer(main_finetune.get_args_parser, main_finetune.main),
}


def trainer_for(script: str, trainers: Mapping[str, Trainer] | None = None) -> Trainer:
    """The :class:`Trainer` of ``Run.script`` in ``trainers`` (default :data:`TRAINERS`).

    Raises:
        ValueError: ``trainers`` has no such script (a plan built for other trainers).
    """
    table = TRAINERS if trainers is None else trainers
    if script not in table:
        raise ValueError(f"no trainer for script {script!r}; known: {', '.join(sorted(table))}")
    return table[script]


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def _remove_partial_run(chkpt_dir: str, name: str) -> list[str]:
    """Delete the files of a run that stopped before its first checkpoint (no ``_last.pt``)."""
    p = run_paths(chkpt_dir, name)
    removed = []
    for key in ("weights", "log", "args"):
        if os.path.exists(p[key]):
            os.unlink(p[key])
            removed.append(p[key])
    if os.path.isdir(p["dir"]):
        shutil.rmtree(p["dir"])
        removed.append(p["dir"])
    return removed


def execute_run(
    run: Run,
    chkpt_dir: str,
    extra_argv: dict[str, list[str]] | None = None,
    log_dir: str | None = None,
    trainers: Mapping[str, Trainer] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Run one training in this process: ``main(get_args_parser().parse_args(argv))`` of its script.

    Adds the execution flags ``extra_argv[run.kind]``, and ``--resume`` when the run has a
    ``<run>_last.pt``; a run that died before its first checkpoint has its partial files
    removed and starts over. A "no pretraining" fine-tuning first gets its random encoder
    (:func:`ensure_random_init`). With ``log_dir``, the run's log lines also go to
    ``<log_dir>/<run>.log``. ``trainers``: the scripts by name (default :data:`TRAINERS`).

    ``rank``: this process's rank when every task of a multi-process run calls this function
    (a SLURM job with several tasks). Only rank 0 removes partial files and checks
    ``result.json``; every rank decides ``--resume`` alike, since no rank writes a checkpoint
    before all of them have joined the process group.

    Raises:
        UserError: the script refuses its arguments.
        TrainingError: the run ended without writing ``result.json``.
        ValueError: ``trainers`` has no entry for the run's script.
    """
    p = run_paths(chkpt_dir, run.name)
    trainer = trainer_for(run.script, trainers)
    argv = list(run.argv) + list((extra_argv or {}).get(run.kind, []))
    if run.init is not None:
        ensure_random_init(run.init)
    if os.path.isfile(p["last"]):
        argv.append("--resume")
        logger.info("%s: resuming from %s", run.name, p["last"])
    elif rank == 0:
        removed = _remove_partial_run(chkpt_dir, run.name)
        if removed:
            logger.warning(
                "%s: stopped before its first checkpoint; removed %s and starting over", run.name, ", ".join(removed)
            )
    parser = trainer.get_args_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        last = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise UserError(
            f"{run.script}.py refuses the arguments of run {run.name}: {last[-1] if last else 'bad arguments'}"
        ) from None
    with contextlib.ExitStack() as stack:
        if log_dir is not None:
            # the run's log lines and its printed summary go to <log_dir>/<run>.log
            os.makedirs(log_dir, exist_ok=True)
            log_file = stack.enter_context(open(os.path.join(log_dir, run.name + ".log"), "a", buffering=1))
            handler = logging.StreamHandler(log_file)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
            )
            logging.getLogger().addHandler(handler)
            stack.callback(logging.getLogger().removeHandler, handler)
            stack.enter_context(contextlib.redirect_stdout(log_file))
        t0 = time.perf_counter()
        out = trainer.main(args)
    if rank == 0 and not is_finished(chkpt_dir, run.name):
        raise TrainingError(f"run {run.name} returned without writing {result_path(chkpt_dir, run.name)}")
    logger.info("%s: finished in %.1f s", run.name, time.perf_counter() - t0)
    return out if isinstance(out, dict) else {}


def timing_record(run: Run, start: float, end: float, **extra: Any) -> dict[str, Any]:
    """One line of ``<state_dir>/timings.jsonl``: a finished run's kind, start and end (Unix
    seconds), duration and host, plus ``extra`` (the worker, or the SLURM job id)."""
    return {
        "run": run.name,
        "kind": run.kind,
        "seconds": round(end - start, 2),
        "start": round(start, 3),
        "end": round(end, 3),
        "host": HOST,
        **extra,
    }


@dataclass
class WorkerConfig:
    """What a worker needs besides the plan (plain data, so it crosses a spawn)."""

    chkpt_dir: str
    state_dir: str  # locks/, failed/, logs/ live here
    extra_argv: dict[str, list[str]] = field(default_factory=dict)  # execution flags per run kind
    poll_s: float = 2.0
    owner: str = "main"
    timings_path: str | None = None  # append one JSON line per finished run


def run_worker(
    plan: Sequence[Run],
    cfg: WorkerConfig,
    runner: Callable[..., dict] = execute_run,
    trainers: Mapping[str, Trainer] | None = None,
) -> dict[str, list[str]]:
    """Claim and run runs until every run is finished, failed, or blocked by a failed one.

    ``runner(run, chkpt_dir, extra_argv, log_dir, trainers)`` executes a claimed run
    (default :func:`execute_run`). Returns ``{"done": [...], "failed": [...], "blocked": [...]}``
    (this worker's view).

    Raises:
        UserError: a run refused its arguments (every run would; the grid stops). Its
            failure is recorded so that other workers stop too.
    """
    lock_dir = os.path.join(cfg.state_dir, "locks")
    done: list[str] = []
    waiting_logged: set[str] = set()
    while True:
        finished = {r.name for r in plan if is_finished(cfg.chkpt_dir, r.name)}
        failed = {r.name for r in plan if os.path.isfile(failed_path(cfg.state_dir, r.name))}
        blocked = {r.name for r in plan if r.depends in failed and r.name not in finished}
        pending = [r for r in plan if r.name not in finished and r.name not in failed and r.name not in blocked]
        if not pending:
            return {"done": done, "failed": sorted(failed), "blocked": sorted(blocked)}
        claimed = None
        for r in pending:
            if r.depends is not None and r.depends not in finished:
                continue
            lock = try_lock(lock_dir, r.name)
            if lock is None:
                continue
            if is_finished(cfg.chkpt_dir, r.name):  # finished between the scan and the lock
                lock.release()
                continue
            claimed = (r, lock)
            break
        if claimed is None:
            key = ",".join(sorted(r.name for r in pending))
            if key not in waiting_logged:
                waiting_logged.add(key)
                logger.info(
                    "waiting: %d run(s) left, all running in other workers or waiting for their pretraining",
                    len(pending),
                )
            time.sleep(cfg.poll_s)
            continue
        run, lock = claimed
        logger.info("starting %s (%s, row %s)", run.name, run.kind, run.row)
        t0 = time.time()
        try:
            runner(run, cfg.chkpt_dir, cfg.extra_argv, os.path.join(cfg.state_dir, "logs"), trainers)
        except UserError as e:
            _record_failure(cfg, run, e)
            raise
        except Exception as e:  # noqa: BLE001 - one failed run (TrainingError, a crash) must not stop the grid
            logger.error("run %s failed: %s: %s", run.name, type(e).__name__, e)
            _record_failure(cfg, run, e)
        else:
            done.append(run.name)
            if cfg.timings_path:
                append_jsonl(cfg.timings_path, timing_record(run, t0, time.time(), owner=cfg.owner))
        finally:
            lock.release()


def _record_failure(cfg: WorkerConfig, run: Run, e: BaseException) -> None:
    """Write :func:`failed_path` of ``run`` (so that every worker skips it and its fine-tunings)."""
    atomic_write_json(
        failed_path(cfg.state_dir, run.name),
        {"run": run.name, "error": f"{type(e).__name__}: {e}", "host": HOST, "pid": os.getpid(), "time": time.time()},
    )


def clear_failures(state_dir: str) -> list[str]:
    """Forget the failures of earlier invocations (they are retried). Returns the run names."""
    folder = os.path.join(state_dir, "failed")
    if not os.path.isdir(folder):
        return []
    names = []
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".json"):
            os.unlink(os.path.join(folder, fn))
            names.append(fn[:-5])
    return names


def worker_entry(
    plan_dicts: list[dict],
    cfg_dict: dict,
    env: dict[str, str],
    n_threads: int,
    log_level: int,
    trainers: Mapping[str, Trainer] | None = None,
) -> None:
    """Entry point of a spawned worker process (``--workers K`` / ``--gpus``).

    Sets its environment (``CUDA_VISIBLE_DEVICES``) before torch touches CUDA, its torch
    thread count, and its log format (prefixed with the worker name); exit code 0 when it
    ran out of runs, 2 on a UserError, 1 when a run failed. ``trainers`` crosses the spawn
    by pickling: module-level functions travel as references to their module, which the
    worker imports.
    """
    os.environ.update(env)
    cfg = WorkerConfig(**cfg_dict)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{cfg.owner}] %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(log_level)
    torch.set_num_threads(max(1, n_threads))
    plan = [Run.from_dict(d) for d in plan_dicts]
    try:
        out = run_worker(plan, cfg, trainers=trainers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(1 if out["failed"] else 0)


# ---------------------------------------------------------------------------------------
# Launching on this machine
# ---------------------------------------------------------------------------------------


def run_local(
    plan: Sequence[Run],
    cfg: WorkerConfig,
    n_workers: int = 1,
    gpus: Sequence[str] = (),
    threads_per_worker: int = 0,
    progress: bool = True,
    trainers: Mapping[str, Trainer] | None = None,
) -> dict[str, list[str]]:
    """Run every unfinished run of ``plan``, in this process or in spawned worker processes.

    One worker (and no GPU list) runs :func:`run_worker` in this process; otherwise
    ``n_workers`` processes (one per GPU of ``gpus``, each seeing only its GPU through
    ``CUDA_VISIBLE_DEVICES``) run :func:`worker_entry`. A progress bar counts finished runs.
    The grid's :func:`local_lock_path` is held until the workers end.

    Args:
        cfg: the workers' configuration; each spawned worker gets it with its own ``owner``.
        n_workers: worker processes (ignored when ``gpus`` is given).
        gpus: GPU ids, one worker each.
        threads_per_worker: torch threads per worker (0: CPU cores / workers; in this
            process, 0 leaves torch's setting alone).
        progress: show the progress bar.
        trainers: the training scripts by name (default :data:`TRAINERS`); a picklable
            mapping (module-level functions), since spawned workers receive it.

    Returns:
        ``{"done": [...], "failed": [...], "blocked": [...]}`` (spawned workers: only the
        failed runs, read from ``<state_dir>/failed``).

    Raises:
        ValueError: fewer than one worker.
        UserError: another local launch runs this grid, or a run refused its arguments
            (a worker stopped on bad input).
    """
    os.makedirs(cfg.state_dir, exist_ok=True)
    grid_lock = FileLock(local_lock_path(cfg.state_dir))
    try:
        grid_lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"another local launch of this grid is running (it holds {local_lock_path(cfg.state_dir)}); "
            "wait for it, or spread the grid over machines with --launcher slurm"
        ) from None
    try:
        return _run_local(plan, cfg, n_workers, list(gpus), threads_per_worker, progress, trainers)
    finally:
        grid_lock.release()


def _run_local(
    plan: Sequence[Run],
    cfg: WorkerConfig,
    n_workers: int,
    gpus: list[str],
    threads_per_worker: int,
    progress: bool,
    trainers: Mapping[str, Trainer] | None,
) -> dict[str, list[str]]:
    n_workers = len(gpus) if gpus else n_workers
    if n_workers < 1:
        raise ValueError(f"run_local needs at least one worker, got {n_workers}")
    n_done0 = n_finished(cfg.chkpt_dir, plan)
    if n_done0:
        logger.info("%d of %d runs are finished already and are skipped", n_done0, len(plan))
    if n_done0 == len(plan):
        return {"done": [], "failed": [], "blocked": []}
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n_workers)
    bar = tqdm(total=len(plan), initial=n_done0, desc="grid", unit="run", disable=not progress, dynamic_ncols=True)
    if n_workers == 1 and not gpus:
        if threads_per_worker:
            torch.set_num_threads(threads)

        def runner(run: Run, *a: Any) -> dict:
            try:
                return execute_run(run, *a)
            finally:
                bar.n = n_finished(cfg.chkpt_dir, plan)
                bar.refresh()

        try:
            return run_worker(plan, cfg, runner=runner, trainers=trainers)
        finally:
            bar.close()
    ctx = mp.get_context("spawn")
    procs = []
    plan_dicts = [r.to_dict() for r in plan]
    for i in range(n_workers):
        env = {"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {}
        wcfg = WorkerConfig(**{**cfg.__dict__, "owner": f"worker{i}" + (f"-gpu{gpus[i]}" if gpus else "")})
        proc = ctx.Process(
            target=worker_entry,
            args=(plan_dicts, wcfg.__dict__, env, threads, logging.getLogger().level or logging.INFO, trainers),
            name=wcfg.owner,
        )
        proc.start()
        procs.append(proc)
    logger.info(
        "started %d worker(s) with %d torch thread(s) each%s",
        n_workers,
        threads,
        f" on GPUs {','.join(gpus)}" if gpus else "",
    )
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            n = n_finished(cfg.chkpt_dir, plan)
            if n != bar.n:
                bar.n = n
                bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        bar.n = n_finished(cfg.chkpt_dir, plan)
        bar.close()
    codes = [p.exitcode for p in procs]
    failed_dir = os.path.join(cfg.state_dir, "failed")
    if any(c == 2 for c in codes):
        failed = sorted(os.listdir(failed_dir))
        detail = ""
        if failed:
            with open(os.path.join(failed_dir, failed[0])) as f:
                detail = json.load(f).get("error", "")
        raise UserError(f"a worker stopped on bad input: {detail}")
    failed = sorted(f[:-5] for f in os.listdir(failed_dir)) if os.path.isdir(failed_dir) else []
    if any(c not in (0, 1) for c in codes):
        logger.error("worker exit codes: %s", codes)
    return {"done": [], "failed": failed, "blocked": []}

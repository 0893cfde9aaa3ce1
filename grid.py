"""The IoU-interval grid behind ``reproduce_table.py``: plan, claim, run, collect, render.

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

Claiming runs. Every worker (a process of this machine, or of another machine that
shares the output folder) loops over the plan and claims the first run that is not
finished, not locked and whose pretraining is finished, by creating
``<output_dir>/locks/<run>.lock`` with ``O_CREAT | O_EXCL`` (host, pid, time inside).
A run is finished exactly when ``<run>_files/result.json`` exists (the training
scripts write it last). A lock left by a process that is gone (same host, pid not
alive, or alive but a different process) is stale and taken over, with a log line; a
lock of another host is respected (delete it by hand if that machine died).

Collecting: each fine-tuning's ``result.json`` gives its Dice (``best_dice_paper``,
the thesis' Dice) and the path of its challenge-grade per-organ scores (Dice and NSD);
:func:`collect` gathers them per row, :func:`render_table` / :func:`render_organs`
write Markdown and CSV, and :func:`plot_collapse`, :func:`plot_organ_sharing`,
:func:`plot_crop_pairs` draw the figures.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import math
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from utils import TrainingError, UserError, append_jsonl, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: Version of the results-folder layout (``grid.json``); a folder of another version is refused.
GRID_FORMAT = "ioupos-table-v1"
#: The two seeds of the paper, used for pretraining and for fine-tuning.
PAPER_SEEDS: tuple[int, int] = (4294967295, 381122412)
#: Row keys of the paper's table, in the paper's order.
PAPER_ROW_KEYS: tuple[str, ...] = ("none", "0-0", "0.0001-0.3", "0.3-0.6", "0.6-1", "0-1")
#: The paper's table: mean, std and the four DSCs of each row.
PAPER_TABLE: dict[str, dict[str, Any]] = {
    "none": {"mean": 0.843, "std": 0.004, "dsc": [0.842, 0.848, 0.846, 0.836]},
    "0-0": {"mean": 0.838, "std": 0.007, "dsc": [0.836, 0.831, 0.834, 0.850]},
    "0.0001-0.3": {"mean": 0.839, "std": 0.012, "dsc": [0.847, 0.831, 0.855, 0.824]},
    "0.3-0.6": {"mean": 0.853, "std": 0.002, "dsc": [0.854, 0.851, 0.851, 0.857]},
    "0.6-1": {"mean": 0.843, "std": 0.013, "dsc": [0.850, 0.855, 0.848, 0.822]},
    "0-1": {"mean": 0.824, "std": 0.011, "dsc": [0.815, 0.841, 0.828, 0.812]},
}
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
    return f"{x:g}"


def _tag_num(x: float) -> str:
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
    script: str  # module name: main_simsiam, main_dino, main_finetune
    argv: list[str]
    depends: str | None = None  # name of the pretraining run this fine-tuning needs
    pretrain_seed: int | None = None  # for "none": the initialisation seed
    finetune_seed: int | None = None
    init: dict[str, Any] | None = None  # "none" rows: {"path", "seed", "config"} of the random encoder to write first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Run":
        return Run(**d)


def pretrain_name(row: Row, seed: int) -> str:
    return f"pre_{row.tag}_s{seed}"


def finetune_name(row: Row, pre_seed: int, ft_seed: int) -> str:
    if not row.pretrained:
        return f"ft_none_init{pre_seed}_ft{ft_seed}"
    return f"ft_{row.tag}_s{pre_seed}_ft{ft_seed}"


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
    """
    from engine import run_paths

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
                name = finetune_name(row, ps, fs)
                run = Run(name, "finetune", row.key, finetune_script, finetune_argv(row, ps, fs, name, weights), dep, ps, fs, init)
                (ft if row.pretrained else ft_none).append(run)
    return pre + ft_none + ft


def ensure_random_init(init: dict[str, Any]) -> str:
    """Write the random encoder of the "no pretraining" row, if it is not there yet.

    The encoder is ``models.build_encoder(models.encoder_config(**config))`` initialised
    under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards), saved
    as an encoder file like a pretraining's (method "random_init", epoch 0). The file is a
    pure function of (config, seed), so workers that race to write it write the same bytes.
    """
    import torch

    from models import build_encoder, encoder_checkpoint, encoder_config

    path = init["path"]
    if os.path.isfile(path):
        return path
    cfg = encoder_config(**init["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init["seed"]))
        enc = build_encoder(cfg)
    ckpt = encoder_checkpoint(enc, cfg, method="random_init", epoch=0, args={"seed": int(init["seed"]), **init["config"]})
    from utils import atomic_torch_save

    atomic_torch_save(ckpt, path)
    logger.info("wrote the random initial encoder %s (seed %d)", path, init["seed"])
    return path


def command_line(run: Run, python: str = "python", extra: Sequence[str] = ()) -> str:
    """The shell command of a run: ``python main_simsiam.py --flag value ...``."""
    return " ".join(shlex.quote(a) for a in [python, f"{run.script}.py", *run.argv, *extra])


def write_run_scripts(plan: Sequence[Run], script_dir: str, chkpt_dir: str, project_root: str, extra: dict[str, list[str]] | None = None, python: str = "python") -> list[str]:
    """One shell file per run (``NN_<run>.sh``) for a cluster scheduler, plus ``all.sh``.

    Each file names its run and its dependency in a comment, exits at once if the run
    is finished (``result.json``), resumes it when ``<run>_last.pt`` exists, and refuses
    to start a fine-tuning whose pretraining is not finished. ``extra``: execution flags
    per run kind ("pretrain" / "finetune"). The random encoders of the "no pretraining"
    row are written now. Returns the paths written.
    """
    from engine import run_paths

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
            f"if [ -f {shlex.quote(os.path.join(p['dir'], RESULT_NAME))} ]; then echo 'finished already: {run.name}'; exit 0; fi",
        ]
        if run.depends:
            dep = run_paths(chkpt_dir, run.depends)
            lines.append(
                f"if [ ! -f {shlex.quote(os.path.join(dep['dir'], RESULT_NAME))} ]; then "
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
    all_lines = ["#!/usr/bin/env bash", "# every run of the grid in dependency order (skips finished runs)", "set -euo pipefail",
                 'cd "$(dirname "$0")"'] + [f"./{os.path.basename(w)}" for w in written] + [""]
    all_path = os.path.join(script_dir, "all.sh")
    atomic_write_text(all_path, "\n".join(all_lines))
    os.chmod(all_path, 0o755)
    return written + [all_path]


# ---------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------


def result_path(chkpt_dir: str, name: str) -> str:
    from engine import run_paths

    return os.path.join(run_paths(chkpt_dir, name)["dir"], RESULT_NAME)


def is_finished(chkpt_dir: str, name: str) -> bool:
    return os.path.isfile(result_path(chkpt_dir, name))


def read_result(chkpt_dir: str, name: str) -> dict[str, Any]:
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
    return os.path.join(state_dir, "failed", name + ".json")


# ---------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------

_HELD: set[str] = set()  # lock files held by this process
_EMPTY_LOCK_GRACE_S = 30.0  # an empty lock file older than this was left by a process killed while creating it
_GUARD_STALE_S = 60.0


def _proc_start(pid: int) -> str | None:
    """The start time of a process (Linux ``/proc``), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: str) -> dict[str, Any] | None:
    """The lock's content; ``{}`` when empty or unreadable (being written); None when gone."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else {}
    except json.JSONDecodeError:
        return {}


def stale_reason(path: str, info: dict[str, Any]) -> str | None:
    """Why the lock at ``path`` is stale, or None when its owner may still be running."""
    if not info:
        try:
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return "it vanished"
        return f"it is empty and {age:.0f} s old (its creator died while writing it)" if age > _EMPTY_LOCK_GRACE_S else None
    if info.get("host") != HOST:
        return None
    pid = int(info.get("pid", -1))
    if pid == os.getpid():
        return None if os.path.abspath(path) in _HELD else f"this process (pid {pid}) does not hold it any more"
    if not _pid_alive(pid):
        return f"process {pid} on {HOST} is gone"
    start = info.get("pid_start")
    if start is not None and _proc_start(pid) not in (None, start):
        return f"pid {pid} now belongs to another process"
    return None


def try_lock(lock_dir: str, name: str, owner: str = "") -> str | None:
    """Claim run ``name``: create ``<lock_dir>/<name>.lock`` exclusively; None if taken.

    A stale lock (see :func:`stale_reason`) is taken over, with a warning in the log.
    Returns the lock path, to pass to :func:`release_lock`.
    """
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(lock_dir, name + ".lock"))
    info = {"host": HOST, "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "time": time.time(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "owner": owner}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if attempt == 0 and _take_over_if_stale(path):
                continue
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
            f.flush()
            os.fsync(f.fileno())
        _HELD.add(path)
        return path
    return None


def _take_over_if_stale(path: str) -> bool:
    """Remove ``path`` if it is a stale lock; True when the caller may try again."""
    info = _read_lock(path)
    if info is None:
        return True
    reason = stale_reason(path, info)
    if reason is None:
        return False
    guard = path + ".takeover"
    try:
        gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(guard) > _GUARD_STALE_S:
                os.unlink(guard)
        return False
    try:
        again = _read_lock(path)
        if again is None:
            return True
        if again != info:  # someone else took it over in between
            return False
        os.unlink(path)
        logger.warning("taking over the stale lock %s (%s)", path, reason)
        return True
    finally:
        os.close(gfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(guard)


def release_lock(path: str) -> None:
    """Remove a lock this process holds (only if it still holds our pid)."""
    _HELD.discard(path)
    info = _read_lock(path)
    if info is None:
        logger.warning("lock %s vanished while held", path)
        return
    if info and (info.get("host"), info.get("pid")) != (HOST, os.getpid()):
        logger.warning("lock %s now belongs to %s pid %s; leaving it", path, info.get("host"), info.get("pid"))
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def _remove_partial_run(chkpt_dir: str, name: str) -> list[str]:
    """Delete the files of a run that stopped before its first checkpoint (no ``_last.pt``)."""
    from engine import run_paths

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


def execute_run(run: Run, chkpt_dir: str, extra_argv: dict[str, list[str]] | None = None, log_dir: str | None = None) -> dict[str, Any]:
    """Run one training in this process: ``<script>.main(<script>.get_args_parser().parse_args(argv))``.

    Adds the execution flags ``extra_argv[run.kind]``, and ``--resume`` when the run has a
    ``<run>_last.pt``; a run that died before its first checkpoint has its partial files
    removed and starts over. A "no pretraining" fine-tuning first gets its random encoder
    (:func:`ensure_random_init`). With ``log_dir``, the run's log lines also go to
    ``<log_dir>/<run>.log``.

    Raises:
        UserError: the script refuses its arguments.
        TrainingError: the run ended without writing ``result.json``.
    """
    from engine import run_paths

    p = run_paths(chkpt_dir, run.name)
    argv = list(run.argv) + list((extra_argv or {}).get(run.kind, []))
    if run.init is not None:
        ensure_random_init(run.init)
    if os.path.isfile(p["last"]):
        argv.append("--resume")
        logger.info("%s: resuming from %s", run.name, p["last"])
    else:
        removed = _remove_partial_run(chkpt_dir, run.name)
        if removed:
            logger.warning("%s: stopped before its first checkpoint; removed %s and starting over", run.name, ", ".join(removed))
    mod = importlib.import_module(run.script)
    parser = mod.get_args_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        last = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise UserError(f"{run.script}.py refuses the arguments of run {run.name}: {last[-1] if last else 'bad arguments'}") from None
    handler = None
    with contextlib.ExitStack() as stack:
        if log_dir is not None:
            # the run's log lines and its printed summary go to <log_dir>/<run>.log
            os.makedirs(log_dir, exist_ok=True)
            log_file = stack.enter_context(open(os.path.join(log_dir, run.name + ".log"), "a", buffering=1))
            handler = logging.StreamHandler(log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
            logging.getLogger().addHandler(handler)
            stack.callback(logging.getLogger().removeHandler, handler)
            stack.enter_context(contextlib.redirect_stdout(log_file))
        t0 = time.perf_counter()
        out = mod.main(args)
    if not is_finished(chkpt_dir, run.name):
        raise TrainingError(f"run {run.name} returned without writing {result_path(chkpt_dir, run.name)}")
    logger.info("%s: finished in %.1f s", run.name, time.perf_counter() - t0)
    return out if isinstance(out, dict) else {}


@dataclass
class WorkerConfig:
    """What a worker needs besides the plan (plain data, so it crosses a spawn)."""

    chkpt_dir: str
    state_dir: str  # locks/, failed/, logs/ live here
    extra_argv: dict[str, list[str]] = field(default_factory=dict)  # execution flags per run kind
    poll_s: float = 2.0
    owner: str = "main"
    timings_path: str | None = None  # append one JSON line per finished run


def run_worker(plan: Sequence[Run], cfg: WorkerConfig, runner: Callable[..., dict] = execute_run) -> dict[str, list[str]]:
    """Claim and run runs until every run is finished, failed, or blocked by a failed one.

    Returns ``{"done": [...], "failed": [...], "blocked": [...]}`` (this worker's view).

    Raises:
        UserError: a run refused its arguments (every run would; the grid stops). Its
            failure is recorded so that other workers stop too.
    """
    lock_dir = os.path.join(cfg.state_dir, "locks")
    done: list[str] = []
    mine_failed: list[str] = []
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
            lock = try_lock(lock_dir, r.name, cfg.owner)
            if lock is None:
                continue
            if is_finished(cfg.chkpt_dir, r.name):  # finished between the scan and the lock
                release_lock(lock)
                continue
            claimed = (r, lock)
            break
        if claimed is None:
            key = ",".join(sorted(r.name for r in pending))
            if key not in waiting_logged:
                waiting_logged.add(key)
                logger.info("waiting: %d run(s) left, all running elsewhere or waiting for their pretraining", len(pending))
            time.sleep(cfg.poll_s)
            continue
        run, lock = claimed
        logger.info("starting %s (%s, row %s)", run.name, run.kind, run.row)
        t0 = time.time()
        try:
            runner(run, cfg.chkpt_dir, cfg.extra_argv, os.path.join(cfg.state_dir, "logs"))
        except UserError as e:
            _record_failure(cfg, run, e)
            raise
        except Exception as e:  # noqa: BLE001 - one failed run (TrainingError, a crash) must not stop the grid
            logger.error("run %s failed: %s: %s", run.name, type(e).__name__, e)
            _record_failure(cfg, run, e)
            mine_failed.append(run.name)
        else:
            done.append(run.name)
            if cfg.timings_path:
                append_jsonl(cfg.timings_path, {"run": run.name, "kind": run.kind, "seconds": round(time.time() - t0, 2), "owner": cfg.owner, "host": HOST})
        finally:
            release_lock(lock)


def _record_failure(cfg: WorkerConfig, run: Run, e: BaseException) -> None:
    atomic_write_json(failed_path(cfg.state_dir, run.name), {"run": run.name, "error": f"{type(e).__name__}: {e}", "host": HOST, "pid": os.getpid(), "time": time.time()})


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


def worker_entry(plan_dicts: list[dict], cfg_dict: dict, env: dict[str, str], n_threads: int, log_level: int) -> None:
    """Entry point of a spawned worker process (``--workers K`` / ``--gpus``).

    Sets its environment (``CUDA_VISIBLE_DEVICES``) before torch touches CUDA, its torch
    thread count, and its log format (prefixed with the worker name); exit code 0 when it
    ran out of runs, 2 on a UserError, 1 when a run failed.
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
    import torch

    torch.set_num_threads(max(1, n_threads))
    plan = [Run.from_dict(d) for d in plan_dicts]
    try:
        out = run_worker(plan, cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(1 if out["failed"] else 0)


# ---------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------


def _scores_file(recorded: str, chkpt_dir: str, name: str) -> str:
    """The per-organ scores file of a run.

    The recorded path is used when it exists; otherwise (the results folder was moved
    or mounted elsewhere) the same path relative to the run's ``<run>_files`` folder.
    """
    if os.path.isfile(recorded):
        return recorded
    from engine import run_paths

    files = run_paths(chkpt_dir, name)["dir"]
    marker = f"{name}_files{os.sep}"
    if marker in recorded:
        moved = os.path.join(files, recorded.split(marker, 1)[1])
        if os.path.isfile(moved):
            return moved
    raise UserError(f"run {name}: its scores file {recorded!r} does not exist")


def collect(plan: Sequence[Run], rows: Sequence[Row], chkpt_dir: str) -> dict[str, dict[str, Any]]:
    """Read every finished fine-tuning's ``result.json`` (and per-organ scores) per row.

    Returns ``{row_key: {"label", "runs": [run names in DSC order], "dsc": [float or None],
    "summary": [summary dict or None], "organs": [per_organ dict or None]}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        runs = [r for r in plan if r.kind == "finetune" and r.row == row.key]
        entry = {"label": row.label, "runs": [r.name for r in runs], "dsc": [], "summary": [], "organs": []}
        for r in runs:
            if not is_finished(chkpt_dir, r.name):
                entry["dsc"].append(None)
                entry["summary"].append(None)
                entry["organs"].append(None)
                continue
            res = read_result(chkpt_dir, r.name)
            path = result_path(chkpt_dir, r.name)
            dsc = res.get("best_dice_paper")
            if not isinstance(dsc, (int, float)) or isinstance(dsc, bool) or not math.isfinite(dsc):
                raise UserError(f"{path} has no finite 'best_dice_paper' (found {dsc!r})")
            entry["dsc"].append(float(dsc))
            entry["summary"].append(res.get("summary"))
            organs = None
            if res.get("scores"):
                sp = _scores_file(str(res["scores"]), chkpt_dir, r.name)
                try:
                    with open(sp) as f:
                        organs = json.load(f)["summary"]
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"cannot read the per-organ scores {sp} of run {r.name}: {e}") from None
            entry["organs"].append(organs)
        out[row.key] = entry
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and POPULATION standard deviation (ddof=0), as the paper's ``±``."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

STD_NOTE = (
    "Mean ± std over the row's runs; std is the population standard deviation (ddof=0), "
    "which reproduces the paper's ± from its four listed DSCs (to within their rounding)."
)


def _fmt(v: float | None, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def table_rows(rows: Sequence[Row], collected: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per row: interval, mean, std, dsc list, paper numbers, runs finished."""
    out = []
    for row in rows:
        c = collected[row.key]
        got = [d for d in c["dsc"] if d is not None]
        mean, std = mean_std(got) if got else (None, None)
        paper = PAPER_TABLE.get(row.key)
        out.append({
            "key": row.key, "interval": row.label, "min_iou": row.min_iou, "max_iou": row.max_iou,
            "mean": mean, "std": std, "dsc": list(c["dsc"]),
            "paper_mean": paper["mean"] if paper else None, "paper_std": paper["std"] if paper else None,
            "n_finished": len(got), "n_runs": len(c["dsc"]),
        })
    return out


def render_table(rows: Sequence[Row], collected: dict[str, dict[str, Any]], out_dir: str, title: str = "") -> dict[str, str]:
    """Write ``table.md`` and ``table.csv`` (rows in the given order); return paths and the Markdown."""
    trs = table_rows(rows, collected)
    n = max(t["n_runs"] for t in trs)
    head = ["IoU interval", "Mean DSC ± std"] + [f"DSC {i}" for i in range(1, n + 1)] + ["Paper: mean ± std", "Runs finished"]
    md = []
    if title:
        md += [f"# {title}", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for t in trs:
        ours = "—" if t["mean"] is None else f"{t['mean']:.3f} ± {t['std']:.3f}"
        dsc = [_fmt(d) for d in t["dsc"]] + [""] * (n - len(t["dsc"]))
        paper = "—" if t["paper_mean"] is None else f"{t['paper_mean']:.3f} ± {t['paper_std']:.3f}"
        md.append("| " + " | ".join([t["interval"], ours, *dsc, paper, f"{t['n_finished']}/{t['n_runs']}"]) + " |")
    md += ["", STD_NOTE, ""]
    text = "\n".join(md)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["interval", "min_iou", "max_iou", "mean_dsc", "std_dsc"] + [f"dsc_{i}" for i in range(1, n + 1)] + ["paper_mean", "paper_std", "n_finished", "n_runs"])
    for t in trs:
        w.writerow([t["interval"], _csv(t["min_iou"]), _csv(t["max_iou"]), _csv(t["mean"]), _csv(t["std"])]
                   + [_csv(d) for d in t["dsc"]] + [""] * (n - len(t["dsc"]))
                   + [_csv(t["paper_mean"]), _csv(t["paper_std"]), t["n_finished"], t["n_runs"]])
    md_path, csv_path = os.path.join(out_dir, "table.md"), os.path.join(out_dir, "table.csv")
    atomic_write_text(md_path, text)
    atomic_write_text(csv_path, buf.getvalue())
    return {"md": md_path, "csv": csv_path, "text": text}


def _csv(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6f}" if isinstance(v, float) else str(v)


def organ_means(rows: Sequence[Row], collected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: per organ Dice and NSD averaged over the row's finished runs, and their means.

    Returns ``{row_key: {"n_runs", "organs": {name: {"organ_id", "dice", "nsd"}}, "dice_mean", "nsd_mean"}}``
    (rows without any per-organ scores are left out).
    """
    out = {}
    for row in rows:
        summaries = [s for s in collected[row.key]["organs"] if s]
        if not summaries:
            continue
        names = list(summaries[0]["per_organ"])
        organs = {}
        for name in names:
            vals = [s["per_organ"][name] for s in summaries if name in s["per_organ"]]
            organs[name] = {
                "organ_id": vals[0].get("organ_id"),
                "dice": float(np.mean([v["dice"] for v in vals])),
                "nsd": float(np.mean([v["nsd"] for v in vals])),
            }
        out[row.key] = {
            "n_runs": len(summaries),
            "organs": organs,
            "dice_mean": float(np.mean([s["dice_mean"] for s in summaries])),
            "nsd_mean": float(np.mean([s["nsd_mean"] for s in summaries])),
        }
    return out


def render_organs(rows: Sequence[Row], collected: dict[str, dict[str, Any]], out_dir: str) -> dict[str, str]:
    """Write ``organs.md`` (a Dice table and an NSD table: organs x intervals) and ``organs.csv``."""
    means = organ_means(rows, collected)
    present = [r for r in rows if r.key in means]
    md = ["# Challenge-grade scores per organ", "",
          "Per-organ Dice and normalised surface Dice (NSD) on the validation cases (FLARE 2022 conventions), "
          "each the mean over cases, then averaged over the row's finished fine-tunings.", ""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["interval", "organ_id", "organ", "dice", "nsd", "n_runs"])
    if not present:
        md.append("(no finished fine-tuning yet)")
    else:
        organ_names: list[str] = []
        for r in present:
            for name in means[r.key]["organs"]:
                if name not in organ_names:
                    organ_names.append(name)
        for metric, title in (("dice", "Dice"), ("nsd", "NSD")):
            md += [f"## {title}", "", "| Organ | " + " | ".join(r.label for r in present) + " |",
                   "|" + "|".join(["---"] * (len(present) + 1)) + "|"]
            for name in organ_names:
                vals = [means[r.key]["organs"].get(name, {}).get(metric) for r in present]
                md.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
            md.append("| **mean** | " + " | ".join(_fmt(means[r.key][f"{metric}_mean"]) for r in present) + " |")
            md.append("| runs | " + " | ".join(str(means[r.key]["n_runs"]) for r in present) + " |")
            md.append("")
        for r in present:
            m = means[r.key]
            for name, o in m["organs"].items():
                w.writerow([r.label, o["organ_id"], name, _csv(o["dice"]), _csv(o["nsd"]), m["n_runs"]])
            w.writerow([r.label, "", "mean", _csv(m["dice_mean"]), _csv(m["nsd_mean"]), m["n_runs"]])
    md_path, csv_path = os.path.join(out_dir, "organs.md"), os.path.join(out_dir, "organs.csv")
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(csv_path, buf.getvalue())
    return {"md": md_path, "csv": csv_path}


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    from utils import atomic_write

    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def read_log(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a run log (missing file -> empty list)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for ln in f:
            if ln.strip():
                out.append(json.loads(ln))
    return out


def collapse_curves(plan: Sequence[Run], rows: Sequence[Row], chkpt_dir: str, key: str = "collapse") -> dict[str, dict[str, list[float]]]:
    """Per pretrained row: epochs and the collapse coefficient averaged over its pretrainings.

    Only epochs logged by every pretraining of the row are kept. Returns
    ``{row_key: {"epoch": [...], "mean": [...], "n_runs": k}}``.
    """
    from engine import run_paths

    out = {}
    for row in rows:
        runs = [r for r in plan if r.kind == "pretrain" and r.row == row.key]
        series = []
        for r in runs:
            recs = [rec for rec in read_log(run_paths(chkpt_dir, r.name)["log"]) if key in rec and "epoch" in rec]
            if recs:
                series.append({int(rec["epoch"]): float(rec[key]) for rec in recs})
        if not series:
            continue
        epochs = sorted(set.intersection(*(set(s) for s in series)))
        if not epochs:
            continue
        out[row.key] = {"epoch": epochs, "mean": [float(np.mean([s[e] for s in series])) for e in epochs], "n_runs": len(series)}
    return out


def plot_collapse(curves: dict[str, dict[str, list[float]]], rows: Sequence[Row], path: str) -> str | None:
    """``collapse.png``: the collapse coefficient over pretraining epochs, one line per interval."""
    present = [r for r in rows if r.key in curves]
    if not present:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in present:
        c = curves[r.key]
        ax.plot(c["epoch"], c["mean"], marker="o" if len(c["epoch"]) < 15 else None, label=f"{r.label} (n={c['n_runs']})")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("collapse coefficient  max(0, 1 - sqrt(d) s)")
    ax.set_title("Collapse of the SimSiam predictor output (mean over pretrainings)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    return path


def organ_sharing(label_paths: Sequence[str], rows: Sequence[Row], crop_size: int, n_pairs: int = 2000, seed: int = 0, strict: bool = False) -> dict[str, dict[str, float]]:
    """Per interval: the fraction of positive pairs whose two crops share at least one organ.

    Pairs are drawn on the labelled 2D slices that contain at least one organ and are at
    least ``crop_size`` on both axes: a slice uniformly at random, then a crop pair from
    ``iou_crops.IoUCropSampler`` (same ``strict`` as pretraining), all from one numpy
    generator seeded with ``seed``. Two crops share an organ when some organ id > 0 occurs
    in both. Returns ``{row_key: {"fraction", "n_pairs", "n_slices", "mean_iou"}}``.

    Raises:
        UserError: no labelled slice is usable.
    """
    from data import read_label_2d
    from iou_crops import IoUCropSampler, crop_iou

    labels = []
    for p in label_paths:
        lab = read_label_2d(p)
        if lab.max() > 0 and min(lab.shape) >= crop_size:
            labels.append(lab)
    if not labels:
        raise UserError(f"none of the {len(label_paths)} labelled slices has an organ and is at least {crop_size} pixels on both axes")
    out = {}
    for row in rows:
        if not row.pretrained:
            continue
        sampler = IoUCropSampler(crop_size, row.min_iou, row.max_iou, strict)
        rng = np.random.default_rng(seed)
        shared = 0
        ious = []
        for _ in range(n_pairs):
            lab = labels[int(rng.integers(len(labels)))]
            a, b = sampler.sample(lab.shape, rng)
            ca = lab[a[0]:a[0] + crop_size, a[1]:a[1] + crop_size]
            cb = lab[b[0]:b[0] + crop_size, b[1]:b[1] + crop_size]
            oa = np.unique(ca)
            ob = np.unique(cb)
            if np.intersect1d(oa[oa > 0], ob[ob > 0]).size:
                shared += 1
            ious.append(crop_iou(a, b, crop_size))
        out[row.key] = {"fraction": shared / n_pairs, "n_pairs": n_pairs, "n_slices": len(labels), "mean_iou": float(np.mean(ious))}
    return out


def plot_organ_sharing(fractions: dict[str, dict[str, float]], rows: Sequence[Row], path: str, crop_size: int) -> str | None:
    """``organ_sharing.png``: bars of the organ-sharing fraction, the interval on x."""
    present = [r for r in rows if r.key in fractions]
    if not present:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    vals = [fractions[r.key]["fraction"] for r in present]
    bars = ax.bar(range(len(present)), vals, color="tab:blue")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(present)), [r.label for r in present], rotation=15, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("IoU interval of the positive pairs")
    ax.set_ylabel("fraction of pairs sharing an organ")
    f0 = fractions[present[0].key]
    ax.set_title(f"Positive pairs whose crops share at least one organ\n({f0['n_pairs']} pairs per interval, "
                 f"{crop_size}x{crop_size} crops, {f0['n_slices']} labelled slices with organs)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _save_fig(fig, path)
    return path


def plot_crop_pairs(image_path: str, label_path: str | None, rows: Sequence[Row], path: str, crop_size: int, n_examples: int = 3, seed: int = 0, strict: bool = False) -> str | None:
    """``crop_pairs.png``: example crop pairs of each interval on one labelled slice.

    One row of panels per interval: the slice (organ outlines when a label is given) with
    the two crops of a pair as a red and a blue square and their IoU in the title.
    """
    from data import read_image_2d, read_label_2d
    from iou_crops import IoUCropSampler, crop_iou

    present = [r for r in rows if r.pretrained]
    if not present:
        return None
    img = read_image_2d(image_path)
    lab = read_label_2d(label_path) if label_path else None
    if min(img.shape) < crop_size:
        raise UserError(f"slice {image_path} ({img.shape}) is smaller than the crop size {crop_size}")
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(present), n_examples, figsize=(2.2 * n_examples + 0.4, 2.3 * len(present) + 0.4), squeeze=False,
                             layout="constrained")
    for i, r in enumerate(present):
        sampler = IoUCropSampler(crop_size, r.min_iou, r.max_iou, strict)
        rng = np.random.default_rng(seed)
        for j in range(n_examples):
            ax = axes[i][j]
            a, b = sampler.sample(img.shape, rng)
            # arrays are (X, Y); show x horizontally and y vertically (anterior up)
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=1)
            if lab is not None and lab.max() > 0:
                ax.contour((lab.T > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.5, origin="lower")
            for start, color in ((a, "red"), (b, "deepskyblue")):
                ax.add_patch(Rectangle((start[0] - 0.5, start[1] - 0.5), crop_size, crop_size, fill=False, edgecolor=color, linewidth=1.5))
            ax.set_title(f"IoU {crop_iou(a, b, crop_size):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(r.label, fontsize=8)
    fig.suptitle(f"Example positive pairs per IoU interval ({crop_size}x{crop_size} crops)", fontsize=9)
    _save_fig(fig, path)
    return path

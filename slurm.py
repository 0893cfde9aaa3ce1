"""The grid on a SLURM cluster: one job per run through submitit, each fine-tuning after its pretraining.

``reproduce_table.py --launcher slurm`` calls :func:`launch_slurm` with the grid's plan::

    # the paper's grid on 4-GPU nodes: 10 pretraining jobs, 24 fine-tuning jobs (afterok on their pretraining)
    python reproduce_table.py --preset paper --output_dir table_flare \\
        --unlabelled_dir flare_2d/unlabelled --labelled_dir flare_2d/labelled \\
        --launcher slurm --slurm_partition gpu --slurm_gpus_per_job 4 --slurm_cpus_per_task 8 --slurm_time_min 1440
    squeue -u $USER -o "%.10i %.34j %.9T %.10M %R"      # the jobs, named after their runs
    python reproduce_table.py ... --launcher slurm      # again: skips finished and queued runs, resubmits failed ones
    python reproduce_table.py ... --collect_only        # the table of the runs finished so far

A job is ``srun`` of submitit's runner with ``--slurm_gpus_per_job`` tasks (at least one), each
calling :meth:`SlurmRun.__call__`, which runs :func:`runqueue.execute_run` of its run; the
training scripts set up ``torch.distributed`` from SLURM's variables (``utils.launch_env``).
A fine-tuning job waits for its pretraining job (``--dependency=afterok:<id>``, cancelled by
SLURM when that job fails: ``--kill-on-invalid-dep=yes``); a fine-tuning whose pretraining
finished earlier starts at once. With ``--slurm_max_parallel K`` the jobs are named
``<grid>_slot<i>`` for i < K with ``--dependency=singleton``, so at most K of them run at a
time (the run's name is then in the job's comment: ``squeue -o "%.10i %.9T %k"``).

Time limits and preemption: SLURM sends ``USR2`` 90 s before a job's limit (``--signal``)
and on preemption; submitit then calls :meth:`SlurmRun.checkpoint` and requeues the job
(``scontrol requeue``, same job id, dependencies intact); the requeued job runs the run
again, which resumes from its last epoch checkpoint (``--resume``). A job whose whole time
slot passed without one finished epoch is not requeued (the limit is too short for an epoch).

Bookkeeping in ``<output_dir>/state/slurm_jobs.json``: for every run its current job (id,
name, submission time, dependency, attempt), written once all jobs of a submission are in
the queue. Submitting again looks each recorded job up in ``squeue --states=all``: a run
whose job is queued or running is left alone; a run whose job ended without the run's
``result.json`` (failed, cancelled, out of time, purged from SLURM's memory) is resubmitted
and reported. Job logs (submitit's pickles, stdout and stderr of every task) go to
``<output_dir>/slurm/<job id>_<task>_log.{out,err}``; each run's own log lines also go to
``<output_dir>/state/logs/<run>.log``, and every finished run appends a line to
``state/timings.jsonl`` (start, end, job id).

Bad input (no ``sbatch`` on the PATH, a partition or account SLURM does not know, ``sbatch``
refusing a job) stops with one line that quotes SLURM's message, exit code 2; jobs this
submission had queued already are cancelled and nothing is recorded as submitted.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import submitit
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

import runqueue
from engine import run_paths
from runqueue import Run, Trainer
from utils import UserError, append_jsonl, atomic_write_json, setup_logging

logger = logging.getLogger(__name__)

#: ``<state_dir>/slurm_jobs.json``: the current job of every submitted run.
JOBS_FILE = "slurm_jobs.json"
JOBS_FORMAT = "ioupos-slurm-jobs-v1"
#: Job states of a job that is still going to run (or runs): its run is not submitted again.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "SPECIAL_EXIT",
        "RESV_DEL_HOLD",
    }
)
#: The pending reason of a job whose dependency can never be satisfied (its pretraining failed).
DEAD_DEPENDENCY = "DependencyNeverSatisfied"
#: sbatch options that the launcher sets itself, refused in ``--slurm_extra`` (the flag to use instead, if any).
RESERVED_OPTIONS = {
    "dependency": None,
    "d": None,
    "job-name": None,
    "J": None,
    "output": None,
    "o": None,
    "error": None,
    "e": None,
    "open-mode": None,
    "signal": None,
    "array": None,
    "a": None,
    "comment": None,
    "wrap": None,
    "ntasks": "--slurm_gpus_per_job",
    "n": "--slurm_gpus_per_job",
    "ntasks-per-node": "--slurm_gpus_per_job",
    "nodes": None,
    "N": None,
    "partition": "--slurm_partition",
    "p": "--slurm_partition",
    "time": "--slurm_time_min",
    "t": "--slurm_time_min",
    "account": "--slurm_account",
    "A": "--slurm_account",
    "qos": "--slurm_qos",
    "q": "--slurm_qos",
    "mem": "--slurm_mem_gb",
    "cpus-per-task": "--slurm_cpus_per_task",
    "c": "--slurm_cpus_per_task",
    "gpus-per-node": "--slurm_gpus_per_job",
    "gres": "--slurm_gpus_per_job",
}
#: A job's requeues after its time limit before submitit gives up (each requeue resumes the run;
#: :meth:`SlurmRun.checkpoint` stops earlier when a time slot passed without a finished epoch).
MAX_TIMEOUT_REQUEUES = 1000


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@dataclass
class SlurmConfig:
    """The resources and options of every job of a grid."""

    partition: str | None = None
    gpus_per_job: int = 1  # also the number of tasks (ranks) per job; 0: one CPU-only task
    cpus_per_task: int = 8
    mem_gb: float = 0.0  # per job; 0: the partition's default
    time_min: int = 1440
    account: str | None = None
    qos: str | None = None
    max_parallel: int = 0  # 0: no limit of the launcher's own
    extra: dict[str, Any] = field(default_factory=dict)  # further sbatch options
    setup: list[str] = field(default_factory=list)  # shell lines run before the job's srun

    @property
    def ranks(self) -> int:
        """Processes (``srun`` tasks) of each job: one per GPU, one without GPUs."""
        return max(1, self.gpus_per_job)

    def check(self) -> None:
        """Raises UserError for a value SLURM would refuse later or that makes no sense."""
        if self.gpus_per_job < 0:
            raise UserError(f"--slurm_gpus_per_job must be at least 0, got {self.gpus_per_job}")
        if self.cpus_per_task < 1:
            raise UserError(f"--slurm_cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.mem_gb < 0:
            raise UserError(f"--slurm_mem_gb must be at least 0 (0: the partition's default), got {self.mem_gb:g}")
        if self.time_min < 1:
            raise UserError(f"--slurm_time_min must be at least 1, got {self.time_min}")
        if self.max_parallel < 0:
            raise UserError(f"--slurm_max_parallel must be at least 0 (0: no limit), got {self.max_parallel}")


def parse_sbatch_extra(text: str) -> dict[str, Any]:
    """``--slurm_extra`` -> sbatch options: ``"--constraint=v100 --exclusive --nice 10"`` ->
    ``{"constraint": "v100", "exclusive": True, "nice": "10"}``.

    Raises:
        UserError: not ``--option[=value]`` words, or an option the launcher sets itself.
    """
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--slurm_extra {text!r}: {e}") from None
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("--") or len(w) < 3:
            raise UserError(
                f"--slurm_extra {text!r}: {w!r} is not a long sbatch option; write options as --name=value or --name"
            )
        name, eq, value = w[2:].partition("=")
        if not eq:
            if i + 1 < len(words) and not words[i + 1].startswith("-"):
                value, i = words[i + 1], i + 1
            else:
                value = True
        if name in RESERVED_OPTIONS:
            instead = RESERVED_OPTIONS[name]
            raise UserError(
                f"--slurm_extra sets --{name}, which the launcher sets itself"
                + (f"; use {instead}" if instead else " (one job per run, logs in <output_dir>/slurm)")
            )
        out[name] = value
        i += 1
    return out


def grid_id(output_dir: str) -> str:
    """A short tag of a grid's folder for job names (``ioupos_<6 hex>``)."""
    return "ioupos_" + hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:6]


# ---------------------------------------------------------------------------------------
# Talking to SLURM
# ---------------------------------------------------------------------------------------


class JobState(NamedTuple):
    """What ``squeue`` says of a job."""

    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str
    comment: str

    @property
    def active(self) -> bool:
        """Queued or running, and not waiting for a dependency that failed."""
        return self.state in ACTIVE_STATES and not self.dead_dependency

    @property
    def dead_dependency(self) -> bool:
        """Pending for a dependency that can never be satisfied (its pretraining job failed)."""
        return self.state == "PENDING" and self.reason == DEAD_DEPENDENCY


def require_slurm(tools: Sequence[str] = ("sbatch", "squeue", "scancel", "srun")) -> None:
    """Raises UserError when a SLURM command is not on the PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise UserError(
                f"--launcher slurm needs SLURM's {tool} on the PATH, and there is none "
                "(run this on a login node of the cluster, or load SLURM's module)"
            )


def slurm_message(text: str) -> str:
    """SLURM's error lines as one line: ``"sbatch: error: A\\nsbatch: error: B"`` -> ``"A; B"``."""
    lines = []
    for ln in text.strip().splitlines():
        ln = ln.strip()
        for prefix in ("sbatch: error: ", "squeue: error: ", "scancel: error: ", "error: "):
            if ln.startswith(prefix):
                ln = ln[len(prefix) :]
                break
        if ln and ln not in lines:
            lines.append(ln)
    return "; ".join(lines) or "no message"


def _run_cmd(cmd: list[str], tries: int = 3) -> str:
    """Run a SLURM query; retries a few times (slurmctld may be busy), then UserError with its message."""
    for attempt in range(tries):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout
        if attempt + 1 < tries:
            time.sleep(2.0 * (attempt + 1))
    raise UserError(f"{' '.join(cmd[:2])} failed: {slurm_message(p.stderr or p.stdout)}")


def query_jobs(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The state of each of ``job_ids`` that SLURM still knows (``squeue --states=all`` of this
    user: queued, running and recently ended jobs; long-ended jobs are absent)."""
    ids = {str(j) for j in job_ids}
    if not ids:
        return {}
    out = _run_cmd(["squeue", "--noheader", "--states=all", "--user", getpass.getuser(), "--format=%i|%T|%r|%k"])
    found: dict[str, JobState] = {}
    for line in out.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[0] in ids:
            found[parts[0]] = JobState(parts[1], parts[2], parts[3])
    return found


def cancel_jobs(job_ids: Iterable[str]) -> None:
    """``scancel`` the jobs (errors are logged, not raised: this runs while cleaning up)."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return
    p = subprocess.run(["scancel", *ids], capture_output=True, text=True)
    if p.returncode != 0:
        logger.warning("scancel %s: %s", " ".join(ids), slurm_message(p.stderr))


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


class SlurmRun(submitit.helpers.Checkpointable):
    """What one job runs in each of its tasks: :func:`runqueue.execute_run` of one run.

    Pickled by submitit (by reference to this module, which the job imports from the
    project folder on its ``PYTHONPATH``), so every field is plain data or module-level
    functions (``trainers``).
    """

    def __init__(
        self,
        run: Run,
        chkpt_dir: str,
        state_dir: str,
        extra_argv: dict[str, list[str]],
        time_min: int,
        trainers: Mapping[str, Trainer] | None = None,
    ):
        self.run = run
        self.chkpt_dir = chkpt_dir
        self.state_dir = state_dir
        self.extra_argv = extra_argv
        self.time_min = time_min
        self.trainers = trainers
        self._t_start = 0.0
        self._last_mtime: int | None = None

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        rank = env.global_rank
        setup_logging(rank=rank)
        logging.getLogger("submitit").propagate = False  # it has its own handler: no line twice
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if cpus:
            torch.set_num_threads(cpus)
        self._t_start = time.time()
        self._last_mtime = _mtime(run_paths(self.chkpt_dir, self.run.name)["last"])
        logger.info("job %s task %d of %d: run %s", env.job_id, rank, env.num_tasks, self.run.name)
        runqueue.execute_run(
            self.run,
            self.chkpt_dir,
            self.extra_argv,
            os.path.join(self.state_dir, "logs") if rank == 0 else None,
            self.trainers,
            rank=rank,
        )
        if rank == 0:
            append_jsonl(
                os.path.join(self.state_dir, "timings.jsonl"),
                runqueue.timing_record(
                    self.run, self._t_start, time.time(), job_id=str(env.job_id), ranks=env.num_tasks
                ),
            )
        return {"run": self.run.name, "job_id": str(env.job_id)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 when SLURM signals the time limit or a preemption:
        the same run again (a fresh object), which resumes from the run's last checkpoint;
        None (no requeue) when the job used its whole time slot without finishing an epoch."""
        elapsed = time.time() - self._t_start
        limit = self.time_min * 60.0
        timed_out = elapsed >= min(0.8 * limit, limit - 600.0)  # submitit's own test of a time-out
        progressed = _mtime(run_paths(self.chkpt_dir, self.run.name)["last"]) != self._last_mtime
        if timed_out and not progressed:
            logger.error(
                "%s: no epoch finished within the job's %d min; not requeued (raise --slurm_time_min)",
                self.run.name,
                self.time_min,
            )
            return None
        logger.warning(
            "%s: %s after %.0f s; requeued, the run resumes from its last checkpoint",
            self.run.name,
            "time limit" if timed_out else "preempted",
            elapsed,
        )
        fresh = SlurmRun(self.run, self.chkpt_dir, self.state_dir, self.extra_argv, self.time_min, self.trainers)
        return submitit.helpers.DelayedSubmission(fresh)


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def jobs_path(state_dir: str) -> str:
    """``<state_dir>/slurm_jobs.json``."""
    return os.path.join(state_dir, JOBS_FILE)


def load_records(state_dir: str) -> dict[str, dict[str, Any]]:
    """The recorded job of each submitted run (``{}`` before the first submission).

    Raises:
        UserError: the file is unreadable or of another format.
    """
    path = jobs_path(state_dir)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != JOBS_FORMAT or not isinstance(obj.get("jobs"), dict):
        raise UserError(f"{path} is not a job list of this version ({JOBS_FORMAT}); move it away to start over")
    return obj["jobs"]


def save_records(state_dir: str, records: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(jobs_path(state_dir), {"format": JOBS_FORMAT, "jobs": records})


def active_jobs_of_grid(state_dir: str, plan: Sequence[Run]) -> dict[str, str]:
    """``{run: job id}`` of the grid's recorded jobs that are queued or running (for the local
    launcher, which must not run them a second time). ``{}`` without records; without
    ``squeue`` on this machine the records cannot be checked: a warning, and ``{}``."""
    records = load_records(state_dir)
    if not any(r.name in records for r in plan):
        return {}
    if shutil.which("squeue") is None:
        logger.warning(
            "%s records SLURM jobs of this grid, but there is no squeue here to check whether they still run",
            jobs_path(state_dir),
        )
        return {}
    states = _recorded_states(records, plan)
    return {name: str(records[name]["job_id"]) for name, st in states.items() if st is not None and st.active}


def _recorded_states(records: dict[str, dict[str, Any]], plan: Sequence[Run]) -> dict[str, JobState | None]:
    """``{run: squeue's state of its recorded job}`` for the runs of ``plan`` with a record (in
    the records' order); ``None`` when squeue no longer knows the job or its id names another
    job now (the comment differs: the cluster's ids started over)."""
    names = {r.name for r in plan}
    recorded = {name: str(rec["job_id"]) for name, rec in records.items() if name in names}
    states = query_jobs(recorded.values())
    out: dict[str, JobState | None] = {}
    for name, job_id in recorded.items():
        st = states.get(job_id)
        out[name] = st if st is not None and st.comment == _job_comment(name) else None
    return out


# ---------------------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------------------


@dataclass
class Submission:
    """What :func:`launch_slurm` found and did, run by run."""

    finished: list[str] = field(default_factory=list)  # result.json exists: not submitted
    active: dict[str, str] = field(default_factory=dict)  # run -> job id queued or running: left alone
    submitted: dict[str, str] = field(default_factory=dict)  # run -> new job id
    resubmitted: dict[str, str] = field(default_factory=dict)  # run -> why the earlier job did not finish it
    depends: dict[str, str] = field(default_factory=dict)  # run -> job id it waits for

    @property
    def jobs(self) -> dict[str, str]:
        """Every run with a job in the queue after this submission."""
        return {**self.active, **self.submitted}


def _job_comment(name: str) -> str:
    return f"ioupos {name}"


def _executor(folder: str, cfg: SlurmConfig, project_root: str) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
    params: dict[str, Any] = {
        "time": int(cfg.time_min),
        "nodes": 1,
        "ntasks_per_node": cfg.ranks,
        "cpus_per_task": int(cfg.cpus_per_task),
        # the job imports this module and the training scripts from the project folder
        "setup": [f"export PYTHONPATH={shlex.quote(project_root)}${{PYTHONPATH:+:$PYTHONPATH}}", *cfg.setup],
    }
    if cfg.gpus_per_job > 0:
        params["gpus_per_node"] = int(cfg.gpus_per_job)
    if cfg.mem_gb > 0:
        params["mem"] = f"{int(cfg.mem_gb)}GB" if float(cfg.mem_gb).is_integer() else f"{int(cfg.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos"):
        value = getattr(cfg, key)
        if value:
            params[key] = value
    ex.update_parameters(**params)
    return ex


def launch_slurm(
    plan: Sequence[Run],
    chkpt_dir: str,
    state_dir: str,
    log_dir: str,
    extra_argv: dict[str, list[str]],
    cfg: SlurmConfig,
    project_root: str,
    job_prefix: str,
    trainers: Mapping[str, Trainer] | None = None,
) -> Submission:
    """Submit one job per unfinished run of ``plan`` that has no job queued or running.

    Pretrainings first, then fine-tunings: one whose pretraining is queued or running (or
    submitted now) gets ``--dependency=afterok:<its job>``; one whose pretraining finished
    earlier starts at once. Runs are skipped when finished (``result.json``) or when their
    recorded job is still queued or running; a run whose recorded job ended without
    finishing it is resubmitted (named in :attr:`Submission.resubmitted`). The records are
    written once every job is queued.

    Args:
        log_dir: submitit's folder (job scripts, pickles, task logs): ``<output_dir>/slurm``.
        extra_argv: execution flags per run kind (``--device`` ...), as for the local launcher.
        project_root: the folder of this module and the training scripts (the jobs' PYTHONPATH).
        job_prefix: job names with ``cfg.max_parallel`` (:func:`grid_id`).
        trainers: the training scripts by name (default :data:`runqueue.TRAINERS`).

    Raises:
        UserError: no SLURM here, another submission or a local launch of this grid is
            under way, or sbatch refused a job (its message; the jobs queued by this call
            are cancelled and nothing is recorded).
    """
    require_slurm()
    cfg.check()
    if runqueue.local_launch_running(state_dir):
        raise UserError(
            f"a local launch of this grid is running (it holds {runqueue.local_lock_path(state_dir)}); "
            "let it finish or stop it before submitting the grid to SLURM"
        )
    os.makedirs(state_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    lock = FileLock(os.path.join(state_dir, "slurm_submit.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another submission of this grid is under way (it holds {lock.lock_file})") from None
    try:
        return _launch(plan, chkpt_dir, state_dir, log_dir, extra_argv, cfg, project_root, job_prefix, trainers)
    finally:
        lock.release()


def _launch(
    plan: Sequence[Run],
    chkpt_dir: str,
    state_dir: str,
    log_dir: str,
    extra_argv: dict[str, list[str]],
    cfg: SlurmConfig,
    project_root: str,
    job_prefix: str,
    trainers: Mapping[str, Trainer] | None,
) -> Submission:
    records = load_records(state_dir)
    states = _recorded_states(records, plan)
    sub = Submission()
    todo: list[Run] = []
    dead: list[str] = []
    for run in plan:
        if runqueue.is_finished(chkpt_dir, run.name):
            sub.finished.append(run.name)
            continue
        if run.name not in states:  # no recorded job
            todo.append(run)
            continue
        job_id = str(records[run.name]["job_id"])
        st = states[run.name]
        if st is not None and st.active:
            sub.active[run.name] = job_id
            continue
        if st is not None and st.dead_dependency:  # waits for a pretraining job that failed
            dead.append(job_id)
            why = f"job {job_id} waited for a pretraining job that failed"
        elif st is not None:
            why = f"job {job_id} ended {st.state}" + (f" ({st.reason})" if st.reason not in ("None", "") else "")
        else:
            why = f"job {job_id} ended (no longer known to squeue)"
        sub.resubmitted[run.name] = f"{why}; log {os.path.join(log_dir, f'{job_id}_0_log.err')}"
        todo.append(run)
    cancel_jobs(dead)

    if not todo:
        return sub
    ex = _executor(log_dir, cfg, project_root)
    new_jobs: list[str] = []
    before = set(os.listdir(log_dir))
    new_records: dict[str, dict[str, Any]] = {}
    try:
        for i, run in enumerate(todo):
            dependency = []
            if run.depends is not None and not runqueue.is_finished(chkpt_dir, run.depends):
                dep_job = sub.submitted.get(run.depends) or sub.active.get(run.depends)
                if dep_job is None:  # not in this plan's queue: cannot happen for a plan from plan_grid
                    raise UserError(f"run {run.name} needs {run.depends}, which is neither finished nor queued")
                dependency.append(f"afterok:{dep_job}")
                sub.depends[run.name] = dep_job
            if cfg.max_parallel:
                name = f"{job_prefix}_slot{i % cfg.max_parallel}"
                dependency.append("singleton")
            else:
                name = run.name
            additional: dict[str, Any] = {**cfg.extra}
            if dependency:
                additional["dependency"] = ",".join(dependency)
                additional["kill-on-invalid-dep"] = "yes"
            ex.update_parameters(job_name=name, comment=_job_comment(run.name), additional_parameters=additional)
            fn = SlurmRun(run, chkpt_dir, state_dir, extra_argv, cfg.time_min, trainers)
            try:
                job = ex.submit(fn)
            except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
                raise UserError(f"sbatch refused the job of run {run.name}: {slurm_message(str(e))}") from None
            new_jobs.append(str(job.job_id))
            sub.submitted[run.name] = str(job.job_id)
            attempt = int(records.get(run.name, {}).get("attempt", 0)) + 1
            new_records[run.name] = {
                "job_id": str(job.job_id),
                "job_name": name,
                "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
                "depends_on": sub.depends.get(run.name),
                "attempt": attempt,
                "ranks": cfg.ranks,
                "log": os.path.join(log_dir, f"{job.job_id}_0_log.err"),
            }
            logger.info(
                "submitted %s as job %s%s",
                run.name,
                job.job_id,
                f" (after job {sub.depends[run.name]})" if run.name in sub.depends else "",
            )
    except BaseException:
        cancel_jobs(new_jobs)
        _remove_new_files(log_dir, before)
        raise
    save_records(state_dir, {**records, **new_records})
    return sub


def _remove_new_files(log_dir: str, before: set[str]) -> None:
    """Delete what a failed submission left in ``log_dir`` (job scripts, pickles)."""
    for name in set(os.listdir(log_dir)) - before:
        path = os.path.join(log_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------


def wait_for_jobs(
    jobs: Mapping[str, str],
    plan: Sequence[Run],
    chkpt_dir: str,
    poll_s: float = 10.0,
    progress: bool = True,
) -> dict[str, str]:
    """Wait until none of ``jobs`` (run -> job id) is queued or running; a progress bar counts
    finished runs. Returns ``{run: final state}`` of the jobs (``"gone"`` when SLURM
    forgot them). Ctrl-C stops the waiting, not the jobs."""
    total = len(plan)
    done = runqueue.n_finished(chkpt_dir, plan)
    bar = tqdm(total=total, initial=done, desc="grid (SLURM)", unit="run", disable=not progress, dynamic_ncols=True)
    final: dict[str, str] = {}
    try:
        while True:
            states = query_jobs(jobs.values())
            dead = [j for j in jobs.values() if j in states and states[j].dead_dependency]
            cancel_jobs(dead)
            active = [r for r, j in jobs.items() if j in states and states[j].active]
            bar.n = runqueue.n_finished(chkpt_dir, plan)
            bar.set_postfix_str(f"{len(active)} job(s) queued or running", refresh=True)
            if not active:
                final = {r: (states[j].state if j in states else "gone") for r, j in jobs.items()}
                return final
            time.sleep(poll_s)
    except KeyboardInterrupt:
        logger.warning("stopped waiting; the jobs keep running (squeue -u %s)", getpass.getuser())
        raise
    finally:
        bar.close()


def print_summary(sub: Submission, n_runs: int, out: Any = None) -> None:
    """One line per run with a job (job id, run, what happened) and a summary line, on stdout
    (the command's result)."""
    out = sys.stdout if out is None else out
    for run, job in sub.submitted.items():
        dep = f" after {sub.depends[run]}" if run in sub.depends else ""
        again = f" (again: {sub.resubmitted[run]})" if run in sub.resubmitted else ""
        print(f"{job}\t{run}\tsubmitted{dep}{again}", file=out)
    for run, job in sub.active.items():
        print(f"{job}\t{run}\tqueued or running already", file=out)
    print(
        f"# {n_runs} runs: {len(sub.finished)} finished, {len(sub.active)} queued or running already, "
        f"{len(sub.submitted)} submitted ({len(sub.resubmitted)} of them again)",
        file=out,
        flush=True,
    )

"""Tests of the grid and the training scripts on SLURM, against a real SLURM cluster.

``tests/slurm/start_local_slurm.sh`` starts a one-node SLURM on this machine (as root; .ci/run
does so before ``make test`` and sets ``IOUPOS_REQUIRE_SLURM=1``). Without a usable SLURM the
tests that submit jobs skip with the reason, or fail under ``IOUPOS_REQUIRE_SLURM=1``. The
parsing of SLURM's variables, the batch split over ranks and the missing-``sbatch`` error
need no cluster.

On the cluster: ``srun -n 2`` of a pretraining ends with the weights of ``torchrun
--nproc_per_node 2``; the demo grid (two rows, one seed) submitted with ``--launcher slurm``
gives the local launcher's table score for score, with every fine-tuning started after its
pretraining; a pretraining job preempted (USR2, as SLURM signals it) requeues itself and
resumes, one cancelled with ``scancel`` mid-run is resubmitted by the next submission and
resumes, and the table is still the local one; bad resources end in SLURM's own message,
with every job of the failed submission cancelled and nothing recorded.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import submitit
import torch

import reproduce_table as rt
import slurm
import utils
from conftest import free_port, wait_for
from data import encode_png_2d
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_SLURM = os.environ.get("IOUPOS_REQUIRE_SLURM") == "1"

PRE = "pre_iou0.30-0.60_s7"
FT = "ft_iou0.30-0.60_s7_ft1"
FT_NONE = "ft_none_init7_ft1"

# the demo grid reduced to two rows and one seed (3 runs) at the smallest size that still runs
# the real scripts; 6 pretraining epochs leave time to interrupt the pretraining mid-run
N_PRE_EPOCHS = 12  # enough for a cancel to land mid-run after the requeued job resumes
TINY = [
    "--preset",
    "demo",
    "--rows",
    "none,0.3-0.6",
    "--pretrain_seeds",
    "7",
    "--finetune_seeds",
    "1",
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
    str(N_PRE_EPOCHS),
    "--max_pretrain_images",
    "24",
    "--n_finetune_epochs",
    "1",
    "--max_finetune_images",
    "8",
    "--eval_every",
    "1",
    "--no_figures",
    "--no-progress",
]
LOCAL = ["--launcher", "local", "--workers", "1", "--threads_per_worker", "1"]
# one CPU per job on the 2-CPU node (the local launcher above: one thread), so the jobs compute what it computes
ON_SLURM = [
    "--launcher",
    "slurm",
    "--slurm_gpus_per_job",
    "0",
    "--slurm_cpus_per_task",
    "1",
    "--slurm_mem_gb",
    "3",
    "--slurm_time_min",
    "30",
    "--slurm_poll_s",
    "0.5",
]


def parse(argv):
    return rt.get_args_parser().parse_args([str(a) for a in argv])


# ---------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------


def _slurm_unusable() -> str | None:
    """Why SLURM cannot run the tests' jobs here, or None."""
    for tool in ("sbatch", "squeue", "scancel", "srun", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            return f"no {tool} on the PATH"
    p = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        return f"sinfo fails: {slurm.slurm_message(p.stderr)}"
    states = [s.rstrip("*~#") for s in p.stdout.split()]
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo: {', '.join(states) or 'no nodes'})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    reason = _slurm_unusable()
    if reason is None:
        return
    if REQUIRE_SLURM:
        pytest.fail(f"IOUPOS_REQUIRE_SLURM=1 but SLURM is not usable: {reason}")
    pytest.skip(f"SLURM is not usable here ({reason}); tests/slurm/start_local_slurm.sh starts a one-node SLURM")


def _job_state(job_id: str) -> slurm.JobState | None:
    return slurm.query_jobs([job_id]).get(job_id)


def _epochs(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [json.loads(ln)["epoch"] for ln in log.read_text().splitlines() if ln.strip()]


def _scores(out: Path) -> dict[str, float]:
    """best_dice_paper of every fine-tuning, at full precision."""
    return {
        name: json.loads((out / "runs" / f"{name}_files" / "result.json").read_text())["best_dice_paper"]
        for name in (FT_NONE, FT)
    }


def _table(path: str) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory) -> dict:
    """The reduced demo grid run by the local launcher: the reference of the SLURM runs."""
    out = tmp_path_factory.mktemp("local") / "grid"
    res = rt.main(parse(["--output_dir", out, *TINY, *LOCAL]))
    assert res["n_finished"] == 3
    return {"scores": _scores(out), "table": _table(res["table_csv"]), "rows": res["rows"]}


# ---------------------------------------------------------------------------------------
# SLURM's variables (no cluster needed)
# ---------------------------------------------------------------------------------------


def test_first_host_of_slurm_host_lists():
    cases = {
        "node5": "node5",
        "gpu[07-09,12],cpu3": "gpu07",
        "gpu[12,07-09]": "gpu12",
        "rack[1-2]-n[01-04]": "rack1-n01",
        "a1,b[2-3]": "a1",
        "n[001-100]": "n001",
    }
    for nodelist, first in cases.items():
        assert utils.first_host(nodelist) == first, nodelist
        if shutil.which("scontrol"):  # SLURM's own expansion, where there is one
            p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
            if p.returncode == 0:
                assert p.stdout.split()[0] == first, nodelist
    for bad in ("", "gpu[01-02"):
        with pytest.raises(ValueError):
            utils.first_host(bad)
    assert utils.tasks_on_node("4", 0) == 4
    assert [utils.tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        utils.tasks_on_node("2(x3),1", 4)


def test_launch_env_reads_torchrun_srun_and_not_a_batch_shell():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "0"}
    le = utils.launch_env(torchrun)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("torchrun", 3, 4, 1, 2)
    step = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    le = utils.launch_env(step)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("srun", 5, 8, 1, 4)
    assert le.master_addr == "gpu07" and le.master_port == utils.slurm_port(1234, 0)
    assert 10000 <= le.master_port < 30000 and utils.slurm_port(1234, 1) != le.master_port
    le = utils.launch_env({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (le.master_addr, le.master_port) == ("10.0.0.1", 29500)
    # the batch script's own shell: SLURM_PROCID=0 of the job's 8 tasks, but started by no srun
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert utils.launch_env({**batch, "SLURM_PROCID": "0"}).launcher == "none"
    assert utils.launch_env({}).world_size == 1
    with pytest.raises(UserError, match="SLURM_PROCID=9 of SLURM_STEP_NUM_TASKS=8"):
        utils.launch_env({**step, "SLURM_PROCID": "9"})


def test_the_log_rank_is_the_launchers_rank(monkeypatch):
    """run_cli's log format takes its rank from launch_env: RANK without WORLD_SIZE is no
    torchrun (a plain rank-0 process, logging at INFO), malformed variables log as rank 0."""
    for k in [k for k in os.environ if k in ("RANK", "WORLD_SIZE") or k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "3")
    assert utils.launch_rank() == utils.launch_env().rank == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert utils.launch_rank() == 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert utils.launch_rank() == 1
    monkeypatch.setenv("SLURM_PROCID", "x")
    assert utils.launch_rank() == 0


def test_sbatch_extra_options_and_slurm_messages():
    assert slurm.parse_sbatch_extra("--constraint=v100 --exclusive --nice 10") == {
        "constraint": "v100",
        "exclusive": True,
        "nice": "10",
    }
    assert slurm.parse_sbatch_extra("") == {}
    with pytest.raises(UserError, match="use --slurm_partition"):
        slurm.parse_sbatch_extra("--partition=gpu")
    with pytest.raises(UserError, match="sets --dependency, which the launcher sets itself"):
        slurm.parse_sbatch_extra("--dependency=afterok:1")
    with pytest.raises(UserError, match="not a long sbatch option"):
        slurm.parse_sbatch_extra("-C v100")
    msg = "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: Invalid partition name specified"
    assert slurm.slurm_message(msg) == (
        "invalid partition specified: nope; Batch job submission failed: Invalid partition name specified"
    )


def test_slurm_jobs_split_the_batch_over_their_ranks(tmp_path, capsys):
    for d in ("u", "l"):
        (tmp_path / d).mkdir()
    paper = ["--preset", "paper", "--output_dir", tmp_path / "out", "--unlabelled_dir", tmp_path / "u"]
    paper += ["--labelled_dir", tmp_path / "l", "--rows", "0.3-0.6", "--dry_run"]
    plan = rt.main(parse([*paper, "--launcher", "slurm", "--slurm_gpus_per_job", "4"]))["plan"]
    batch = {r["kind"]: r["argv"][r["argv"].index("--batch_size") + 1] for r in plan}
    assert batch == {"pretrain": "32", "finetune": "8"}  # 4 x 32 = the paper's 128, 4 x 8 = its 32
    plan = rt.main(parse([*paper, "--launcher", "local"]))["plan"]
    assert {r["argv"][r["argv"].index("--batch_size") + 1] for r in plan} == {"128", "32"}
    with pytest.raises(UserError, match="multiple of 3"):
        rt.main(parse([*paper, "--launcher", "slurm", "--slurm_gpus_per_job", "3"]))
    with pytest.raises(UserError, match="--gpus and --workers are for --launcher local"):
        rt.main(parse([*paper, "--launcher", "slurm", "--gpus", "0,1"]))
    capsys.readouterr()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a python start-up in a subprocess: about 10 s on a loaded 2-core machine
def test_no_sbatch_on_the_path_is_one_line_and_exit_code_2(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "grid"
    p = subprocess.run(
        [sys.executable, str(ROOT / "reproduce_table.py"), "--output_dir", str(out), *TINY, *ON_SLURM],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: --launcher slurm needs SLURM's sbatch on the PATH")
    assert not out.exists()  # checked before the data is made; nothing submitted, nothing recorded


# ---------------------------------------------------------------------------------------
# Training under srun
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_srun_two_tasks_train_the_weights_of_torchrun_two_processes(slurm_cluster, tmp_path):
    data = tmp_path / "slices"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (data / f"img_{i:04d}.png").write_bytes(encode_png_2d(rng.random((48, 48)).astype(np.float32)))
    argv = [str(ROOT / "main_simsiam.py"), "--data_dir", str(data), "--low_resource_mode", "--crop_size", "32"]
    argv += ["--n_epochs", "1", "--batch_size", "2", "--run_name", "s", "--num_workers", "0", "--device", "cpu"]
    argv += ["--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for var in [k for k in env if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]:
        env.pop(var)
    srun = subprocess.run(
        ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--mem", "3G", "--time", "10", sys.executable, *argv]
        + ["--chkpt_dir", str(tmp_path / "srun")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert srun.returncode == 0, srun.stderr[-3000:]
    assert "distributed (srun): rank 0 of 2" in srun.stderr
    tr = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        + ["--master_port", str(free_port()), *argv, "--chkpt_dir", str(tmp_path / "torchrun")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert tr.returncode == 0, tr.stderr[-3000:]
    a = torch.load(tmp_path / "srun" / "s.pt", weights_only=True)
    b = torch.load(tmp_path / "torchrun" / "s.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert set(a["encoder"]) == set(b["encoder"])
    for k in a["encoder"]:
        assert torch.equal(a["encoder"][k], b["encoder"][k]), k
    last = torch.load(tmp_path / "srun" / "s_last.pt", weights_only=True)
    assert last["world_size"] == 2
    assert not any(tmp_path.glob("*.out")) and not (tmp_path / "runs").exists()  # nothing in the working directory


# ---------------------------------------------------------------------------------------
# The grid on SLURM
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slurm_grid_preempted_cancelled_resubmitted_gives_the_local_table(
    slurm_cluster, local_grid, tmp_path, caplog, capsys
):
    """The demo grid (two rows, one seed) on SLURM: one job per run, the pretraining preempted
    (requeued by itself) and then cancelled mid-run (resubmitted by the next submission), and
    still the local launcher's table, score for score; the fine-tuning of the pretraining
    starts after it. (One grid for all of it: each SLURM job costs seconds of start-up.)"""
    out = tmp_path / "grid"
    chk = out / "runs"
    log = chk / f"{PRE}_log.jsonl"
    sub = rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM]))
    assert set(sub["submitted"]) == {PRE, FT, FT_NONE}
    pre_job, ft_job = sub["submitted"][PRE], sub["submitted"][FT]
    printed = capsys.readouterr().out
    assert f"{pre_job}\t{PRE}\tsubmitted\n" in printed and f"{ft_job}\t{FT}\tsubmitted after {pre_job}\n" in printed
    jobs = json.loads((out / "state" / "slurm_jobs.json").read_text())["jobs"]
    assert jobs[FT]["depends_on"] == pre_job and jobs[FT_NONE]["depends_on"] is None

    # while the jobs are queued or running, neither a second submission nor the local launcher runs them again
    again = rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM]))
    assert again["submitted"] == {} and set(again["active"]) == {PRE, FT, FT_NONE} - set(again["finished"])
    with pytest.raises(UserError, match="queued or running"):
        rt.main(parse(["--output_dir", out, *TINY, *LOCAL]))

    # 1) preempt the pretraining after its first epoch: SLURM signals USR2, submitit requeues the job
    wait_for(lambda: len(_epochs(log)) >= 1, 240, "the pretraining's first epoch")
    subprocess.run(["scancel", "--signal=USR2", pre_job], check=True, capture_output=True)
    wait_for(lambda: _job_state(pre_job).state in ("REQUEUED", "PENDING"), 60, "the requeue", poll=0.2)
    assert not (chk / f"{PRE}_files" / "result.json").exists()  # it was interrupted mid-run
    # 2) the same job (same id) runs the run again from its checkpoint; cancel it mid-run with scancel as
    #    soon as it has resumed: most of its epochs are still to go (an epoch of this tiny run takes a
    #    fraction of a second, so waiting for one more epoch first could let the run end before the cancel)
    run_log_path = out / "state" / "logs" / f"{PRE}.log"
    wait_for(lambda: " INFO pretrain: resumed " in run_log_path.read_text(), 240, "the requeued pretraining to resume")
    subprocess.run(["scancel", pre_job], check=True, capture_output=True)
    wait_for(lambda: not _job_state(pre_job).active, 60, "the cancelled job to end")
    assert not (chk / f"{PRE}_files" / "result.json").exists()
    assert 1 <= len(_epochs(log)) < N_PRE_EPOCHS
    run_log = run_log_path.read_text()
    assert "preempted" in run_log and "requeued, the run resumes from its last checkpoint" in run_log
    assert run_log.count(" INFO pretrain: resumed ") == 1
    # its fine-tuning never started: SLURM dropped it with its dependency
    wait_for(lambda: not _job_state(ft_job).active, 60, "the dependent job to be dropped")
    assert not (chk / f"{FT}_args.json").exists()

    # 3) submit again and wait: the cancelled runs are resubmitted and resume; the table is the local one
    caplog.clear()
    res = rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM, "--slurm_wait"]))
    assert f"resubmitted {PRE}: job {pre_job} ended CANCELLED" in caplog.text
    assert f"resubmitted {FT}: job {ft_job} ended" in caplog.text
    jobs = json.loads((out / "state" / "slurm_jobs.json").read_text())["jobs"]
    assert jobs[PRE]["attempt"] == 2 and jobs[PRE]["job_id"] != pre_job
    assert jobs[FT]["attempt"] == 2 and jobs[FT]["depends_on"] == jobs[PRE]["job_id"]
    assert jobs[FT_NONE]["attempt"] == 1
    assert _epochs(log) == list(range(1, N_PRE_EPOCHS + 1))
    assert (out / "state" / "logs" / f"{PRE}.log").read_text().count(" INFO pretrain: resumed ") == 2
    assert res["n_finished"] == 3
    assert _scores(out) == local_grid["scores"]
    assert res["rows"] == local_grid["rows"]
    assert _table(res["table_csv"]) == local_grid["table"]

    # every run finished in the job recorded for it; the fine-tuning started after its pretraining ended
    timings = {}
    for line in (out / "state" / "timings.jsonl").read_text().splitlines():
        rec = json.loads(line)
        timings[rec["run"]] = rec
    assert {r: t["job_id"] for r, t in timings.items()} == {r: j["job_id"] for r, j in jobs.items()}
    assert timings[FT]["start"] >= timings[PRE]["end"]
    for name, job in jobs.items():
        assert (out / "slurm" / f"{job['job_id']}_0_log.err").is_file()

    # submitting a finished grid submits nothing
    done = rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM]))
    assert done["submitted"] == {} and sorted(done["finished"]) == sorted(jobs)
    assert json.loads((out / "state" / "slurm_jobs.json").read_text())["jobs"] == jobs


@pytest.mark.slow
def test_refused_submissions_quote_slurm_and_record_nothing(slurm_cluster, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    state = out / "state"
    # an unknown partition, from the command line: SLURM's message, one line, exit code 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "reproduce_table.py"), "--output_dir", str(out), *TINY, *ON_SLURM]
    p = subprocess.run([*cmd, "--slurm_partition", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: sbatch refused the job of run {PRE}: ") and "invalid partition" in last.lower()
    assert not (state / "slurm_jobs.json").exists()
    assert sorted(os.listdir(out / "slurm")) == []  # no job script or pickle left behind

    # a GPU on a cluster without GPUs
    with pytest.raises(UserError, match=f"sbatch refused the job of run {PRE}: .*gres"):
        rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM, "--slurm_gpus_per_job", "1"]))
    assert not (state / "slurm_jobs.json").exists()

    # a refusal after the first job was queued: that job is cancelled, nothing is recorded
    real_submit = submitit.SlurmExecutor.submit
    queued = []

    def submit_then_refuse(self, fn, *a, **k):
        if queued:
            raise submitit.core.utils.FailedJobError("sbatch: error: Batch job submission failed: injected refusal")
        job = real_submit(self, fn, *a, **k)
        queued.append(job.job_id)
        return job

    monkeypatch.setattr(submitit.SlurmExecutor, "submit", submit_then_refuse)
    with pytest.raises(UserError, match="injected refusal"):
        rt.main(parse(["--output_dir", out, *TINY, *ON_SLURM]))
    assert len(queued) == 1
    wait_for(lambda: _job_state(queued[0]).state == "CANCELLED", 60, "the queued job to be cancelled", poll=0.2)
    assert not (state / "slurm_jobs.json").exists()


def _scontrol_job(job_id: str) -> dict[str, str]:
    p = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, check=True)
    fields = {}
    for word in p.stdout.split():
        key, eq, value = word.partition("=")
        if eq and key not in fields:
            fields[key] = value
    return fields


def test_max_parallel_slots_and_extra_options_reach_sbatch(slurm_cluster, tmp_path):
    out = tmp_path / "grid"
    # --hold: the jobs stay queued (priority 0), so nothing runs while their settings are read back
    res = rt.main(
        parse(["--output_dir", out, *TINY, *ON_SLURM, "--slurm_max_parallel", "2", "--slurm_extra", "--hold --nice=7"])
    )
    jobs = res["submitted"]
    try:
        assert set(jobs) == {PRE, FT, FT_NONE}
        info = {run: _scontrol_job(job) for run, job in jobs.items()}
        prefix = slurm.grid_id(str(out))
        assert {i["JobName"] for i in info.values()} == {f"{prefix}_slot0", f"{prefix}_slot1"}
        for run, i in info.items():
            assert slurm.query_jobs([jobs[run]])[jobs[run]].comment == f"ioupos {run}"
            assert i["Nice"] == "7" and i["Reason"] == "JobHeldUser"
            assert "singleton" in i["Dependency"]
            assert i["NumCPUs"] == "1" and i["TimeLimit"] == "00:30:00"
        assert f"afterok:{jobs[PRE]}" in info[FT]["Dependency"]
        assert "afterok" not in info[FT_NONE]["Dependency"]
    finally:
        slurm.cancel_jobs(jobs.values())

"""Small helpers every script of the project shares: errors, logging, atomic writes.

The project's rule for bad input: one clear line naming the file or value, exit
code 2, nothing half-written left behind. Scripts raise :class:`UserError` and
run their ``main`` through :func:`run_cli`, which turns it into that line::

    def main(args):
        if not os.path.isdir(args.data_dir):
            raise UserError(f"--data_dir {args.data_dir!r} does not exist")

    if __name__ == "__main__":
        run_cli(main, get_args_parser())

Writes go through :func:`atomic_write` (or the helpers built on it): the data
lands in a temporary file in the same folder, is flushed to disk and then
renamed over the target, so a kill at any moment leaves either the old file or
the new one, never a truncated file (:func:`remove_stale_temporaries` clears
the temporary files a kill leaves behind).

What a command writes is checked before the work starts: every output folder is
created and tested for writing (:func:`prepare_output_dir`), no output lies inside,
on or around an input (:func:`check_outputs_apart`), and files the project did not
write are not overwritten without ``--overwrite`` (:func:`claim_outputs`).
:func:`run_cli` refuses non-finite numbers in any flag and turns an ``OSError``
(a full disk, a read-only folder) into one ``error:`` line naming the path.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch

logger = logging.getLogger("ioupos")

_E = TypeVar("_E", bound=BaseException)


class UserError(Exception):
    """Bad input from the user (a path, a flag value, a data file).

    ``run_cli`` prints ``error: <message>`` on one line and exits with code 2.
    """

    exit_code = 2


class TrainingError(Exception):
    """A run that must stop, not because of bad input (e.g. a non-finite loss).

    ``run_cli`` prints ``error: <message>`` on one line and exits with code 1.
    """

    exit_code = 1


def _in_chain(exc: BaseException, kind: type[_E], predicate: Callable[[_E], bool]) -> _E | None:
    """The first ``kind`` exception in ``exc``'s chain of causes (``exc``, then each one's
    ``__cause__``, else ``__context__``, until a loop) for which ``predicate`` holds, or None."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind) and predicate(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind an exception raised while loading data, if there is one.

    MONAI wraps transform errors in RuntimeError (``applying transform ...``), and DataLoader
    workers re-raise them with the worker's traceback as text; both are unwrapped here so
    that a corrupt file stops the run with the one line that names it.
    """
    found_in_chain = _in_chain(exc, UserError, lambda e: "Traceback" not in str(e))
    if found_in_chain is not None:
        return found_in_chain
    found = re.findall(r"^(?:[\w.]*\.)?UserError: (.+)$", str(exc), flags=re.MULTILINE)
    return UserError(found[-1].strip()) if found else None


def os_error_reason(e: OSError) -> str:
    """Why an OSError happened, without the path: ``No space left on device (ENOSPC)``."""
    code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    return (e.strerror or str(e)).strip() + (f" ({code})" if code else "")


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path and what failed, e.g. ``/data/runs/r_last.pt: No
    space left on device (ENOSPC)``."""
    why = os_error_reason(e)
    if e.filename is None:
        return why
    where = os.fspath(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fspath(e.filename2)}"
    return f"{where}: {why}"


_OS_ERROR_TEXT = re.compile(r"^(?:[\w.]*\.)?(\w*Error): \[Errno (\d+)\] ([^:'\n]+)(?:: '([^'\n]*)')?", re.MULTILINE)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (a full disk, a read-only folder, a vanished file), if
    there is one: in the chain of causes (MONAI's ``applying transform`` wrapper) or, for an
    error re-raised from a DataLoader worker, in its traceback text (errno and path kept)."""
    found_in_chain = _in_chain(exc, OSError, lambda e: e.errno is not None)
    if found_in_chain is not None:
        return found_in_chain
    found = _OS_ERROR_TEXT.findall(str(exc))
    if found:
        _, num, why, path = found[-1]
        return OSError(int(num), why.strip(), path or None)
    return None


def cli_error_in(exc: BaseException) -> UserError | TrainingError | None:
    """The one-line error behind an exception raised in a run (also inside data-loader
    workers): the UserError it wraps (exit code 2), or a TrainingError (exit code 1) for an
    OSError such as a full disk; None when it is neither (a bug: keep the traceback)."""
    found = user_error_in(exc)
    if found is not None:
        return found
    ose = os_error_in(exc)
    if ose is not None:
        return TrainingError(os_error_message(ose))
    return None


@contextlib.contextmanager
def surface_user_errors() -> Iterator[None]:
    """Re-raise the one-line error behind an exception of the block (a MONAI transform's or a
    DataLoader worker's wrapper): its UserError (:func:`user_error_in`), or a TrainingError for
    an OSError such as a full disk (:func:`cli_error_in`); any other exception passes unchanged."""
    try:
        yield
    except (UserError, TrainingError):
        raise
    except Exception as e:
        found = cli_error_in(e)
        if found is not None:
            raise found from None
        raise


def setup_logging(level: int = logging.INFO, rank: int = 0) -> None:
    """Configure the root logger once: time, level and (when distributed) the rank.

    Ranks other than 0 log at WARNING and above, so a multi-GPU run prints one
    copy of the progress messages without patching ``print``.
    """
    fmt = (
        "%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s %(levelname)s [rank {rank}] %(message)s"
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))


@dataclass(frozen=True)
class LaunchEnv:
    """How this process was started: by torchrun, by srun (one task of a SLURM job step), or alone."""

    launcher: str  # "torchrun", "srun" or "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None  # srun: the rendezvous host and port (torchrun brings its own)
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list such as ``SLURM_JOB_NODELIST``.

    ``"gpu[07-09,12],cpu3"`` -> ``"gpu07"``; ``"rack[1-2]-n[01-04]"`` -> ``"rack1-n01"``;
    ``"node5"`` -> ``"node5"`` (the same as the first line of ``scontrol show hostnames``).

    Raises:
        ValueError: an empty list or an unclosed bracket.
    """
    text = nodelist.strip()
    host, i = [], 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise ValueError(f"host list {nodelist!r} has an unclosed '['")
            first = text[i + 1 : end].split(",")[0].split("-")[0]
            host.append(first)
            i = end + 1
        else:
            host.append(text[i])
            i += 1
    if not host:
        raise ValueError(f"host list {nodelist!r} is empty")
    return "".join(host)


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks of a step on node ``node_id`` from SLURM's ``SLURM_STEP_TASKS_PER_NODE``.

    ``"4"`` -> 4 on every node; ``"2(x3),1"``: 2 on nodes 0-2, 1 on node 3.

    Raises:
        ValueError: not of that form, or fewer nodes than ``node_id + 1``.
    """
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        part = part.strip()
        if "(x" in part:
            n, rep = part.split("(x")
            counts += [int(n)] * int(rep.rstrip(")"))
        else:
            counts.append(int(part))
    if node_id >= len(counts):
        raise ValueError(f"tasks per node {tasks_per_node!r} lists no node {node_id}")
    return counts[node_id]


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The rendezvous port of a SLURM job step: 10000-29999, fixed by the job and step ids, so
    every task of the step computes the same port without talking to the others, and two
    steps of one job (or jobs sharing a node) rarely meet. ``MASTER_PORT`` overrides it."""
    return 10000 + (job_id * 10 + step_id) % 20000


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read how this process was launched from the environment.

    - torchrun (``RANK`` and ``WORLD_SIZE`` set): its ranks; it runs the rendezvous itself.
    - srun (``SLURM_STEP_NUM_TASKS`` and ``SLURM_PROCID`` set): rank ``SLURM_PROCID`` of
      ``SLURM_STEP_NUM_TASKS``, local rank ``SLURM_LOCALID`` of the step's tasks on this node
      (``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_NODEID``), the rendezvous on the first host of
      ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) at :func:`slurm_port` of the job
      and step ids; ``MASTER_ADDR`` / ``MASTER_PORT`` override both. A batch script's own
      shell (``SLURM_PROCID=0`` and ``SLURM_NTASKS`` of the whole job, but no step) is a
      plain process: only ``srun`` starts the tasks of a distributed run.
    - otherwise one plain process.

    Raises:
        UserError: the SLURM variables are malformed or inconsistent (named).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(
            "torchrun",
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        try:
            world = int(env["SLURM_STEP_NUM_TASKS"])
            rank = int(env["SLURM_PROCID"])
            local = int(env.get("SLURM_LOCALID", "0"))
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
            local_world = tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0")))
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            addr = env.get("MASTER_ADDR") or first_host(nodes)
            port = int(
                env.get("MASTER_PORT")
                or slurm_port(int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0")))
            )
        except ValueError as e:
            raise UserError(f"cannot read the srun task's SLURM variables: {e}") from None
        if not (0 <= rank < world and 0 <= local < local_world):
            raise UserError(
                f"inconsistent SLURM variables: SLURM_PROCID={rank} of SLURM_STEP_NUM_TASKS={world}, "
                f"SLURM_LOCALID={local} of {local_world} tasks on this node"
            )
        return LaunchEnv("srun", rank, world, local, local_world, addr, port)
    return LaunchEnv("none")


def launch_rank() -> int:
    """This process's rank as its launcher says (:func:`launch_env`), for the log format
    before torch.distributed is set up; 0 when the launcher's variables are malformed (the
    run's set-up then reports them as a user error)."""
    try:
        return launch_env().rank
    except (UserError, ValueError):
        return 0


def non_finite_flags(args: argparse.Namespace) -> list[str]:
    """``--name value`` of every float flag (or float in a list flag) that is NaN or infinite."""
    bad = []
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                bad.append(f"--{name} {v}")
    return bad


def check_finite_flags(args: argparse.Namespace) -> None:
    """Refuse NaN and infinite numbers in any flag of a parsed command line (UserError).

    One check over the whole namespace, so a float flag added later is covered too.
    """
    bad = non_finite_flags(args)
    if bad:
        raise UserError(f"{', '.join(bad)}: flag values must be finite numbers")


def run_cli(main: Callable[[Any], Any], parser, argv: list[str] | None = None) -> Any:
    """Parse ``argv`` with ``parser``, run ``main(args)`` and map errors to exit codes.

    UserError (and a non-finite number in any flag) -> exit 2, TrainingError -> exit 1, an
    ``OSError`` that reaches here (a full disk, a read-only folder) -> exit 1, each as one
    ``error: ...`` line on stderr naming the path.
    """
    args = parser.parse_args(argv)
    setup_logging(rank=launch_rank())
    try:
        check_finite_flags(args)
        return main(args)
    except (UserError, TrainingError) as e:
        _exit_with(e)
    except OSError as e:
        _exit_with(TrainingError(os_error_message(e)))
    except Exception as e:
        found = cli_error_in(e)
        if found is None:
            raise
        _exit_with(found)


def _exit_with(e: UserError | TrainingError) -> None:
    msg = str(e).strip().replace("\n", " ")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def available_memory() -> int | None:
    """Bytes of memory a new allocation can use without swapping: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), else free physical pages (``os.sysconf``); None when the
    system tells neither."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


#: Memory left alone by :func:`check_fits_in_memory`: this share of what is available, at least
#: ``MEMORY_RESERVE_MIN`` bytes (the model, the data workers, the OS page cache need some).
MEMORY_RESERVE_FRAC = 0.15
MEMORY_RESERVE_MIN = 2 * 1024**3


def check_fits_in_memory(need: int, what: str, hint: str, available: int | None = None) -> None:
    """Refuse a cache of ``need`` bytes that would not fit in memory, before it is built.

    It fits when ``need <= available - max(MEMORY_RESERVE_MIN, MEMORY_RESERVE_FRAC * available)``;
    ``available`` defaults to :func:`available_memory` (when that is unknown the check
    logs a warning and lets the cache be built).

    Args:
        need: bytes the cache will hold (all processes of this machine together).
        what: what is cached, for the message (e.g. ``"--cache_images: 237,449 slices"``).
        hint: what the user can do instead, appended to the message.

    Raises:
        UserError: it does not fit (the message gives both sizes).
    """
    if available is None:
        available = available_memory()
        if available is None:
            logger.warning(
                "%s: %s; the free memory of this system is unknown, so it is not checked", what, format_bytes(need)
            )
            return
    room = available - max(MEMORY_RESERVE_MIN, MEMORY_RESERVE_FRAC * available)
    if need > room:
        raise UserError(
            f"{what} need {format_bytes(need)} of memory, but {format_bytes(available)} is available and at most "
            f"{format_bytes(max(room, 0))} of it can go to a cache; {hint}"
        )


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units for messages: "512 B", "3.4 MB", "1.25 GB"."""
    if n < 1e3:
        return f"{n:.0f} B"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file owner-only (0600); give it the usual permissions instead
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _RecordingWriter:
    """A file object whose ``write`` remembers the OSError it raised: ``torch.save`` calls it
    from C++ and reports a failed write as an unrelated RuntimeError ("unexpected pos")."""

    def __init__(self, f: io.IOBase):
        self.f = f
        self.error: OSError | None = None

    def write(self, b: bytes) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill mid-save keeps the previous file.

    Raises:
        OSError: the file cannot be written (a full disk: ENOSPC, with the path), not
            torch's RuntimeError.
    """
    with atomic_write(path, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                e = w.error
                raise OSError(e.errno, e.strerror, os.fspath(path)) from None
            raise


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``path`` (metrics logs), flushed to disk; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def append_jsonl_atomic(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``path`` by rewriting the file atomically: a kill or a full disk
    leaves the old file or the new one, never half a line. For files with one writer (a run's
    log); logs that several processes append to use :func:`append_jsonl`."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text + json.dumps(record) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed :func:`atomic_write` calls for ``path`` left
    behind (``.<name>.<random>.tmp`` next to it); returns the removed paths.

    Only for files one process writes at a time (a run's files): a live writer's temporary
    file would be removed too.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            removed.append(tmp)
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex.

    Raises:
        UserError: the file cannot be read (named).
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Outputs: checked before the work, never on or around an input, never over a foreign file
# ---------------------------------------------------------------------------------------


def prepare_output_dir(path: str | os.PathLike, flag: str) -> str:
    """Create the output folder ``path`` and check that a file can be written in it, before
    any work: a read-only or full file system is refused at start-up, not hours later.

    Returns:
        the absolute folder.

    Raises:
        UserError: it cannot be created (names the flag, the path and why), it is a file,
            or nothing can be written in it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {os_error_reason(e)}") from None
    return path


def prepare_output_file(path: str | os.PathLike, flag: str) -> str:
    """:func:`prepare_output_dir` for the folder of the output file ``path``; also refuses a
    ``path`` that is a folder. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    prepare_output_dir(os.path.dirname(path), f"the folder of {flag}")
    return path


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(a: str, b: str) -> bool:
    """``a`` lies inside (or is) ``b`` (both real paths)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_outputs_apart(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None]) -> None:
    """Refuse an output location that is an input, lies inside one, or contains one.

    Args:
        outputs: ``{description: path}`` of what the command writes (folders it writes into,
            files it writes); None entries are skipped.
        inputs: ``{description: path}`` of what it reads (data folders, label folders,
            checkpoints, split files); None entries are skipped. Links are resolved.

    Raises:
        UserError: naming both paths and how they overlap.
    """
    for o_name, o_path in outputs.items():
        if not o_path:
            continue
        o = _real(o_path)
        for i_name, i_path in inputs.items():
            if not i_path:
                continue
            i = _real(i_path)
            if o == i:
                how = "is"
            elif _inside(o, i):
                how = "lies inside"
            elif _inside(i, o):
                how = "contains"
            else:
                continue
            raise UserError(
                f"{o_name} {os.fspath(o_path)} {how} {i_name} {os.fspath(i_path)}: a command never writes into, over "
                f"or around its inputs; choose another output location"
            )


#: The record of the files this project wrote in a folder (see :func:`claim_outputs`).
OUTPUTS_RECORD = ".ioupos-outputs.json"


def claim_outputs(paths: Iterable[str | os.PathLike], overwrite: bool, flag: str) -> None:
    """Refuse to write over files this project did not write, then record ``paths`` as ours.

    Each folder that receives outputs keeps ``.ioupos-outputs.json``: the names of the files
    written there by the project's commands. A path that exists but is not in that record
    (a user's file, a raw data set) is refused unless ``overwrite`` (``--overwrite``); a
    rerun writes over its own files freely.

    Raises:
        UserError: naming the first foreign file and the flag that points there.
    """
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        folder, name = os.path.split(os.path.abspath(os.fspath(p)))
        by_folder.setdefault(folder, []).append(name)
    for folder, names in by_folder.items():
        record_path = os.path.join(folder, OUTPUTS_RECORD)
        owned = set(_read_record(record_path))
        foreign = sorted(n for n in names if n not in owned and os.path.lexists(os.path.join(folder, n)))
        if foreign and not overwrite:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise UserError(
                f"{flag}: {os.path.join(folder, foreign[0])}{more} exists and was not written by this project; "
                f"pass --overwrite to replace it, or choose another {flag}"
            )
        if foreign and any(os.path.isdir(os.path.join(folder, n)) for n in foreign):
            bad = next(n for n in foreign if os.path.isdir(os.path.join(folder, n)))
            raise UserError(f"{flag}: {os.path.join(folder, bad)} is a folder; it cannot be replaced by a file")
        new = sorted(owned | set(names))
        if new != sorted(owned):
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(record_path, {"written_by": "ioupos", "files": new})


def _read_record(path: str) -> list[str]:
    try:
        with open(path) as f:
            obj = json.load(f)
        files = obj.get("files", []) if isinstance(obj, dict) else []
        return [str(n) for n in files]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the record of written files {path}: {e}; delete it to start afresh") from None


def torch_load(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one clear line for every way it can fail.

    Raises:
        UserError: the file is missing, not a torch file, or needs arbitrary pickled objects.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if found:
            raise UserError(
                f"checkpoint {path!r} needs the Python object {found.group(1)} to load; this project loads "
                f"checkpoints with weights_only=True and refuses arbitrary pickled objects"
            ) from None
        raise UserError(
            f"{path!r} is not a readable PyTorch checkpoint (not written by torch.save, or it holds pickled "
            f"data that weights_only=True refuses)"
        ) from None
    except Exception as e:  # zip errors, truncated files, text files...
        raise UserError(
            f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).strip()[:200]})"
        ) from None


def root_cause(e: BaseException) -> BaseException:
    """The exception at the end of ``e``'s ``__cause__`` chain (``raise ... from``): the
    original error that wrappers (MONAI's readers and transforms) re-raised, or ``e`` itself."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e

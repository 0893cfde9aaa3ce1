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
the new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger("ioupos")


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


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind an exception raised while loading data, if there is one.

    MONAI wraps transform errors in RuntimeError (``applying transform ...``), and DataLoader
    workers re-raise them with the worker's traceback as text; both are unwrapped here so
    that a corrupt file stops the run with the one line that names it.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError) and "Traceback" not in str(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    found = re.findall(r"^(?:[\w.]*\.)?UserError: (.+)$", str(exc), flags=re.MULTILINE)
    return UserError(found[-1].strip()) if found else None


@contextlib.contextmanager
def surface_user_errors() -> Iterator[None]:
    """Re-raise the UserError behind an exception of the block (a MONAI transform's or a
    DataLoader worker's wrapper, see :func:`user_error_in`) as that UserError alone; any
    other exception passes unchanged."""
    try:
        yield
    except (UserError, TrainingError):
        raise
    except Exception as e:
        found = user_error_in(e)
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


def launch_rank() -> int:
    """This process's rank as its launcher says: torchrun's ``RANK``, else ``SLURM_PROCID`` of a
    task that ``srun`` started (``SLURM_STEP_NUM_TASKS`` is set: a batch script's own shell has
    ``SLURM_PROCID=0`` too but is no task of a step); 0 for a plain process. Used for the log
    format before torch.distributed is set up (``engine.launch_env`` reads the rest)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def run_cli(main: Callable[[Any], Any], parser, argv: list[str] | None = None) -> Any:
    """Parse ``argv`` with ``parser``, run ``main(args)`` and map errors to exit codes.

    UserError -> exit 2, TrainingError -> exit 1, each as one ``error: ...`` line on stderr.
    """
    args = parser.parse_args(argv)
    setup_logging(rank=launch_rank())
    try:
        return main(args)
    except (UserError, TrainingError) as e:
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill mid-save keeps the previous file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``path`` (metrics logs), flushed to disk; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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

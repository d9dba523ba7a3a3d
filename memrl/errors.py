"""How a bad input reaches the user: one line `error: <file>:<line>: <field>: <what>` on stderr, a non-zero exit,
no traceback. Shared by train.py, evaluate.py and `python -m data_tools.shard`.

    argv = install_error_handler(sys.argv[1:])   # first thing in an entry point; strips --debug

The kinds of error a user can fix, each raised where the problem is found, with as much of the place as applies:
    ConfigError      a config value or key          "--optim.lr: must be finite and in (0, 1], got inf"
    DataError        an input data file             "data/x.jsonl:7: field 'shards': empty list"
    CheckpointError  a model / checkpoint / run dir "runs/a/checkpoints/step_00000010/trainer_state.pt: unreadable"
    TrainingError    a run that must stop           "train.max_skipped_steps=3: 3 steps in a row were non-finite"
All are MemrlError, and (except TrainingError) also ValueError, so `except ValueError` callers keep working. An
OSError naming a file (missing, unreadable, a directory where a file was expected, a full disk) is reported the
same way. Anything else is a bug: it keeps its traceback. `--debug` or MEMRL_DEBUG=1 shows the traceback of
everything. Nothing here imports torch: the data tools use it too.
"""
from __future__ import annotations

import os
import sys


class MemrlError(Exception):
    """An error the user can fix. str(e) is the one line after `error: `; `details` are more lines (e.g. the other
    problems found in the same file), printed below it, indented."""

    def __init__(self, message: str, details: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.details = list(details)


class ConfigError(MemrlError, ValueError):
    pass


class DataError(MemrlError, ValueError):
    """Bad input data; the message names the file, the line (1-based) and the field."""


class CheckpointError(MemrlError, ValueError):
    """A model, tokenizer, checkpoint or run directory that cannot be used as asked."""


class TrainingError(MemrlError, RuntimeError):
    """A run that cannot usefully go on (e.g. every recent step was non-finite)."""


def where(path, line: int | None = None) -> str:
    """`path:line` (1-based line) or just `path`: the place prefix every message starts with."""
    return f"{path}:{line}" if line is not None else str(path)


def user_message(exc: BaseException) -> str | None:
    """The one-line report of an error the user can act on; None for a bug (which keeps its traceback)."""
    if isinstance(exc, MemrlError):
        return "\n".join([str(exc)] + [f"  {d}" for d in exc.details])
    if isinstance(exc, OSError) and exc.filename is not None:  # missing / unreadable / directory / disk full
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):  # raised by memrl itself as "<path>: no such ..."
        return str(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, matched by name: no torch import here
        return (f"out of GPU memory ({str(exc).splitlines()[0]}): lower train.micro_batch_tokens, or set "
                f"model.gradient_checkpointing=true, or use more GPUs")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return None


def _report(kind, exc, tb) -> None:
    message = user_message(exc)
    if message is None:
        sys.__excepthook__(kind, exc, tb)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every rank reports: say which one
    prefix = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
    if sys.stderr.isatty():  # a progress bar may hold the cursor at the end of its line
        sys.stderr.write("\n")
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MEMRL_DEBUG", "") not in ("", "0")


def install_error_handler(argv: list[str]) -> list[str]:
    """Route uncaught user errors to one `error: ` line (exit status 1) unless --debug / MEMRL_DEBUG=1 asks for
    tracebacks. Returns argv without --debug. An uncaught exception's exit status is 1 either way (Python's rule)."""
    if not debug_requested(argv):
        sys.excepthook = _report
    return [a for a in argv if a != "--debug"]

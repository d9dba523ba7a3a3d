"""Atomic writes: every file or folder memrl writes appears whole, or not at all.

    with atomic_path(out) as tmp:                  # write `tmp` (any writer: torch.save, savefig, open)
        torch.save(obj, tmp)
    with atomic_path(ckpt, directory=True) as tmp: # a fresh folder to fill
        ...
    write_text_atomic(path, text)

Invariants:
- The temporary sits in the target's own folder (`.<name>.tmp-<pid>-<random>`), so the final os.replace is one
  rename within one filesystem: atomic. A crash leaves at most a hidden temporary beside the target, never a
  half-written target; a writer that owns a folder (memrl/checkpoint.py) removes stale `.*tmp-*` entries.
- A folder target that already exists is renamed aside first (`.<name>.tmp-old-<pid>`) and removed only once the
  new one is in place: a reader sees the old folder or the new one.
- On any exception (KeyboardInterrupt included) the temporary is removed and the target is left as it was.
- Files and folders get the ordinary permissions (umask), as a plain open() or mkdir() would give them.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write (with directory=True: an empty folder, made here);
    renamed onto `path` when the block ends without an exception, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and path.exists():  # swap the old folder out only once the new one is complete
            old = path.with_name(f".{path.name}.tmp-old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) into `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

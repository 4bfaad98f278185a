"""Atomic file writes: readers, and a run resumed after a kill, see the old file or the new one, never
half of one.

Each write goes to its own temporary file in the target's folder (a unique name, so two processes
writing the same file, e.g. two trainings preparing one crop cache, do not move each other's
temporary file away), is flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def _umask() -> int:
    # The umask can only be read by setting it; set it straight back (not thread-safe for a moment,
    # like every reader of the umask).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``check(temporary_path)``, if given, runs on the complete file before the rename; raising there
    leaves ``path`` as it was (e.g. an exported model that does not load is never published)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            # mkstemp creates 0600; the file gets the mode open() would give it (0666 less the umask).
            os.chmod(tmp, 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int | None = None) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=indent) + "\n"))

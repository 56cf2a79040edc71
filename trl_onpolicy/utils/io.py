"""File writes that a crash or a second writer cannot corrupt, and the one file lock.

- `atomic_file` / `atomic_write_text` / `write_json_atomic` / `atomic_write_bytes`: the content goes to a temporary
  file with a name of its own (``tempfile.mkstemp`` in the same folder, so two processes or threads never share
  it), is flushed and fsynced, then renamed over the target (`os.replace`, atomic on POSIX). A reader sees the old
  file or the new one, never half of one; a failed write leaves the old file and no temporary behind.
- `atomic_folder`: the same for a whole folder (filled in a temporary sibling, renamed into place with a completion
  marker).
- `file_lock`: an exclusive ``fcntl.flock`` lock, waiting or not; the OS drops it when its holder dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE_MARKER = ".trl_onpolicy_complete"


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8"):
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates it private; results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_json_atomic(path: str | Path, obj, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def read_json(path: str | Path):
    """A JSON file, or None when it is missing or unreadable (e.g. cut short by a crash of an older version)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def atomic_folder(output_dir: str | Path, write, note: str = "") -> Path:
    """Create ``output_dir`` all at once: ``write(tmp)`` fills a temporary sibling folder, which is renamed into place
    (with a completion marker) only if ``write`` returns. On any error, nothing is left behind. When another process
    finished the same folder first, its copy is kept."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates it private; the cache is an ordinary readable folder
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(note + "\n")
        try:
            os.rename(tmp, output_dir)
        except OSError:
            if not is_complete(output_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True):
    """Hold an exclusive lock on ``path`` (``fcntl.flock``) and yield True. With ``wait`` it waits for the holder;
    without it yields False at once when another process holds the lock. The operating system drops the lock when
    its holder exits, however it exits (even SIGKILL), so a killed run never leaves anything locked. Where ``fcntl``
    is unavailable (non-POSIX) nothing is locked and it yields True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield True
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""Files written whole or not at all: every writer of the project goes through `atomic_replace` (a temporary
file beside the target, then a rename), so a reader or a killed process never sees half a file, and the
result has the mode a plain `open` would give under the process umask (a serving user can read it).

Standard library only, so a writer needs no numerical library to use it.  The one writer that does not use it is
the config linter's `--fix` (`qwen_jax/lint/fix.py`): the pre-commit hook ships `qwen_jax/lint/` alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (umask() itself sets it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str) -> None:
    """Give `path` (a file, or a folder and everything below) the modes a plain mkdir/open would have.

    tempfile.mkstemp/mkdtemp create 0600/0700 whatever the umask; files renamed into place from
    there would be unreadable to the other users the umask allows (a serving process, say).
    """
    mask = current_umask()
    if os.path.isdir(path) and not os.path.islink(path):
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_replace(dst: str, write, *, mode: int | None = None, durable: bool = False) -> None:
    """`write(binary file)` into a temporary file beside `dst`, then rename it there: `dst` is old or new, never
    partial, and gets `mode` (default: the mode the umask gives a plain open).  `durable`: fsync before the
    rename, for files a crash must not take back (a log cut to a checkpoint)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=f".{os.path.basename(dst)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if mode is None:
            honour_umask(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str | bytes, *, mode: int | None = None) -> None:
    """Write `text` (str as UTF-8, or bytes) to `path` atomically (`atomic_replace`)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    atomic_replace(path, lambda out: out.write(data), mode=mode)


def atomic_copy(src: str, dst: str) -> None:
    """Copy the bytes of `src` to `dst` atomically (`atomic_replace`)."""

    def copy(out):
        with open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)

    atomic_replace(dst, copy)


def atomic_write_json(path: str, obj, *, indent: int = 2) -> None:
    """`obj` as indented JSON plus a newline, written atomically (`atomic_replace`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")

"""What both conversions share: the error type, progress display, the atomic output folder, dtype choice.

A conversion writes into a temporary folder beside its target and renames it at the end
(`atomic_output`), so a failure, a full disk or a SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from qwen_jax.dtypes import FLOAT_DTYPES, dtype_name, numpy_dtype


class ConvertError(Exception):
    """A conversion that cannot proceed; the message says why and what to do."""


# ---------------------------------------------------------------- progress
class Progress:
    """A tqdm bar (bytes, with a tensor count) on a terminal; plain log lines otherwise."""

    def __init__(self, desc: str, total_tensors: int, total_bytes: int, stream=None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.desc, self.total_tensors, self.total_bytes = desc, total_tensors, total_bytes
        self.tensors = 0
        self.bytes = 0
        self._next_pct = 10
        self._start = time.monotonic()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                             file=self.stream, dynamic_ncols=True)
        else:
            self._line(f"{desc}: {total_tensors} tensors, {_gib(total_bytes)}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, nbytes: int, tensor_done: bool) -> None:
        self.bytes += nbytes
        self.tensors += int(tensor_done)
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
            return
        pct = 100 * self.bytes / max(self.total_bytes, 1)
        if pct >= self._next_pct:
            while self._next_pct <= pct:
                self._next_pct += 10
            self._line(f"{self.desc}: {self.tensors}/{self.total_tensors} tensors, "
                       f"{_gib(self.bytes)} / {_gib(self.total_bytes)} ({pct:.0f}%), "
                       f"{time.monotonic() - self._start:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(f"{self.desc}: done, {self.tensors} tensors, {_gib(self.bytes)} in "
                       f"{time.monotonic() - self._start:.1f}s")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- atomic output folder
@contextlib.contextmanager
def atomic_output(out_dir: str, overwrite: bool, sources: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on any error it is removed.

    With `overwrite`, an existing `out_dir` stays whole until the new folder is complete; the two
    are then exchanged in one step where the kernel can (`renameat2` RENAME_EXCHANGE on Linux),
    else by two renames, and the old one is removed.  The folder gets the mode the umask gives
    a new folder (mkdtemp makes it 0700, which a serving process of another user cannot read).
    """
    from qwen_jax.atomic import honour_umask

    out = os.path.abspath(out_dir)
    for src in sources:
        if os.path.realpath(src) == os.path.realpath(out):
            raise ConvertError(f"{out}: output folder is the input folder; choose another --out_dir")
    if os.path.lexists(out) and not overwrite:
        raise ConvertError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConvertError(f"{out}: exists and is not a folder; refusing to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        honour_umask(tmp)
        yield tmp
        if os.path.lexists(out):
            _exchange(tmp, out)  # tmp now holds the old folder
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: str, b: str) -> None:
    """Swap two paths: atomically with Linux renameat2(RENAME_EXCHANGE), else by two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), b)
    aside = a + ".old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def target_dtype(dtype: str | None) -> np.dtype | None:
    if dtype is None:
        return None
    if str(dtype).lower() == "keep":
        return None
    if dtype_name(dtype) not in FLOAT_DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r} (choose from bf16, fp16, fp32, keep)")
    return numpy_dtype(dtype)


def with_disk_errors(fn, out: str):
    """Run fn; a full disk (possibly wrapped by Orbax/TensorStore) becomes one clear ConvertError."""
    try:
        return fn()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"{out}: no space left on device while writing; nothing was written "
                               f"(the temporary folder was removed). Free space or choose another --out_dir") from e
        raise
    except Exception as e:
        cause = e
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "No space left" in str(cause):
                raise ConvertError(f"{out}: no space left on device while writing; nothing was written "
                                   f"(the temporary folder was removed). Free space or choose another --out_dir"
                                   ) from e
            cause = cause.__cause__ or cause.__context__
        raise


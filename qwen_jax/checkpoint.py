"""Orbax checkpoints of a training run: save (async, keep K), resume, SIGTERM, HF side files.

Layout (the contract shared with `qwen_jax.hf.convert`)::

    <workdir>/checkpoints/                 CheckpointManager root
        config.json, generation_config.json, tokenizer files   (Hugging Face side files)
        <step>/params     ocp.args.StandardSave(nnx.to_pure_dict(param_state))
        <step>/opt_state  optax state (StandardSave)
        <step>/meta       JSON: step, rng, config, model config
        <step>/data       the data iterator's state (grain's handler, or JSON for synthetic data)

A step directory only appears once its (asynchronous) save has finished, so a run killed
mid-save resumes from the previous complete checkpoint.  A step that does not restore (a
truncated file, a missing item, an empty stray folder) is moved to `<workdir>/checkpoints.damaged/`
and the next older one is used (`Checkpointer.restore_latest`).

Everything written here honours the process umask (`qwen_jax.atomic`), so a serving process of
another user can read checkpoints and exports.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import socket
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.atomic import atomic_copy, atomic_write_json
from qwen_jax.checkpoint_format import TOKENIZER_FILES, copy_side_files, params_save_args
from qwen_jax.config import QwenConfig, to_hf_dict

log = logging.getLogger(__name__)

QWEN_CHAT_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _data_args(iterator, save: bool):
    """Orbax args for the data iterator's state: grain's own handler, or JSON for `get_state() -> dict`."""
    if hasattr(iterator, "get_state") and not _is_grain(iterator):
        return ocp.args.JsonSave(iterator.get_state()) if save else ocp.args.JsonRestore()
    import grain

    return grain.checkpoint.CheckpointSave(iterator) if save else grain.checkpoint.CheckpointRestore(iterator)


def _is_grain(iterator) -> bool:
    """grain iterators (incl. qwen_jax.data's BatchIterator) save one state file per process via grain's handler."""
    import grain

    return isinstance(iterator, grain.DatasetIterator) or type(iterator).__module__.split(".")[0] == "grain"


def _frozen_grain_state(state: dict):
    """A grain iterator that only returns `state`: grain's save handler writes `item.get_state()`.

    The trainer reads batches ahead of the step that consumes them, so a checkpoint must save the
    iterator state recorded with the batch of that step, not the (further) state of the iterator now.
    """
    import grain

    class FrozenState(grain.DatasetIterator):
        def __next__(self):
            raise StopIteration

        def get_state(self):
            return state

        def set_state(self, new_state):
            raise NotImplementedError("a saved-state snapshot cannot be restored into")

    return FrozenState()


class CheckpointMismatch(ValueError):
    """A complete checkpoint whose arrays do not fit this run's model / optimizer (a config change, not damage)."""


ITEMS = ("params", "opt_state", "meta")


class Checkpointer:
    """One `ocp.CheckpointManager` with the items params, opt_state, meta, data."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def damaged_directory(self) -> str:
        return self.directory + ".damaged"

    def step_folders(self) -> list[int]:
        """Numbered step folders on disk, newest first (also the ones Orbax does not list, e.g. empty ones)."""
        if not os.path.isdir(self.directory):
            return []
        names = os.listdir(self.directory)
        return sorted((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))),
                      reverse=True)

    def missing_items(self, step: int, with_data: bool) -> str | None:
        """What a step folder lacks to be restorable (None when every item is there and non-empty)."""
        folder = os.path.join(self.directory, str(step))
        if not os.listdir(folder):
            return "empty step folder"
        if step not in self.manager.all_steps():
            return "not a finished Orbax checkpoint"
        for item in ITEMS + (("data",) if with_data else ()):
            path = os.path.join(folder, item)
            if not os.path.isdir(path) or not os.listdir(path):
                return f"item {item!r} missing"
        return None

    def save(self, step: int, state: dict, meta: dict, data_iterator=None, force: bool = False,
             data_state: dict | None = None) -> bool:
        """Start saving `step` (asynchronous when configured).

        `data_state`: the iterator state to record instead of `data_iterator.get_state()` (batches read ahead).
        """
        items = {
            "params": ocp.args.StandardSave(state["params"], save_args=params_save_args(state["params"])),
            "opt_state": ocp.args.StandardSave(state["opt_state"]),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            if data_state is None:
                items["data"] = _data_args(data_iterator, save=True)
            elif _is_grain(data_iterator):
                items["data"] = _data_args(_frozen_grain_state(data_state), save=True)
            else:
                items["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, data_iterator=None) -> tuple[dict, dict]:
        """(state, meta) of `step`; the data iterator (if given) is restored in place."""
        items = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"]),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = _data_args(data_iterator, save=False)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out["meta"]
        if data_iterator is not None and not _is_grain(data_iterator):
            data_iterator.set_state(out["data"])
        rep = abstract_state["step"].sharding
        state = {
            "params": out["params"],
            "opt_state": out["opt_state"],
            "step": jax.device_put(np.asarray(meta["step"], np.int32), rep),
            "rng": jax.device_put(np.asarray(meta["rng"], np.uint32), rep),
        }
        return state, meta

    def restore_latest(self, abstract_state: dict, data_iterator=None, report=print):
        """(step, state, meta) of the newest step that restores completely, or None when there is none.

        Newer steps that fail are reported in one line each and moved to `damaged_directory` (never
        deleted).  A complete step whose arrays do not fit `abstract_state` raises CheckpointMismatch:
        that is a changed config, and moving a good checkpoint aside would lose it.
        """
        for step in self.step_folders():
            problem = self.missing_items(step, with_data=data_iterator is not None)
            if problem is None:
                try:
                    state, meta = self.restore(step, abstract_state, data_iterator)
                    return step, state, meta
                except Exception as e:  # noqa: BLE001 - any failure to read the step is damage, reported below
                    mismatch = self.shape_mismatch(step, abstract_state["params"])
                    if mismatch:
                        raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} does not fit this "
                                                 f"run's model: {mismatch}; use another --workdir or the model "
                                                 "config it was trained with") from None
                    problem = one_line(e)
            moved = self.move_aside(step)
            report(f"checkpoint step {step} is damaged ({problem}): moved to {moved}")
        return None

    def shape_mismatch(self, step: int, abstract_params) -> str | None:
        """A description of the first parameter whose saved shape differs (None when all fit or unreadable)."""
        try:
            saved = self.manager.item_metadata(step)["params"]
        except Exception:  # noqa: BLE001 - unreadable metadata is damage, not a mismatch
            return None
        if saved is None:
            return None
        want = {path_key(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
        have = {path_key(p): tuple(getattr(a, "shape", ())) for p, a in jax.tree_util.tree_leaves_with_path(saved)}
        if set(want) != set(have):
            diff = sorted(set(want) ^ set(have))
            return f"parameter {diff[0]!r} is in only one of the checkpoint and the model"
        for key, shape in want.items():
            if have[key] != shape:
                return f"parameter {key!r} has shape {have[key]} in the checkpoint, {shape} in the model"
        return None

    def move_aside(self, step: int) -> str:
        """Move a step folder into `damaged_directory` (a numbered suffix if that name is taken)."""
        os.makedirs(self.damaged_directory, exist_ok=True)
        target = os.path.join(self.damaged_directory, str(step))
        n = 1
        while os.path.lexists(target):
            target = os.path.join(self.damaged_directory, f"{step}.{n}")
            n += 1
        os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        """Wait for the saves in flight, then release Orbax's threads (again: a no-op)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The innermost cause of an exception as one short line: an OSError's errno text and path, if any."""
    os_error = os_error_in(exc)
    if os_error is not None:
        text = os_error.strerror or str(os_error)
        if os_error.filename:
            text += f": {os_error.filename}"
        return text
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    first = first.split(" See full TensorStore details")[0].rstrip(" .")  # a repr of the whole spec follows
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError somewhere in an exception's cause/context chain (Orbax and TensorStore wrap them).

    TensorStore reports OS errors as text (`... "path": ... No space left on device
    [os_error_code='28']`); those become an OSError with that errno and the last path quoted.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        text = str(exc)
        code = re.search(r"os_error_code='(\d+)'", text)
        if code:
            paths = re.findall(r'"(/[^"]+)"', text)
            number = int(code.group(1))
            return OSError(number, os.strerror(number), paths[-1] if paths else None)
        exc = exc.__cause__ or exc.__context__
    return None


def failed_step(exc: BaseException) -> int | None:
    """The step an Orbax save error is about (its temporary step folder appears in the message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(exc))
        if found:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


class OrbaxErrorLogFilter(logging.Filter):
    """Drops Orbax's own ERROR log records (each with a page of traceback from its background threads).

    The trainer reports a failed save or restore itself, in one line; `--verbosity` brings them back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def quiet_orbax_leftovers(previous):
    """A `sys.unraisablehook` that drops what Orbax leaves behind after a failure the trainer reports itself.

    After a failed save (a full disk) every outstanding write's completion callback raises
    "Event loop is closed", which TensorStore hands to sys.unraisablehook (a traceback each).
    After a failed restore (a damaged step, moved aside in one line by `restore_latest`) Orbax's
    other read coroutines of that step are dropped with their exceptions still set, and Python
    prints each ("Exception ignored in: <coroutine ...>") with a page of TensorStore spec.
    Everything else goes to `previous`.
    """

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    return hook


def restore_params(ckpt_dir: str, step: int | None, abstract_pure, shardings):
    """Parameters (pure dict) of an Orbax checkpoint directory, straight into `shardings` (conversion's reader)."""
    from qwen_jax.checkpoint_format import restore_params as format_restore

    return format_restore(ckpt_dir, step, abstract_pure=abstract_pure, shardings=shardings)


# ---------------------------------------------------------------- Hugging Face side files
def is_qwen_tokenizer(folder: str | None) -> bool:
    if not folder:
        return False
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return "<|im_end|>" in text


def write_side_files(ckpt_dir: str, cfg: QwenConfig, *, hf_source: str | None = None,
                     tokenizer_dir: str | None = None) -> list[str]:
    """config.json, generation_config.json and tokenizer files at the checkpoint root (process 0 only)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    if hf_source and os.path.exists(os.path.join(hf_source, "config.json")):
        written = copy_side_files(hf_source, ckpt_dir)
        if tokenizer_dir and os.path.realpath(tokenizer_dir) != os.path.realpath(hf_source):
            # data.tokenizer overrides the folder's tokenizer: ship the one training used
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    atomic_copy(src, os.path.join(ckpt_dir, name))
                    written.append(name)
        return written
    written = []
    chat_tokenizer = is_qwen_tokenizer(tokenizer_dir or hf_source)
    src_config = os.path.join(hf_source, "config.json") if hf_source else None
    if src_config and os.path.exists(src_config):
        atomic_copy(src_config, os.path.join(ckpt_dir, "config.json"))
    else:
        hf_config = to_hf_dict(cfg)
        if chat_tokenizer:  # trained on ChatML turns: like Qwen's Instruct configs, stop at <|im_end|>
            hf_config["eos_token_id"] = QWEN_CHAT_EOS[0]
        atomic_write_json(os.path.join(ckpt_dir, "config.json"), hf_config)
    written.append("config.json")
    src_gen = os.path.join(hf_source, "generation_config.json") if hf_source else None
    if src_gen and os.path.exists(src_gen):
        atomic_copy(src_gen, os.path.join(ckpt_dir, "generation_config.json"))
    else:
        if chat_tokenizer:
            eos = QWEN_CHAT_EOS
        else:
            eos = list(cfg.eos_token_id)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos if len(eos) != 1 else eos[0]}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        atomic_write_json(os.path.join(ckpt_dir, "generation_config.json"), gen)
    written.append("generation_config.json")
    for folder in (hf_source, tokenizer_dir):
        if folder and os.path.isdir(folder):
            for name in TOKENIZER_FILES:
                src = os.path.join(folder, name)
                if os.path.exists(src) and name not in written:
                    atomic_copy(src, os.path.join(ckpt_dir, name))
                    written.append(name)
    return written


# ---------------------------------------------------------------- workdir lock
class WorkdirBusy(RuntimeError):
    pass


class WorkdirLock:
    """An exclusive `flock` on `<workdir>/.lock`: one training run per workdir.

    The kernel releases it when the process ends in any way (exit, SIGKILL), so a stale lock file
    never blocks a relaunch.  The file keeps the holder's pid for the refusal message.
    """

    FILE_NAME = ".lock"

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, self.FILE_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"workdir {workdir} is in use by another training run (pid {holder}, lock "
                                  f"{self.path}); wait for it to end or stop it, or use another --workdir") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------- preemption
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, nothing saved (the shell's code for SIGINT)


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a flag the training loop polls after each step.

    The loop then saves a checkpoint of the current step, waits for it, and exits.  A second
    SIGINT (Ctrl-C twice) ends the process at once without saving; a second SIGTERM is ignored.

    The signals are acted on by a watcher thread fed by `signal.set_wakeup_fd`, not by a Python
    handler in the main thread: the main thread may sit for minutes in one XLA call (a compile, a
    long step), and a Python-level handler would only run after it returns.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), announce=None):
        self.event = threading.Event()
        self.signum = None
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self._signals = tuple(int(s) for s in signals)
        self._previous = {}
        self._previous_fd = None
        self._reader = self._writer = None
        if threading.current_thread() is not threading.main_thread():
            return
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        for s in signals:
            self._previous[s] = signal.signal(s, self._python_handler)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="signal-watcher", daemon=True).start()

    @staticmethod
    def _python_handler(signum, frame):
        """Runs later in the main thread; the watcher thread has already acted on the signal."""
        del signum, frame

    def _watch(self):
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._signals:
                    self._handle(signum)

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.event.is_set():
            self.signum = signum
            self.event.set()
            again = " (Ctrl-C again to stop at once without saving)" if signum == signal.SIGINT else ""
            self.announce(f"{name} received: saving a checkpoint after the current step, then exiting{again}")
        elif signum == signal.SIGINT:
            self.announce("second SIGINT: stopped at once without saving; a relaunch resumes from the last "
                          "complete checkpoint")
            sys.stdout.flush()
            os._exit(EXIT_ABORTED)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def restore(self):
        if self._writer is None:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._writer.close()  # the watcher's recv returns b"": it ends
        self._writer = None

"""Orbax checkpoints of a training run: save (async, keep K), resume, SIGTERM, HF side files.

Layout (the contract shared with `tools/convert.py`)::

    <workdir>/checkpoints/                 CheckpointManager root
        config.json, generation_config.json, tokenizer files   (Hugging Face side files)
        <step>/params     ocp.args.StandardSave(nnx.to_pure_dict(param_state))
        <step>/opt_state  optax state (StandardSave)
        <step>/meta       JSON: step, rng, config, model config
        <step>/data       the data iterator's state (grain's handler, or JSON for synthetic data)

A step directory only appears once its (asynchronous) save has finished, so a run killed
mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.config import QwenConfig, to_hf_dict

log = logging.getLogger(__name__)

QWEN_CHAT_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


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


class Checkpointer:
    """One `ocp.CheckpointManager` with the items params, opt_state, meta, data."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict, data_iterator=None, force: bool = False) -> bool:
        items = {
            "params": ocp.args.StandardSave(state["params"]),
            "opt_state": ocp.args.StandardSave(state["opt_state"]),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items["data"] = _data_args(data_iterator, save=True)
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

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(ckpt_dir: str, step: int | None, abstract_pure, shardings):
    """Parameters (pure dict) of an Orbax checkpoint directory, straight into `shardings` (conversion's reader)."""
    from qwen_jax.checkpoint_format import restore_params as format_restore

    return format_restore(ckpt_dir, step, abstract_pure=abstract_pure, shardings=shardings)


# ---------------------------------------------------------------- Hugging Face side files
def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_copy(src: str, dst: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".tmp-")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
        from qwen_jax.checkpoint_format import copy_side_files

        return copy_side_files(hf_source, ckpt_dir)
    written = []
    chat_tokenizer = is_qwen_tokenizer(tokenizer_dir or hf_source)
    src_config = os.path.join(hf_source, "config.json") if hf_source else None
    if src_config and os.path.exists(src_config):
        _atomic_copy(src_config, os.path.join(ckpt_dir, "config.json"))
    else:
        hf_config = to_hf_dict(cfg)
        if chat_tokenizer:  # trained on ChatML turns: like Qwen's Instruct configs, stop at <|im_end|>
            hf_config["eos_token_id"] = QWEN_CHAT_EOS[0]
        _atomic_write(os.path.join(ckpt_dir, "config.json"), json.dumps(hf_config, indent=2) + "\n")
    written.append("config.json")
    src_gen = os.path.join(hf_source, "generation_config.json") if hf_source else None
    if src_gen and os.path.exists(src_gen):
        _atomic_copy(src_gen, os.path.join(ckpt_dir, "generation_config.json"))
    else:
        if chat_tokenizer:
            eos = QWEN_CHAT_EOS
        else:
            eos = list(cfg.eos_token_id)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos if len(eos) != 1 else eos[0]}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        _atomic_write(os.path.join(ckpt_dir, "generation_config.json"), json.dumps(gen, indent=2) + "\n")
    written.append("generation_config.json")
    for folder in (hf_source, tokenizer_dir):
        if folder and os.path.isdir(folder):
            for name in TOKENIZER_FILES:
                src = os.path.join(folder, name)
                if os.path.exists(src) and name not in written:
                    _atomic_copy(src, os.path.join(ckpt_dir, name))
                    written.append(name)
    return written


# ---------------------------------------------------------------- preemption
class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the training loop polls after each step.

    The loop then saves a checkpoint of the current step, waits for it, and exits with code 0.
    A second signal while saving is ignored.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.event = threading.Event()
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

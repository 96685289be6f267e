"""qwen-convert: Hugging Face <-> Orbax checkpoint conversion, streaming and lossless.

    qwen-convert hf-to-orbax --hf_dir D --out_dir O [--dtype bf16|fp16|fp32|keep] [--overwrite]
    qwen-convert orbax-to-hf --ckpt C [--step N] --out_dir O [--dtype ...] [--max_shard_size 5GB]
                             [--overwrite] [--allow_lint_errors]
    qwen-convert merge-lora --base B --adapter A --out O [--overwrite]

The Orbax side follows the checkpoint contract of `qwen_jax.checkpoint_format` (step
folders holding the `params` item, Hugging Face config/tokenizer files at the root).
`hf_to_orbax` is here, `orbax_to_hf` in `qwen_jax.hf.export`, merge-lora in `qwen_jax.lora`.

Guarantees: tensors are read and written one block at a time (one decoder layer of a
stacked parameter, or a band of vocabulary rows), so peak memory is about one block;
HF -> Orbax -> HF is bit-identical with `--dtype keep`; weights are read from safetensors
only (never unpickled, never `trust_remote_code`); output is written into a temporary
folder beside the target and renamed at the end, so a failure leaves nothing behind.
Exit status: 0 success, 1 conversion error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable

import numpy as np

from qwen_jax.hf.export import orbax_to_hf
from qwen_jax.hf.models import abstract_model, flat_paths
from qwen_jax.hf.names import hf_names, hf_shape, param_table, read_stacked, to_ours
from qwen_jax.hf.output import ConvertError, Progress, atomic_output, target_dtype, with_disk_errors
from qwen_jax.hf.safetensors_io import CheckpointError, check_tensors, open_reader

log = logging.getLogger("qwen_convert")


def _nested_set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------- hf -> orbax
def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str = "keep", overwrite: bool = False,
                progress: Callable[..., Progress] | None = None, compress: bool = False) -> str:
    """Convert a Hugging Face safetensors folder into a checkpoint directory (step 0). Returns out_dir.

    `compress`: zstd chunks, as the trainer's own checkpoints are written.  Off by default: on weights
    it saves about a tenth of the disk for 1.6x the CPU time and 1.5x the peak memory (Qwen2-0.5B
    fp32 on 2 CPUs: 10.0 -> 6.1 CPU s, 1.37 -> 0.90 GiB, 1.7 -> 1.9 GB), and restores read both."""
    from qwen_jax import checkpoint_format as cf
    from qwen_jax.checkpoint_format import block_rows_for
    from qwen_jax.config import load_hf_config

    hf_dir = os.path.abspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: not a folder (expected a Hugging Face model folder)")
    target = target_dtype(dtype)
    out = os.path.abspath(out_dir)
    if os.path.lexists(out) and not overwrite:
        raise ConvertError(f"{out}: already exists; pass --overwrite to replace it (it was left untouched)")
    cfg = load_hf_config(hf_dir)
    cf.side_files(hf_dir)  # a symlink that leads outside the folder stops here, before any work
    reader = open_reader(hf_dir)
    try:
        _, abstract_state = abstract_model(cfg)
        abstract = flat_paths(abstract_state)
        check_tensors(cfg, reader, abstract, hf_dir)
        table = param_table(cfg)
        layers = cfg.num_hidden_layers
        lazy: dict = {}
        total_bytes = 0
        for spec in table:
            shape = tuple(abstract[spec.path].shape)
            names = hf_names(spec, layers)
            source_dtypes = {reader.numpy_dtype(n) for n in names}
            if target is None and len(source_dtypes) > 1:
                raise ConvertError(f"{hf_dir}: layers of {spec.hf_name} have different dtypes "
                                   f"{sorted(map(str, source_dtypes))}; pass --dtype to choose one")
            dt = target if target is not None else source_dtypes.pop()
            arr = _lazy_from_hf(reader, spec, shape, dt, block_rows_for)
            total_bytes += arr.nbytes
            _nested_set(lazy, spec.path, arr)
        total_tensors = sum(len(hf_names(s, layers)) for s in table)
        bar = (progress or Progress)("hf-to-orbax", total_tensors, total_bytes)
        blocks_per_param = {".".join(s.path): (layers if s.stacked else None) for s in table}

        def on_block(name, nbytes, last):
            # one tensor = one layer of a stacked parameter, or the whole of a non-stacked one
            bar.update(nbytes, tensor_done=last or blocks_per_param.get(name) is not None)

        with atomic_output(out, overwrite, sources=(hf_dir,)) as tmp:
            largest = max(reader.nbytes(n) for n in reader.files)
            with_disk_errors(lambda: cf.save_params_streaming(tmp, 0, lazy, on_block=on_block, budget=largest,
                                                              compress=compress), out)
            copied = cf.copy_side_files(hf_dir, tmp)
        bar.close()
        log.info("wrote %s (step 0; side files: %s)", out, ", ".join(copied))
        return out
    finally:
        reader.close()


def _lazy_from_hf(reader, spec, shape, dt, block_rows_for):
    from qwen_jax.checkpoint_format import LazyArray

    if spec.stacked:
        def read_layer(k):
            return np.ascontiguousarray(read_stacked(reader, spec, k, shape[1:]).astype(dt, copy=False))[None]

        return LazyArray(shape, dt, 0, 1, read_layer)
    if spec.transform in ("copy", "t") and len(shape) == 2:
        rows, cols = hf_shape(spec, shape)
        band = block_rows_for(rows, cols, dt, reader.numpy_dtype(spec.hf_name))
        axis = 0 if spec.transform == "copy" else 1

        def read_band(k):
            part = reader.read_rows(spec.hf_name, k * band, (k + 1) * band).astype(dt, copy=False)
            return np.ascontiguousarray(part if axis == 0 else part.T)

        return LazyArray(shape, dt, axis, band, read_band)

    def read_whole(k):
        return np.ascontiguousarray(to_ours(spec, reader.read(spec.hf_name), shape).astype(dt, copy=False))

    return LazyArray(shape, dt, 0, shape[0], read_whole)


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors folder -> Orbax checkpoint directory (step 0)")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out_dir", required=True)
    a.add_argument("--dtype", default="keep", choices=["bf16", "fp16", "fp32", "keep"])
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    a.add_argument("--compress", action="store_true",
                   help="zstd-compress the checkpoint's chunks (about a tenth smaller; slower, more memory)")
    b = sub.add_parser("orbax-to-hf", help="Orbax checkpoint directory (converted or training) -> Hugging Face folder")
    b.add_argument("--ckpt", required=True, help="checkpoint directory (CheckpointManager root)")
    b.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    b.add_argument("--out_dir", required=True)
    b.add_argument("--dtype", default="keep", choices=["bf16", "fp16", "fp32", "keep"])
    b.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB, 2GiB)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    b.add_argument("--allow_lint_errors", action="store_true", help="export even if the config linter reports errors")
    add_lora_commands(sub)
    return p


# ---------------------------------------------------------------- LoRA (core logic in qwen_jax/lora.py)
def add_lora_commands(sub) -> None:
    m = sub.add_parser("merge-lora", help="Hugging Face base folder + PEFT LoRA adapter folder -> merged HF folder")
    m.add_argument("--base", required=True, help="Hugging Face model folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    m.add_argument("--out", required=True, help="merged Hugging Face folder (written atomically)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_lora_command(args) -> None:
    from qwen_jax.lora import merge_folders

    merge_folders(args.base, args.adapter, args.out, overwrite=args.overwrite)
    log.info("wrote %s", os.path.abspath(args.out))


def main(argv: list[str] | None = None) -> int:
    from qwen_jax.config import ConfigError
    from qwen_jax.lora import LoraError

    args = build_parser().parse_args(argv)
    # SIGTERM -> SystemExit, so the temporary output folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.command == "merge-lora":
            run_lora_command(args)
        elif args.command == "hf-to-orbax":
            hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, compress=args.compress)
        else:
            orbax_to_hf(args.ckpt, args.out_dir, step=args.step, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        allow_lint_errors=args.allow_lint_errors)
    except (ConvertError, ConfigError, CheckpointError, LoraError) as e:
        print(f"qwen-convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"qwen-convert: error: no space left on device ({e}); nothing was written", file=sys.stderr)
        else:
            print(f"qwen-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bad input to the trainer: one line `error: ...` naming the flag, key or file(:line), exit 2, no traceback, and the
workdir not created.

The table runs in-process through `train.launch` (what the CLI's `main` calls after parsing flags: the same
validation, pipeline construction and `fail`), on the 8 CPU devices of conftest.  A handful of cases run the real
command line in a subprocess, for the flag parsing, the JSON list override and the exit code.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs.base import get_config
from qwen_jax import run_config, train
from qwen_jax.data.schedule import Stage
from tests import train_launch as tl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files (good, empty, malformed, not UTF-8) and a Hugging Face folder whose config disagrees with it."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "good.jsonl").write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "unterminated"\n{"text": "fine"}\n')
    (d / "list.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    (d / "latin1.jsonl").write_bytes('{"text": "fine"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (d / "data.csv").write_text("text\nhello\n")
    (d / "junk.parquet").write_text("not parquet")
    (d / "a_file").write_text("not a folder")
    _hf_folder_with_wrong_config(d / "hf_mismatch")
    return d


def _hf_folder_with_wrong_config(folder):
    """Every tensor a Qwen2 with intermediate_size 96 has (zeros; only the header matters), config.json saying 128."""
    from safetensors.numpy import save_file

    from qwen_jax.config import config_from_dict
    from qwen_jax.hf.models import abstract_model, flat_paths
    from qwen_jax.hf.names import hf_names, hf_shape, param_table

    raw = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    cfg = config_from_dict(raw)
    abstract = flat_paths(abstract_model(cfg)[1])
    tensors = {}
    for spec in param_table(cfg):
        shape = abstract[spec.path].shape
        for name in hf_names(spec, cfg.num_hidden_layers):
            tensors[name] = np.zeros(hf_shape(spec, shape[1:] if spec.stacked else shape), np.float32)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))


def _config(overrides: dict, files):
    c = get_config()
    c.synthetic_data = True
    c.model.overrides = "vocab_size=512"
    c.model.dtype = "float32"
    c.data.seq_len = 64
    for key, value in overrides.items():
        if isinstance(value, str) and "{files}" in value:
            value = value.replace("{files}", str(files))
        if key == "data.sources":
            c.synthetic_data = False
            value = [{**s, "path": s["path"].replace("{files}", str(files))} for s in value]
        run_config.apply_overrides(c, {key: value})
    return c


def _text(name):
    return [{"path": "{files}/" + name, "kind": "text"}]


# (id, config overrides, what the one line must name)
BAD = [
    ("total_steps", {"total_steps": 0}, ["'total_steps'", ">= 1", "got 0"]),
    ("save_every", {"save_every": -1}, ["'save_every'"]),
    ("keep_checkpoints", {"keep_checkpoints": 0}, ["'keep_checkpoints'", ">= 1"]),
    ("nonfinite_mode", {"nonfinite": "ignore"}, ["'nonfinite'", "stop | skip", "'ignore'"]),
    ("synthetic_layout", {"synthetic_layout": "full"}, ["'synthetic_layout'", "packed | full_rows", "'full'"]),
    ("synthetic_layout_without_synthetic_data", {"synthetic_layout": "full_rows", "synthetic_data": False},
     ["'synthetic_layout'", "full_rows", "synthetic_data=True"]),
    ("global_batch_size_0", {"data.global_batch_size": 0}, ["'data.global_batch_size'"]),
    ("global_batch_size_neg", {"data.global_batch_size": -8}, ["'data.global_batch_size'"]),
    ("seq_len", {"data.seq_len": 0}, ["'data.seq_len'"]),
    ("grad_accum", {"grad_accum_steps": 3}, ["grad_accum_steps=3", "data.global_batch_size=8"]),
    ("lr_nan", {"optimizer.learning_rate": float("nan")}, ["'optimizer.learning_rate'", "nan"]),
    ("lr_schedule", {"optimizer.schedule": "cosin"}, ["'optimizer.schedule'", "'cosin'"]),
    ("preset", {"model.preset": "qwen9-1b"}, ["'model.preset'", "'qwen9-1b'", "tiny"]),
    ("moe_dispatch", {"model.moe_dispatch": "alltoall"}, ["'model.moe_dispatch'", "all_to_all | all_gather",
                                                          "'alltoall'"]),
    ("moe_matmul", {"model.moe_matmul": "cutlass"}, ["'model.moe_matmul'", "auto | xla | mosaic_gpu", "'cutlass'"]),
    ("moe_matmul_off_hopper", {"model.moe_matmul": "mosaic_gpu"}, ["'model.moe_matmul'", "Hopper", "auto or xla"]),
    ("overrides_type", {"model.overrides": "vocab_size=abc"}, ["'model.overrides'", "vocab_size", "'abc'"]),
    ("overrides_key", {"model.overrides": "vocab_sise=3"}, ["'model.overrides'", "'vocab_sise'"]),
    ("overrides_value", {"model.overrides": "vocab_size=-3"}, ["'vocab_size'", "-3"]),
    ("mesh_not_dividing", {"mesh.data": 3}, ["'mesh'", "8 devices"]),
    ("mesh_too_big", {"mesh.fsdp": 16}, ["'mesh'", "needs 16 devices, 8 available"]),
    ("mesh_seq_without_ring", {"mesh.seq": 2, "mesh.fsdp": 4}, ["'mesh.seq'", "ring attention"]),
    ("schedule_syntax", {"data.seq_len_schedule": "64-0"}, ["data.seq_len_schedule", "'64-0'"]),
    ("schedule_start", {"data.seq_len_schedule": "64:5"}, ["data.seq_len_schedule", "step 0"]),
    ("schedule_tokens", {"data.seq_len_schedule": "64:0,96:4"}, ["data.seq_len_schedule", "96"]),
    # a later stage's microbatch (4 x 128 -> 2 after grad accumulation) no longer divides over data x fsdp = 4
    ("schedule_stage_mesh", {"data.global_batch_size": 16, "grad_accum_steps": 2, "mesh.fsdp": 4, "mesh.tensor": 2,
                             "data.seq_len_schedule": "64:0,256:3"},
     ["data.seq_len_schedule stage 256:3", "microbatch 2", "data x fsdp x expert = 4"]),
    ("schedule_stage_accum", {"data.global_batch_size": 16, "grad_accum_steps": 4, "mesh.fsdp": 4, "mesh.tensor": 2,
                              "data.seq_len_schedule": "64:0,128:5:6"},
     ["data.seq_len_schedule stage 128:5", "grad_accum_steps=4"]),
    ("schedule_stage_ring", {"mesh.seq": 2, "mesh.fsdp": 4, "model.attention": "ring",
                             "data.seq_len_schedule": "64:0,66:2:8"},
     ["data.seq_len_schedule stage 66:2", "ring attention", "2 x 2"]),
    ("init_from_missing", {"model.init_from": "{files}/no_such_model"}, ["'model.init_from'", "no_such_model"]),
    ("init_from_file", {"model.init_from": "{files}/a_file"}, ["'model.init_from'", "not a directory"]),
    ("init_from_shapes", {"model.init_from": "{files}/hf_mismatch", "model.overrides": ""},
     ["'model.init_from'", "hf_mismatch", "mlp.down_proj.weight: file (64, 96) vs config (64, 128)"]),
    ("data_missing", {"data.sources": _text("nope.jsonl")}, ["data.sources[0].path", "nope.jsonl", "matches no file"]),
    ("data_glob_missing", {"data.sources": _text("*.pq")}, ["data.sources[0].path", "matches no file"]),
    ("data_directory", {"data.sources": [{"path": "{files}", "kind": "text"}]}, ["data.sources[0].path",
                                                                                 "is a directory"]),
    ("data_suffix", {"data.sources": _text("data.csv")}, ["data.sources[0].path", "data.csv", ".jsonl"]),
    ("data_kind", {"data.sources": [{"path": "{files}/good.jsonl", "kind": "txt"}]}, ["data.sources[0].kind",
                                                                                      "'txt'"]),
    ("data_weight", {"data.sources": _text("good.jsonl") + [{"path": "{files}/good.jsonl", "weight": 0}]},
     ["data.sources[1].weight"]),
    ("data_no_sources", {"data.sources": []}, ["data.sources is empty"]),
    ("data_tokenizer", {"data.sources": _text("good.jsonl"), "data.tokenizer": "{files}/no_tokenizer"},
     ["'data.tokenizer'", "no_tokenizer"]),
    ("data_empty", {"data.sources": _text("empty.jsonl")}, ["data.sources[0].path", "empty.jsonl", "is empty"]),
    ("data_blank_lines", {"data.sources": _text("blank.jsonl")}, ["blank.jsonl", "is empty"]),
    ("data_malformed", {"data.sources": _text("bad.jsonl")}, ["bad.jsonl:3:", "not valid JSON", "at column 24"]),
    ("data_not_object", {"data.sources": _text("list.jsonl")}, ["list.jsonl:2:", "JSON object"]),
    ("data_not_utf8", {"data.sources": _text("latin1.jsonl")}, ["latin1.jsonl:2:", "not UTF-8", "0xe9"]),
    ("data_parquet_junk", {"data.sources": _text("junk.parquet")}, ["junk.parquet", "not a readable Parquet file"]),
    ("freeze_nothing", {"freeze": "layers/mlp/gate_projj"}, ["'freeze'", "matches no parameter"]),
]


def _assert_one_error_line(code, err, expect):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in expect:
        assert part in lines[0], (part, lines[0])


def _launch_in_process(config, workdir, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.launch(config, str(workdir))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, expect", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_and_leaves_nothing(overrides, expect, files, tmp_path, capsys):
    workdir = tmp_path / "run"
    code, err = _launch_in_process(_config(overrides, files), workdir, capsys)
    _assert_one_error_line(code, err, expect)
    assert not workdir.exists()


@pytest.mark.parametrize("setup, expect", [
    ("file", ["--workdir=", "exists and is not a directory"]),
    ("under_file", ["--workdir=", "is not a directory"]),
    ("read_only", ["--workdir=", "is not writable"]),
])
def test_bad_workdir(setup, expect, files, tmp_path, capsys):
    if setup == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    if setup == "file":
        workdir = tmp_path / "run"
        workdir.write_text("x")
    elif setup == "under_file":
        (tmp_path / "f").write_text("x")
        workdir = tmp_path / "f" / "run"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        workdir = tmp_path / "ro" / "run"
    before = sorted(os.listdir(tmp_path))
    code, err = _launch_in_process(_config({}, files), workdir, capsys)
    _assert_one_error_line(code, err, expect)
    assert sorted(os.listdir(tmp_path)) == before
    if setup == "file":
        assert workdir.read_text() == "x"


def test_validate_describes_the_run(files, tmp_path):
    config = _config({"data.global_batch_size": 16, "grad_accum_steps": 2, "mesh.fsdp": 4, "mesh.tensor": 2,
                      "data.seq_len_schedule": "32:0,64:4", "model.overrides": "vocab_size=512,eos_token_id=[1, 2]"},
                     files)
    spec = run_config.validate(config, str(tmp_path / "run"), num_devices=8)
    assert spec.workdir == str(tmp_path / "run") and not (tmp_path / "run").exists()
    assert spec.mesh_shape == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2, "seq": 1}
    assert spec.stages == (Stage(32, 0, 16), Stage(64, 4, 8))
    assert spec.source == "preset" and spec.model.vocab_size == 512 and spec.model.eos_token_id == (1, 2)


def test_own_config_file_example_validates(tmp_path):
    """The config file of one's own that docs/training.md shows."""
    config = run_config.load_config_file("configs/example_sft.py")
    spec = run_config.validate(config, str(tmp_path / "run"), num_devices=1)
    assert [s["path"] for s in config.data.sources] == ["bundled:chat.jsonl"]
    assert spec.stages[0].seq_len == config.data.seq_len


# ---------------------------------------------------------------- the real command line (a handful)
@pytest.mark.parametrize("args, expect", [
    (["--config.model.overrides=vocab_size=abc"], ["'model.overrides'", "vocab_size", "'abc'"]),
    # the JSON list reaches the config: the error names its path
    (['--config.data.sources=[{"path": "/no/such/file.jsonl", "kind": "text"}]', "--config.synthetic_data=false"],
     ["data.sources[0].path", "/no/such/file.jsonl"]),
    (["--workdr=/tmp/x"], ["workdr"]),
    # a coordinator without its partners: refused before jax.distributed.initialize (which would wait for one)
    (["--coordinator_address=localhost:1234"], ["--coordinator_address given without", "--num_processes",
                                                "--process_id"]),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"], ["--process_id=2", "[0, 2)"]),
])
def test_cli_bad_input(args, expect, tmp_path):
    result = tl.run(tmp_path / "run", *args)
    _assert_one_error_line(result.returncode, result.stderr, expect)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode, flags, environ, expect", [
    ("env", ("h:1", None, None), {}, ["--coordinator_address given without --num_processes", "--process_id"]),
    ("env", (None, None, 0), {}, ["--process_id given without --coordinator_address"]),
    ("env", (None, 2, None), {"JAX_PROCESS_ID": "1"}, ["--num_processes and JAX_PROCESS_ID given without "
                                                       "--coordinator_address (or JAX_COORDINATOR_ADDRESS)"]),
    ("env", (None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                 "JAX_PROCESS_ID": "0"}, ["JAX_NUM_PROCESSES='two'", "integer"]),
    ("env", ("nohostport", 2, 0), {}, ["--coordinator_address='nohostport'", "host:port"]),
    ("env", ("h:1", 0, 0), {}, ["--num_processes=0", ">= 1"]),
    ("env", ("h:1", 2, -1), {}, ["--process_id=-1", "[0, 2)"]),
    ("auto", ("h:1", None, None), {}, ["--coordinator_address", "--distributed=auto"]),
])
def test_distributed_flags_checked_as_a_set(mode, flags, environ, expect):
    with pytest.raises(run_config.RunConfigError) as e:
        run_config.distributed_settings(mode, *flags, environ)
    for part in expect:
        assert part in str(e.value), str(e.value)


def test_distributed_settings_from_flags_or_environment():
    assert not run_config.distributed_settings("env", None, None, None, {}).multi_process
    got = run_config.distributed_settings("env", None, 4, None, {"JAX_COORDINATOR_ADDRESS": "h0:1234",
                                                                  "JAX_PROCESS_ID": "3", "JAX_NUM_PROCESSES": "9"})
    assert got == run_config.Distributed("h0:1234", 4, 3) and got.multi_process  # the flag wins over its variable
    assert not run_config.distributed_settings("env", "h0:1234", 1, 0, {}).multi_process  # one process: no init
    assert run_config.distributed_settings("off", None, None, None, {"JAX_PROCESS_ID": "3"}).coordinator_address is None

"""qwen-convert: HF -> Orbax -> HF round trips, transformers/qwen_jax loading, dtype options, bad input, CLI."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from qwen_jax import checkpoint_format as cf
from qwen_jax import from_pretrained
from qwen_jax.config import ConfigError, config_from_dict, load_hf_config
from qwen_jax.hf import convert, export
from qwen_jax.hf.models import abstract_model
from qwen_jax.hf.safetensors_io import CheckpointError, TensorReader, parse_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = {
    "tokenizer_config.json": '{"model_max_length": 512, "eos_token": "<|im_end|>"}\n',
    "vocab.json": '{"a": 0, "b": 1}\n',
    "merges.txt": "#version: 0.2\na b\n",
    "special_tokens_map.json": '{"eos_token": "<|im_end|>"}\n',
}

MODELS = {
    # name: (model_type, tied, torch dtype, max_shard_size for save_pretrained or None)
    "qwen2_tied_bf16_single": ("qwen2", True, torch.bfloat16, None),
    "qwen2_untied_fp32_sharded": ("qwen2", False, torch.float32, "40KB"),
    "qwen3_untied_bf16_sharded": ("qwen3", False, torch.bfloat16, "20KB"),
    "qwen3_tied_fp32_single": ("qwen3", True, torch.float32, None),
}


def _make_hf(folder: str, model_type: str, tied: bool, dtype, shard) -> None:
    common = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=tied,
                  rope_theta=1e6, eos_token_id=[151645, 151643], bos_token_id=151643)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    else:
        cfg = transformers.Qwen3Config(head_dim=16, **common,
                                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 1024})
    torch.manual_seed(hash(folder) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # make every tensor distinct (norms are all ones at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.save_pretrained(folder)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def models(work):
    """name -> (hf source, orbax checkpoint, hf export)."""
    out = {}
    for name, (model_type, tied, dtype, shard) in MODELS.items():
        hf = str(work / name / "hf")
        _make_hf(hf, model_type, tied, dtype, shard)
        ox = convert.hf_to_orbax(hf, str(work / name / "orbax"))
        back = convert.orbax_to_hf(ox, str(work / name / "hf_back"), max_shard_size="30KB")
        out[name] = (hf, ox, back)
    return out


def _tensors(folder):
    reader = TensorReader(folder)
    return {n: reader.read(n) for n in reader.files}


def _assert_identical(a_dir, b_dir, ignore=()):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert set(a) - set(ignore) == set(b) - set(ignore)
    for n in set(a) - set(ignore):
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert a[n].tobytes() == b[n].tobytes(), n


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(MODELS))
def test_roundtrip_bit_identical_and_config(models, name):
    hf, ox, back = models[name]
    _assert_identical(hf, back)
    assert sorted(os.listdir(back)).count("model.safetensors.index.json") == 1
    if MODELS[name][3]:
        assert any(f.endswith("-of-00001.safetensors") is False and f.startswith("model-") for f in os.listdir(back))
    # config: same semantics (and here: the very same file), generation config and tokenizer files kept
    assert _read_json(os.path.join(back, "config.json")) == _read_json(os.path.join(hf, "config.json"))
    assert load_hf_config(back) == load_hf_config(hf)
    for side in ["generation_config.json", *TOKENIZER_FILES]:
        with open(os.path.join(hf, side)) as f1, open(os.path.join(back, side)) as f2:
            assert f1.read() == f2.read(), side
        assert os.path.exists(os.path.join(ox, side))
    assert os.listdir(ox) and "0" in os.listdir(ox)
    assert not [f for f in os.listdir(os.path.dirname(back)) if ".tmp-" in f]


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_loads_export(models, name):
    hf, _, back = models[name]
    src = transformers.AutoModelForCausalLM.from_pretrained(hf)
    out, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    with torch.no_grad():
        assert torch.equal(src(ids).logits, out(ids).logits)


def test_restored_orbax_params_match_from_pretrained(models):
    for name in ("qwen2_tied_bf16_single", "qwen3_untied_bf16_sharded"):
        hf, ox, back = models[name]
        ref = from_pretrained(hf, param_dtype="keep")
        cfg = load_hf_config(ox, param_dtype="bfloat16")
        graphdef, abstract_state = abstract_model(cfg)
        abstract_pure = nnx.to_pure_dict(abstract_state)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = cf.restore_params(ox, abstract_pure=abstract_pure,
                                   shardings=jax.tree.map(lambda _, s=sharding: s, abstract_pure))
        assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(nnx.state(ref, nnx.Param)))
        nnx.replace_by_pure_dict(abstract_state, params)
        model = nnx.merge(graphdef, abstract_state)
        ids = jnp.array([[1, 5, 9, 33, 7, 100]])
        np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(ref(ids)))
        again = from_pretrained(back, param_dtype="keep")
        np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(ref(ids)))


def test_plain_checkpoint_manager_restore(models):
    import orbax.checkpoint as ocp

    _, ox, _ = models["qwen2_untied_fp32_sharded"]
    cfg = load_hf_config(ox)
    _, abstract_state = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract_state)
    with ocp.CheckpointManager(ox) as mngr:
        assert mngr.latest_step() == 0
        restored = mngr.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_pure)))
    leaves = jax.tree.leaves(restored["params"])
    assert leaves and all(x.dtype == np.float32 for x in leaves)


def test_dtype_options(models, work):
    hf, _, _ = models["qwen2_tied_bf16_single"]
    ox32 = convert.hf_to_orbax(hf, str(work / "dt" / "orbax_fp32"), dtype="fp32")
    reader = cf.ParamReader(ox32, 0)
    assert all(reader.dtype(p) == np.float32 for p in reader.paths)
    back16 = convert.orbax_to_hf(ox32, str(work / "dt" / "hf_bf16"), dtype="bf16")
    _assert_identical(hf, back16)  # bf16 -> fp32 -> bf16 is exact
    back32 = convert.orbax_to_hf(ox32, str(work / "dt" / "hf_fp32"))
    cfg32 = _read_json(os.path.join(back32, "config.json"))
    assert cfg32.get("dtype", cfg32.get("torch_dtype")) == "float32"
    a, b = _tensors(hf), _tensors(back32)
    for n in a:
        assert b[n].dtype == np.float32
        np.testing.assert_array_equal(a[n].astype(np.float32), b[n])


def _disk_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_compress_flag_writes_smaller_chunks_that_restore_exactly(models, work):
    """hf-to-orbax writes raw chunks unless --compress (zstd, as trainer checkpoints): the compressed
    checkpoint is smaller on disk, and both export back bit-identical to the source."""
    hf, raw, _ = models["qwen2_untied_fp32_sharded"]
    packed = str(work / "zstd" / "orbax")
    assert convert.main(["hf-to-orbax", "--hf_dir", hf, "--out_dir", packed, "--compress"]) == 0
    assert _disk_bytes(packed) < 0.97 * _disk_bytes(raw)
    _assert_identical(hf, convert.orbax_to_hf(packed, str(work / "zstd" / "hf_back")))


def test_training_checkpoint_params_only(models, work, monkeypatch):
    """A checkpoint in Orbax's default layout (jax arrays, extra items, several steps; one chunk per stacked
    parameter, as trainer checkpoints were stored before `params_save_args`) exports its params only,
    decoding each stored chunk once (one read, not one per layer)."""
    import orbax.checkpoint as ocp

    hf, _, _ = models["qwen3_untied_bf16_sharded"]
    ckpt = str(work / "train_ckpt")
    model = from_pretrained(hf, param_dtype="keep")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt = jax.tree.map(jnp.zeros_like, params)
    with ocp.CheckpointManager(ckpt) as mngr:
        for step, scale in ((1, 1.0), (5, 2.0)):
            p = jax.tree.map(lambda x, s=scale: (x * s).astype(x.dtype), params)
            mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(p),
                                                    opt_state=ocp.args.StandardSave({"mu": opt}),
                                                    meta=ocp.args.JsonSave({"step": step})))
        mngr.wait_until_finished()
    for name in cf.side_files(hf):
        shutil.copy(os.path.join(hf, name), ckpt)
    reads = []
    real_read = cf.ParamReader.read
    monkeypatch.setattr(cf.ParamReader, "read", lambda self, path, index=(): reads.append(path) or
                        real_read(self, path, index))
    latest = convert.orbax_to_hf(ckpt, str(work / "train_export_latest"))
    reader = cf.ParamReader(ckpt, 5)
    assert all(reader.chunk_shape(p) == reader.shape(p) for p in reader.paths)  # the layout this test is about
    assert sorted(reads) == sorted(reader.paths)
    monkeypatch.undo()
    first = convert.orbax_to_hf(ckpt, str(work / "train_export_1"), step=1)
    _assert_identical(hf, first)
    doubled = _tensors(latest)
    for n, x in _tensors(hf).items():
        np.testing.assert_array_equal(doubled[n], (x.astype(np.float32) * 2).astype(x.dtype))
    with pytest.raises(convert.ConvertError, match="no step 3"):
        convert.orbax_to_hf(ckpt, str(work / "train_export_3"), step=3)
    assert cf.restore_params(ckpt, step=1)["embed_tokens"]["embedding"].shape == (151936, 32)


def test_trainer_checkpoints_store_one_layer_a_chunk_and_export_exactly(models, work, monkeypatch):
    """The trainer's save (`checkpoint.Checkpointer`) stores each stacked parameter in chunks of one layer
    and every array in chunks of at most STORED_CHUNK_BYTES (lowered here to 64 KiB so the tiny model's
    embedding must be split), so an export never decodes a whole stacked parameter to read one layer; the
    export is bit-identical."""
    from qwen_jax.checkpoint import Checkpointer

    monkeypatch.setattr(cf, "STORED_CHUNK_BYTES", 64 << 10)
    hf, _, _ = models["qwen3_untied_bf16_sharded"]
    ckpt = str(work / "trainer_layout_ckpt")
    params = nnx.to_pure_dict(nnx.state(from_pretrained(hf, param_dtype="keep"), nnx.Param))
    saver = Checkpointer(ckpt, async_save=False)
    saver.save(3, {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}}, {"step": 3})
    saver.close()
    for name in cf.side_files(hf):
        shutil.copy(os.path.join(hf, name), ckpt)
    reader = cf.ParamReader(ckpt, 3)
    stacked = [p for p in reader.paths if p[0] == "layers"]
    assert stacked and all(reader.chunk_shape(p)[0] == 1 for p in stacked)
    itemsize = {p: np.dtype(reader.dtype(p)).itemsize for p in reader.paths}
    assert all(np.prod(reader.chunk_shape(p)) * itemsize[p] <= cf.STORED_CHUNK_BYTES for p in reader.paths)
    assert max(reader.shape(p)[0] for p in stacked) > 1  # several layers: one chunk each
    embedding = ("embed_tokens", "embedding")
    assert reader.chunk_shape(embedding) != reader.shape(embedding)  # 9.7 MB: split under the bound
    _assert_identical(hf, convert.orbax_to_hf(ckpt, str(work / "trainer_layout_export")))


# ---------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return str(dst)


def _assert_no_output(out):
    parent = os.path.dirname(os.path.abspath(out))
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(out)}.tmp-")]


def _rewrite_single(folder, edit):
    from safetensors.numpy import load_file, save_file

    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_extra_misshaped_tensors(models, work):
    hf, _, _ = models["qwen2_tied_bf16_single"]
    bad = _copy(hf, work / "bad_missing")
    _rewrite_single(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        convert.hf_to_orbax(bad, str(work / "out_missing"))
    _assert_no_output(str(work / "out_missing"))

    bad = _copy(hf, work / "bad_extra")
    _rewrite_single(bad, lambda t: t.update({"model.layers.7.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.7.mlp.extra.weight"):
        convert.hf_to_orbax(bad, str(work / "out_extra"))
    _assert_no_output(str(work / "out_extra"))

    bad = _copy(hf, work / "bad_shape")
    cfg = _read_json(os.path.join(bad, "config.json"))
    cfg["intermediate_size"] = 48
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="disagrees with config.json.*mlp.gate_proj"):
        convert.hf_to_orbax(bad, str(work / "out_shape"))
    _assert_no_output(str(work / "out_shape"))


def test_truncated_and_corrupt_safetensors(models, work):
    hf, _, _ = models["qwen2_tied_bf16_single"]
    bad = _copy(hf, work / "bad_trunc")
    file = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert.hf_to_orbax(bad, str(work / "out_trunc"))
    _assert_no_output(str(work / "out_trunc"))
    with open(file, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert.hf_to_orbax(bad, str(work / "out_corrupt"))
    _assert_no_output(str(work / "out_corrupt"))


def test_unknown_model_type(models, work):
    hf, ox, _ = models["qwen2_tied_bf16_single"]
    bad = _copy(hf, work / "bad_type")
    cfg = _read_json(os.path.join(bad, "config.json"))
    cfg["model_type"] = "llama"
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="model_type.*llama"):
        convert.hf_to_orbax(bad, str(work / "out_type"))
    _assert_no_output(str(work / "out_type"))


def test_checkpoint_disagreeing_with_config(models, work):
    _, ox, _ = models["qwen2_untied_fp32_sharded"]
    bad = _copy(ox, work / "bad_ckpt_cfg")
    cfg = _read_json(os.path.join(bad, "config.json"))
    cfg["tie_word_embeddings"] = True
    cfg["hidden_size"] = 64
    cfg["num_attention_heads"] = 8
    cfg["num_key_value_heads"] = 4
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="unexpected parameters.*lm_head/kernel.*disagrees with config.json"):
        convert.orbax_to_hf(bad, str(work / "out_ckpt_cfg"))
    _assert_no_output(str(work / "out_ckpt_cfg"))


def test_existing_output_refused_then_overwritten(models, work):
    hf, ox, _ = models["qwen2_tied_bf16_single"]
    out = work / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for call in (lambda **kw: convert.hf_to_orbax(hf, str(out), **kw),
                 lambda **kw: convert.orbax_to_hf(ox, str(out), **kw)):
        with pytest.raises(convert.ConvertError, match="already exists.*--overwrite"):
            call()
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    convert.orbax_to_hf(ox, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out)
    _assert_identical(hf, str(out))
    with pytest.raises(convert.ConvertError, match="is the input folder"):
        convert.orbax_to_hf(ox, ox, overwrite=True)


def test_overwrite_keeps_the_old_export_until_the_new_one_is_complete(models, work, monkeypatch):
    from qwen_jax.hf import safetensors_io

    hf, ox, _ = models["qwen2_untied_fp32_sharded"]
    out = str(work / "reexport")
    convert.orbax_to_hf(ox, out, max_shard_size="20KB")
    before = {name: (work / "reexport" / name).read_bytes() for name in os.listdir(out)}
    real_write = safetensors_io.SafetensorsWriter.write_at
    calls = {"n": 0}

    def failing_write(self, name, block, start=0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed mid-export")
        return real_write(self, name, block, start)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write_at", failing_write)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        convert.orbax_to_hf(ox, out, overwrite=True)
    assert {name: (work / "reexport" / name).read_bytes() for name in os.listdir(out)} == before
    monkeypatch.undo()
    convert.orbax_to_hf(ox, out, overwrite=True)  # a single shard now: the old shard files are gone
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]
    _assert_identical(hf, out)
    assert not [f for f in os.listdir(work) if f.startswith(".reexport.")]


# ---------------------------------------------------------------- symlinks and index paths
def _linked_model(models, work, name):
    """A copy of a small model folder (single safetensors file) and a folder outside it."""
    hf, _, _ = models["qwen2_tied_bf16_single"]
    folder = _copy(hf, work / name / "model")
    outside = work / name / "elsewhere"
    outside.mkdir(exist_ok=True)
    return folder, outside


def test_side_file_symlink_outside_the_folder_is_refused(models, work):
    folder, outside = _linked_model(models, work, "link_out")
    (outside / "merges.txt").write_text("#version: 0.2\nsecret\n")
    os.remove(os.path.join(folder, "merges.txt"))
    os.symlink(outside / "merges.txt", os.path.join(folder, "merges.txt"))
    out = str(work / "link_out" / "orbax")
    with pytest.raises(CheckpointError, match=r"merges.txt.*resolves to .*elsewhere/merges.txt.*outside"):
        convert.hf_to_orbax(folder, out)
    _assert_no_output(out)
    with pytest.raises(CheckpointError, match="merges.txt.*outside"):
        cf.copy_side_files(folder, str(work / "link_out"))
    # the same rule for a checkpoint root that orbax-to-hf exports from
    _, ox, _ = models["qwen2_tied_bf16_single"]
    ckpt = _copy(ox, work / "link_out" / "ckpt")
    os.remove(os.path.join(ckpt, "merges.txt"))
    os.symlink(os.path.relpath(outside / "merges.txt", ckpt), os.path.join(ckpt, "merges.txt"))
    with pytest.raises(CheckpointError, match="merges.txt.*outside"):
        convert.orbax_to_hf(ckpt, str(work / "link_out" / "export"))
    _assert_no_output(str(work / "link_out" / "export"))


def test_side_file_symlink_inside_the_folder_or_to_a_hub_cache_blob_is_copied(models, work):
    folder, _ = _linked_model(models, work, "link_in")
    os.makedirs(os.path.join(folder, "tok"))
    shutil.move(os.path.join(folder, "merges.txt"), os.path.join(folder, "tok", "merges.txt"))
    os.symlink(os.path.join("tok", "merges.txt"), os.path.join(folder, "merges.txt"))
    out = convert.hf_to_orbax(folder, str(work / "link_in" / "orbax"))
    assert not os.path.islink(os.path.join(out, "merges.txt"))
    assert (work / "link_in" / "orbax" / "merges.txt").read_text() == TOKENIZER_FILES["merges.txt"]

    # Hugging Face cache layout: models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>
    hf, _, _ = models["qwen2_tied_bf16_single"]
    repo = work / "link_in" / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(hf))):
        shutil.copy(os.path.join(hf, name), repo / "blobs" / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / name)
    back = convert.orbax_to_hf(convert.hf_to_orbax(str(snapshot), str(work / "link_in" / "hub_orbax")),
                               str(work / "link_in" / "hub_back"))
    _assert_identical(hf, back)
    assert (work / "link_in" / "hub_back" / "merges.txt").read_text() == TOKENIZER_FILES["merges.txt"]


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "ABSOLUTE", "linked.safetensors"])
def test_index_shards_must_stay_inside_the_folder(models, work, shard):
    folder, outside = _linked_model(models, work, "index_" + shard.split("/")[0].replace(".", "up"))
    shutil.move(os.path.join(folder, "model.safetensors"), outside / "model.safetensors")
    if shard == "ABSOLUTE":
        shard = str(outside / "model.safetensors")
    elif shard == "linked.safetensors":
        os.symlink(outside / "model.safetensors", os.path.join(folder, shard))
    reader = TensorReader(str(outside))
    index = {"metadata": {}, "weight_map": dict.fromkeys(reader.files, shard)}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    out = str(work / ("index_out_" + os.path.basename(shard)))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json.*" + shard.split("/")[-1]):
        convert.hf_to_orbax(folder, out)
    _assert_no_output(out)
    with pytest.raises(CheckpointError, match="index.json"):
        from_pretrained(folder)


# ---------------------------------------------------------------- file modes
def _modes(folder):
    """{relative path: (is dir, permission bits)} of a folder and everything in it."""
    out = {".": (True, os.stat(folder).st_mode & 0o777)}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (os.path.isdir(path), os.stat(path).st_mode & 0o777)
    return out


def test_outputs_honour_the_umask_in_both_cli_directions(models, work):
    hf, _, _ = models["qwen2_untied_fp32_sharded"]
    src = _copy(hf, work / "umask_src")
    for name in os.listdir(src):  # private source files: the outputs must not inherit 0600
        os.chmod(os.path.join(src, name), 0o600)
    orbax, back = str(work / "umask_orbax"), str(work / "umask_back")
    for args in (("hf-to-orbax", "--hf_dir", src, "--out_dir", orbax),
                 ("orbax-to-hf", "--ckpt", orbax, "--out_dir", back)):
        result = _cli(*args, umask=0o022)
        assert result.returncode == 0, result.stderr
    for folder in (orbax, back):
        modes = _modes(folder)
        assert {p: m for p, (d, m) in modes.items() if d and m != 0o755} == {}, folder
        assert {p: m for p, (d, m) in modes.items() if not d and m != 0o644} == {}, folder
    assert {"merges.txt", "config.json", "model.safetensors.index.json"} <= set(os.listdir(back))


def test_checkpoint_side_files_follow_the_umask(models, work):
    hf, _, _ = models["qwen3_tied_fp32_single"]
    dst = work / "side_umask"
    dst.mkdir()
    old = os.umask(0o027)
    try:
        copied = cf.copy_side_files(hf, str(dst))
    finally:
        os.umask(old)
    assert "tokenizer_config.json" in copied and "config.json" in copied
    assert {name: os.stat(dst / name).st_mode & 0o777 for name in os.listdir(dst)} == dict.fromkeys(copied, 0o640)


def test_full_disk_leaves_nothing(models, work, monkeypatch):
    from qwen_jax.hf import safetensors_io

    hf, ox, _ = models["qwen2_untied_fp32_sharded"]
    calls = {"n": 0}
    real_write = safetensors_io.SafetensorsWriter.write_at

    def failing_write(self, name, block, start=0):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, block, start)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write_at", failing_write)
    out = str(work / "full_hf")
    with pytest.raises(convert.ConvertError, match="no space left"):
        convert.orbax_to_hf(ox, out, max_shard_size="20KB")
    _assert_no_output(out)
    monkeypatch.undo()

    real_read = safetensors_io.TensorReader.read
    calls["n"] = 0

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_read(self, name)

    monkeypatch.setattr(safetensors_io.TensorReader, "read", failing_read)
    out = str(work / "full_orbax")
    with pytest.raises(convert.ConvertError, match="no space left"):
        convert.hf_to_orbax(hf, out)
    _assert_no_output(out)


def test_pickled_only_folder_refused(work):
    folder = work / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32,
                                                    "num_attention_heads": 4, "num_hidden_layers": 1,
                                                    "intermediate_size": 64, "vocab_size": 128}))
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*save_pretrained\(out, safe_serialization=True"):
        convert.hf_to_orbax(str(folder), str(work / "out_pickled"))
    _assert_no_output(str(work / "out_pickled"))


def test_no_trust_remote_code_anywhere():
    for path in ("qwen_jax/hf/convert.py", "qwen_jax/hf/export.py", "qwen_jax/hf/safetensors_io.py",
                 "qwen_jax/hf/models.py", "qwen_jax/checkpoint_format.py"):
        with open(os.path.join(REPO, path)) as f:
            assert "trust_remote_code=True" not in f.read()


# ---------------------------------------------------------------- linter gate
def test_lint_error_stops_export_unless_allowed(models, work, monkeypatch):
    _, ox, _ = models["qwen2_tied_bf16_single"]
    finding = {"rule": "rope-theta", "severity": "error", "file": "config.json", "line": 3, "key": "rope_theta",
               "message": "simulated error", "fix": "set rope_theta"}
    monkeypatch.setattr(export, "run_linter", lambda folder: (1, [finding]))
    out = str(work / "lint_out")
    with pytest.raises(convert.ConvertError, match="(?s)lint errors.*--allow_lint_errors.*simulated error"):
        convert.orbax_to_hf(ox, out)
    _assert_no_output(out)
    convert.orbax_to_hf(ox, out, allow_lint_errors=True)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def test_linter_subprocess_contract(work, monkeypatch, tmp_path):
    """run_linter runs qwen-lint with `--format json DIR`, reads its JSON, and refuses a linter that crashed."""
    fake = tmp_path / "fake_lint.py"
    fake.write_text(
        "import json, sys\n"
        "assert sys.argv[1:3] == ['--format', 'json']\n"
        "print(json.dumps({'findings': [{'rule': 'r', 'severity': 'error', 'file': 'config.json', 'line': 1,"
        " 'key': 'k', 'message': 'm', 'fix': ''}], 'summary': {'errors': 1}}))\n"
        "sys.exit(1)\n")
    monkeypatch.setattr(export, "LINT_COMMAND", (sys.executable, str(fake)))
    code, findings = export.run_linter(str(tmp_path))
    assert code == 1 and findings[0]["severity"] == "error"
    fake.write_text("raise SystemExit(3)\n")
    with pytest.raises(convert.ConvertError, match="linter failed to run"):
        export.run_linter(str(tmp_path))


# ---------------------------------------------------------------- CLI and progress
def _cli(*args, umask=None):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "tools/convert.py", *args]
    if umask is not None:  # the shell sets it: no preexec_fn fork of a multithreaded (JAX) process
        cmd = ["/bin/sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_exit_codes_and_plain_progress(models, work):
    hf, _, _ = models["qwen3_tied_fp32_single"]
    out = str(work / "cli_orbax")
    ok = _cli("hf-to-orbax", "--hf_dir", hf, "--out_dir", out, "--dtype", "bf16")
    assert ok.returncode == 0, ok.stderr
    assert "\r" not in ok.stderr and "hf-to-orbax: done" in ok.stderr
    again = _cli("hf-to-orbax", "--hf_dir", hf, "--out_dir", out)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    pickled = work / "cli_pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(hf, "config.json"), pickled)
    (pickled / "model.pt").write_bytes(b"x")
    bad = _cli("hf-to-orbax", "--hf_dir", str(pickled), "--out_dir", str(work / "cli_out2"))
    assert bad.returncode == 1 and "safetensors" in bad.stderr and "Traceback" not in bad.stderr
    usage = _cli("orbax-to-hf", "--out_dir", "x")
    assert usage.returncode == 2


def test_progress_plain_lines_off_terminal():
    stream = io.StringIO()
    bar = convert.Progress("demo", total_tensors=4, total_bytes=400, stream=stream)
    for _ in range(4):
        bar.update(100, tensor_done=True)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.strip().splitlines()
    assert lines[0].startswith("demo: 4 tensors") and lines[-1].startswith("demo: done, 4 tensors")
    assert len(lines) >= 4


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("five")


def test_config_semantics_helper():
    raw = {"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
           "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 4096}
    assert config_from_dict(raw).max_position_embeddings == 4096

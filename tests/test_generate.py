"""Generation with a KV cache against transformers' greedy `generate`, and the cache against a full forward."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import make_hf_model

import qwen_jax
from qwen_jax import kv_cache
from qwen_jax.config import QwenConfig
from qwen_jax.generation import filter_top_k, filter_top_p
from qwen_jax.sharding import make_mesh

PROMPTS = [[5, 17, 33, 2, 99, 100, 7, 1, 64, 200, 31], [8, 9, 250], list(range(40, 60))]

CASES = {
    "qwen2_untied_gqa": dict(),
    "qwen2_tied": dict(tie_word_embeddings=True),
    "qwen2_mha": dict(num_key_value_heads=4),
    "qwen3": dict(model_type="qwen3"),
    # decoding runs from position 20 to 60, past the original window of 32
    "yarn": dict(max_position_embeddings=128, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 32}),
    # windows of 6 tokens on layers 1 and 2, prompts up to 20 tokens
    "sliding": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "dynamic": dict(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            kw = dict(CASES[name])
            model_type = kw.pop("model_type", "qwen2")
            folder = str(tmp_path_factory.mktemp(name))
            hf = make_hf_model(folder, model_type=model_type, initializer_range=0.3, **kw)
            cache[name] = folder, hf
        return cache[name]

    return get


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("yarn", "dynamic") else n
                                  for n in CASES])
def test_greedy_matches_transformers(folders, name):
    """Batched (different prompt lengths, left-padded) greedy continuations equal transformers' per prompt."""
    folder, hf = folders(name)
    model = qwen_jax.from_pretrained(folder)
    n = 40 if name in ("yarn", "dynamic") else 16
    ours = qwen_jax.generate(model, PROMPTS, max_new_tokens=n, stop_ids=[])
    for prompt, got in zip(PROMPTS, ours, strict=True):
        want = hf_greedy(hf, prompt, n)
        assert len(set(want)) > 3, f"degenerate reference continuation {want}"
        assert got == want


def _decode_steps(model, prompts, steps):
    """Logits [steps + 1, batch, vocab] of a prefill and `steps` decode steps through `Qwen.decode` (random
    next tokens: the cache must follow any tokens), and the final token sequences."""
    cfg = model.cfg
    lengths = np.array([len(p) for p in prompts])
    slots = kv_cache.length_bucket(lengths.max())
    tokens = np.zeros((len(prompts), slots), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, slots - len(p):] = p
    cache = kv_cache.init_cache(cfg, slots - lengths, kv_cache.length_bucket(slots + steps))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).decode(t, c))
    seqs = [list(p) for p in prompts]
    logits, cache = run(state, cache, jnp.asarray(tokens))
    got = [np.asarray(logits)]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        nxt = rng.integers(0, cfg.vocab_size, len(seqs)).astype(np.int32)
        for r, seq in enumerate(seqs):
            seq.append(int(nxt[r]))
        logits, cache = run(state, cache, jnp.asarray(nxt[:, None]))
        got.append(np.asarray(logits))
    return np.stack(got), seqs


def _forward_at_steps(model, seqs, prompt_lengths, steps):
    """The same logits from one forward over the final (right-padded) sequences: the model is causal, so
    position p of the long forward is the forward over the tokens up to p."""
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = seq
    full = np.asarray(model(jnp.asarray(ids)))
    return np.stack([[full[r, prompt_lengths[r] - 1 + step] for r in range(len(seqs))] for step in range(steps + 1)])


def _decode_vs_forward(model, prompts, steps, rtol):
    """Each step's logits vs a full forward of the same tokens; returns the worst max|diff| / max|logit|."""
    got, seqs = _decode_steps(model, prompts, steps)
    want = _forward_at_steps(model, seqs, [len(p) for p in prompts], steps)
    worst = 0.0
    for step in range(steps + 1):
        for r in range(len(seqs)):
            scale = np.abs(want[step, r]).max()
            worst = max(worst, np.abs(got[step, r] - want[step, r]).max() / scale)
            np.testing.assert_allclose(got[step, r], want[step, r], rtol=0, atol=rtol * scale,
                                       err_msg=f"step {step} row {r}")
    return worst


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "qwen3", "yarn", "sliding"])
def test_decode_logits_equal_full_forward(folders, name):
    folder, _ = folders(name)
    model = qwen_jax.from_pretrained(folder)
    worst = _decode_vs_forward(model, PROMPTS, steps=6, rtol=1e-5)
    assert worst < 1e-5


def _dca_model(original_max_position_embeddings):
    cfg = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rope_theta=10000.0, initializer_range=0.3,
                     dual_chunk_attention=(("chunk_size", 12), ("local_size", 4),
                                           ("original_max_position_embeddings", original_max_position_embeddings)))
    return qwen_jax.Qwen(cfg, rngs=nnx.Rngs(3))


@pytest.mark.slow
def test_dca_decode_equals_full_forward():
    """DCA positions in the cache: decode logits equal a full DCA forward (chunks of 8: all three branches)."""
    worst = _decode_vs_forward(_dca_model(0), [list(range(3, 23)), [7, 8, 9]], steps=6, rtol=1e-5)
    assert worst < 1e-5


def test_dca_length_scaling_prefill_equals_full_forward():
    """With DCA's length scaling, a full forward scales every row by its document's length, so earlier tokens'
    states depend on later ones; generation (like vLLM) keeps the states of the pass that made them.  The
    prefill still equals the full forward of the prompt."""
    assert _decode_vs_forward(_dca_model(8), [list(range(3, 23)), list(range(50, 70))], steps=0, rtol=1e-5) < 1e-5


def test_bf16_decode_as_close_as_the_forward(folders):
    """bfloat16: the decode path is no further from the float32 logits than the bf16 full forward is."""
    folder, _ = folders("qwen2_untied_gqa")
    model = qwen_jax.from_pretrained(folder, dtype="bfloat16", param_dtype="bfloat16")
    got, seqs = _decode_steps(model, PROMPTS[:2], 3)
    lengths = [len(p) for p in PROMPTS[:2]]
    forward_bf16 = _forward_at_steps(model, seqs, lengths, 3)
    truth = _forward_at_steps(qwen_jax.from_pretrained(folder), seqs, lengths, 3)
    decode_err, forward_err = np.abs(got - truth).max(), np.abs(forward_bf16 - truth).max()
    assert decode_err <= 2 * forward_err + 1e-3, (decode_err, forward_err)


def test_stops_on_every_id_of_the_union(folders, tmp_path):
    """generation_config.json, config.json and the tokenizer's eos each stop generation (stop id included)."""
    folder, _ = folders("qwen2_untied_gqa")
    model = qwen_jax.from_pretrained(folder)
    free = qwen_jax.generate(model, PROMPTS, max_new_tokens=16, stop_ids=[])[0]
    firsts = [i for i, t in enumerate(free) if t not in free[:i]]
    assert len(firsts) >= 6
    a, b, c, d = (free[i] for i in firsts[2:6])  # first seen in this order
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    base_cfg = json.loads((tmp_path / "config.json").read_text())

    def write(gen_eos, cfg_eos, tok_eos):
        (tmp_path / "config.json").write_text(json.dumps({**base_cfg, "eos_token_id": cfg_eos}))
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
        tok = {"eos_token": "<stop>", "added_tokens_decoder": {str(tok_eos): {"content": "<stop>"}}}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))

    # each source alone supplies the earliest stop id
    for gen_eos, cfg_eos, tok_eos, first in ([[d, a], c, d, a], [d, b, d, b], [d, d, c, c]):
        write(gen_eos, cfg_eos, tok_eos)
        union = qwen_jax.from_pretrained(tmp_path).stop_token_ids
        assert set(union) == {*np.atleast_1d(gen_eos).tolist(), cfg_eos, tok_eos}
        got = qwen_jax.generate(model, PROMPTS, max_new_tokens=16, stop_ids=union)[0]
        assert got == free[:free.index(first) + 1]
    # stop_ids=None: the union recorded when the folder was loaded
    assert qwen_jax.generate(qwen_jax.from_pretrained(tmp_path), PROMPTS, max_new_tokens=16)[0] == \
        free[:free.index(c) + 1]


def test_sharded_generation_equals_single_device(folders):
    folder, _ = folders("qwen2_untied_gqa")
    want = qwen_jax.generate(qwen_jax.from_pretrained(folder), PROMPTS + [[3, 4]], max_new_tokens=8, stop_ids=[])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = qwen_jax.from_pretrained(folder, mesh=mesh)
    cache = kv_cache.init_cache(model.cfg, np.zeros(4, np.int32), 16, mesh)
    # batch over the batch axes (data, fsdp; expert has size 1 here), kv heads over tensor
    assert cache.keys[0].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None, "tensor", None)
    assert qwen_jax.generate(model, PROMPTS + [[3, 4]], max_new_tokens=8, stop_ids=[]) == want


# ---------------------------------------------------------------------------------------------- sampling


def np_top_k(logits, k):
    """transformers' TopKLogitsWarper: remove logits below the k-th largest."""
    if k <= 0:
        return logits
    kth = np.sort(logits, axis=-1)[..., -min(k, logits.shape[-1])][..., None]
    return np.where(logits < kth, -np.inf, logits)


def np_top_p(logits, p):
    """transformers' TopPLogitsWarper: sort ascending, drop tokens whose cumulative prob <= 1 - p, keep the top one."""
    if p >= 1:
        return logits
    out = logits.copy()
    for row in range(logits.shape[0]):
        order = np.argsort(logits[row])
        probs = np.exp(logits[row][order] - logits[row].max())
        cum = np.cumsum(probs / probs.sum())
        remove = cum <= 1 - p
        remove[-1] = False
        out[row, order[remove]] = -np.inf
    return out


@pytest.mark.parametrize("k", [0, 1, 5, 64, 1000])
def test_top_k_matches_reference(k):
    logits = np.random.default_rng(k).normal(size=(4, 64)).astype(np.float32) * 3
    np.testing.assert_array_equal(np.asarray(filter_top_k(jnp.asarray(logits), k)), np_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_reference(p):
    logits = np.random.default_rng(int(p * 100)).normal(size=(4, 64)).astype(np.float32) * 3
    got = np.asarray(filter_top_p(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(np_top_p(logits, p)))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_sampling_is_seeded(folders):
    folder, _ = folders("qwen2_untied_gqa")
    model = qwen_jax.from_pretrained(folder)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, stop_ids=[])
    first = qwen_jax.generate(model, PROMPTS, seed=1, **kw)
    assert qwen_jax.generate(model, PROMPTS, seed=1, **kw) == first
    assert qwen_jax.generate(model, PROMPTS, seed=2, **kw) != first
    greedy = qwen_jax.generate(model, PROMPTS, max_new_tokens=12, stop_ids=[])
    assert first != greedy
    # top_k=1 leaves only the argmax: sampling equals greedy decoding
    assert qwen_jax.generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, stop_ids=[]) == greedy


def test_bad_arguments(folders):
    folder, _ = folders("qwen2_untied_gqa")
    model = qwen_jax.from_pretrained(folder)
    with pytest.raises(ValueError, match="max_new_tokens"):
        qwen_jax.generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        qwen_jax.generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        qwen_jax.generate(model, [[1, 999]], max_new_tokens=2)

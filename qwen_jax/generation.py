"""Text generation with a KV cache: `qwen_jax.generate(...)` and `python -m qwen_jax.generate`.

    new_ids = qwen_jax.generate(model, [[ids...], [ids...]], max_new_tokens=64)        # greedy
    new_ids = qwen_jax.generate(model, prompts, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1)

Each result holds the new tokens only: up to and including the first stop id, else
`max_new_tokens` of them.  How it runs: prompts are left-padded to a length bucket and
prefilled in one call, then decoded in a device loop (`lax.while_loop` over `Qwen.decode` and
`qwen_jax.kv_cache`) that stops when every row has produced a stop id; `stream` runs it a chunk
of tokens per call.  Prompt and cache lengths are rounded up to buckets
(`kv_cache.length_bucket`), so other prompt/output lengths reuse the compilations.  On a
sharded model (parameters placed on a mesh, e.g. `from_pretrained(mesh=...)`),
the cache is sharded over batch (data, fsdp) and kv heads (tensor).

Sampling follows transformers' order: temperature, then top-k, then top-p (nucleus), then a
categorical draw; `temperature=0` is greedy (argmax).  Stop ids default to the union of the
model folder's generation_config.json, config.json and tokenizer eos ids
(`config.model_stop_ids`).

The command line lives in `qwen_jax/generate.py` (`python -m qwen_jax.generate`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import kv_cache

# ---------------------------------------------------------------------------------------------- sampling


def filter_top_k(logits, k):
    """Logits [..., vocab] with everything below the k-th largest set to -inf (ties kept); k <= 0: unchanged."""
    k = jnp.asarray(k, jnp.int32)
    vocab = logits.shape[-1]
    kth = jnp.take(jnp.sort(logits, axis=-1), jnp.clip(vocab - k, 0, vocab - 1), axis=-1)[..., None]
    return jnp.where((k > 0) & (logits < kth), -jnp.inf, logits)


def filter_top_p(logits, p):
    """Nucleus filter: keep the most likely tokens whose probabilities, summed from the top, first
    reach `p` (the token that crosses `p` is kept, and always at least one); p >= 1: unchanged.

    transformers' rule (remove sorted tokens whose ascending cumulative probability is <= 1 - p),
    written from the top: a token stays iff the mass of the tokens ranked above it is < p.
    """
    p = jnp.asarray(p, jnp.float32)
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc.astype(jnp.float32), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    keep = (above < p).at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((p < 1.0) & (logits < threshold), -jnp.inf, logits)


def sample_next(logits, key, temperature, top_k, top_p, *, greedy: bool):
    """Next token ids [batch] from float32 logits [batch, vocab]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.asarray(temperature, jnp.float32)
    logits = filter_top_p(filter_top_k(logits, top_k), top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, key, temperature, top_k, top_p, *, greedy):
    """Run the left-padded prompts [batch, slots] into the cache and pick each row's first new token."""
    logits, cache = nnx.merge(graphdef, state).decode(tokens, cache)
    return sample_next(logits, key, temperature, top_k, top_p, greedy=greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "steps"), donate_argnames=("cache",))
def _decode_loop(graphdef, state, cache, current, done, key, made, limit, stops, temperature, top_k, top_p, *,
                 greedy, steps):
    """Up to `steps` decode steps in one device loop (`lax.while_loop`).

    Why a device loop: at batch 1 a decode step of a small model takes a fraction of a
    millisecond on a GPU, less than Python needs to dispatch one jitted call over the
    parameter tree, so a host loop per token would measure the host.  The loop feeds
    `current` (the last token of each row, `made` tokens made so far), stops when `limit`
    tokens are made or every row has produced a stop id, and returns the new tokens
    [batch, steps] (the first `count` columns are valid), the count, and the loop's state.
    """
    model = nnx.merge(graphdef, state)
    out = jnp.zeros((current.shape[0], steps), jnp.int32)

    def more(carry):
        i, _, _, done, _ = carry
        return (i < steps) & (made + i < limit) & ~jnp.all(done)

    def step(carry):
        i, cache, current, done, out = carry
        logits, cache = model.decode(current[:, None], cache)
        following = sample_next(logits, jax.random.fold_in(key, made + i), temperature, top_k, top_p, greedy=greedy)
        out = jax.lax.dynamic_update_slice_in_dim(out, following[:, None], i, axis=1)
        return i + 1, cache, following, done | jnp.isin(following, stops), out

    count, cache, current, done, out = jax.lax.while_loop(more, step, (jnp.int32(0), cache, current, done, out))
    return out, count, cache, current, done


def model_mesh(state):
    """The mesh the parameters are sharded over, or None (single device)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def resolve_stop_ids(model, stop_ids) -> tuple[int, ...]:
    """`stop_ids`, or (None) the model folder's union recorded at load time, else config.json's eos."""
    if stop_ids is not None:
        return tuple(int(i) for i in stop_ids)
    recorded = getattr(model, "stop_token_ids", None)
    return tuple(recorded) if recorded is not None else tuple(model.cfg.eos_token_id)


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    vocab = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


def stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, stop_ids=None, seed: int = 0,
           chunk: int | None = None) -> Iterator[list[int | None]]:
    """Yields once per generated position: the new token of every row (None for rows already stopped).

    Ends after `max_new_tokens` positions or when every row has produced a stop id.  Tokens are
    made on the device `chunk` at a time (None: all in one device loop); a streaming caller
    passes a small chunk to show text as it is made.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
    stops = np.asarray(resolve_stop_ids(model, stop_ids), np.int64)
    lengths = np.array([len(p) for p in prompts])
    prompt_slots = kv_cache.length_bucket(lengths.max())
    tokens = np.zeros((len(prompts), prompt_slots), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, prompt_slots - len(p):] = p
    graphdef, state = nnx.split(model)
    mesh = model_mesh(state)
    cache_slots = kv_cache.length_bucket(prompt_slots + max_new_tokens)
    cache = kv_cache.init_cache(model.cfg, prompt_slots - lengths, cache_slots, mesh)
    key = jax.random.key(seed)
    knobs = dict(temperature=jnp.float32(max(temperature, 1e-6)), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                 greedy=temperature == 0)
    stops_device = jnp.asarray(stops, jnp.int32)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        current, cache = _prefill(graphdef, state, cache, jnp.asarray(tokens), key, **knobs)
        done = jnp.isin(current, stops_device)
        emitted_done = np.zeros(len(prompts), bool)
        yield from _emit(np.asarray(current)[:, None], 1, emitted_done, stops)
        made = 1
        steps = chunk or kv_cache.length_bucket(max_new_tokens - 1, minimum=1)
        while made < max_new_tokens and not emitted_done.all():
            out, count, cache, current, done = _decode_loop(
                graphdef, state, cache, current, done, key, jnp.int32(made), jnp.int32(max_new_tokens),
                stops_device, steps=steps, **knobs)
            count = int(count)
            yield from _emit(np.asarray(out), count, emitted_done, stops)
            made += count


def _emit(ids, count, done, stops):
    """Yield columns [0, count) of `ids` [batch, n] as per-row lists, None for rows that already
    stopped; `done` (updated in place) records rows whose emitted tokens include a stop id."""
    for column in ids[:, :count].T:
        yield [None if d else int(t) for t, d in zip(column, done, strict=True)]
        done |= np.isin(column, stops)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=None, seed: int = 0) -> list[list[int]]:
    """New token ids per prompt: up to and including the first stop id, else `max_new_tokens` ids.

    `prompts`: token-id lists of any lengths.  Greedy when `temperature` is 0; else sampled with
    top-k (0 = off) and top-p (1 = off) from `jax.random.key(seed)` (same seed, same tokens).
    `stop_ids=None`: the union of eos ids of the model folder (generation_config.json,
    config.json, tokenizer), else config.json's.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for step_ids in stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_ids=stop_ids, seed=seed):
        for row, token in enumerate(step_ids):
            if token is not None:
                out[row].append(token)
    return out

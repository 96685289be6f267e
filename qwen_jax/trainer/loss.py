"""Next-token cross-entropy over loss tokens, computed in sequence chunks.

The full [batch, seq, vocab] float32 logits are never materialised: hidden states are split
into chunks of `chunk_size` positions, a `lax.scan` projects one chunk at a time with the
model's output embedding (compute-dtype inputs, float32 accumulation, as `Qwen.logits`), and
each chunk is under `jax.checkpoint`, so the backward pass recomputes a chunk's logits
instead of keeping all of them.  Peak logits memory is batch * chunk_size * vocab * 4 bytes.

The functions return *sums* over loss tokens; the caller divides by the number of loss
tokens in the whole global batch, so gradient accumulation and multi-host runs give the same
loss as one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.sharding import constrain


def chunked_cross_entropy(hidden, w_out, targets, loss_mask, *, chunk_size: int = 1024):
    """(sum of masked NLL, sum of masked logsumexp^2) for hidden [b, t, e], w_out [e, vocab], targets [b, t]."""
    b, t, e = hidden.shape
    c = max(1, min(int(chunk_size), t))
    pad = (-t) % c
    loss_mask = loss_mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, e).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(w, h, tgt, m):
        logits = jnp.einsum("bce,ev->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * m), jnp.sum(jnp.square(lse) * m)

    def body(carry, xs):
        nll, z = chunk(w_out, *xs)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return nll, z


def model_loss_sums(model, batch, *, chunk_size: int = 1024, zigzag: bool = False):
    """(NLL sum, z sum) of an NNX `Qwen` on a batch dict (input_ids, positions, segment_ids, targets, loss_mask).

    `zigzag`: the batch was permuted to ring attention's zig-zag order (all five arrays together,
    targets shifted before); the token sum is order-invariant, so nothing is permuted back.
    """
    hidden = model.hidden_states(batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), zigzag=zigzag)
    return chunked_cross_entropy(hidden, model.output_embedding(), batch["targets"], batch["loss_mask"],
                                 chunk_size=chunk_size)


def reference_loss(logits, targets, loss_mask):
    """Unchunked masked-mean cross-entropy from full logits (tests)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

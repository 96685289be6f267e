"""Next-token cross-entropy over loss tokens: a fused, chunked output projection + loss.

The full [batch, seq, vocab] float32 logits are never materialised: hidden states are split
into chunks of `chunk_size` positions and a `lax.scan` projects one chunk at a time with the
model's output embedding (compute-dtype inputs, float32 accumulation, as `Qwen.logits`).
Peak logits memory is about batch * chunk_size * vocab * 4 bytes (a few such buffers).

Why fused (the Liger-kernel idea): the loss is a scalar, so its gradient with respect to the
hidden states and the output projection can be computed *during the forward pass*, chunk by
chunk, while the chunk's logits are still live:

    dlogits  = (softmax - onehot(target)) * mask + z_weight * 2 * lse * softmax * mask
    d_hidden = dlogits @ W^T            (per chunk, kept in the hidden dtype)
    dW      += hidden^T @ dlogits       (float32 accumulator over the chunks)

The previous version put each chunk under `jax.checkpoint`, so the backward pass recomputed
every chunk's logits: 4 vocab-sized matmuls per chunk (forward, recompute, d_hidden, dW) and
the float32 [b, chunk, vocab] logits streamed through memory several times.  Fused it is 3
matmuls per chunk and one pass over the logits; the `jax.custom_vjp` backward is only a
multiply of the two saved gradients by the incoming scalar cotangent.  The price is that
dW ([embed, vocab], the dtype of `w_out`) lives from the forward to the backward pass.
Without differentiation (evaluation) the custom_vjp primal runs, which computes the loss
only: one matmul per chunk.

The functions return *sums* over loss tokens; the caller divides by the number of loss
tokens in the whole global batch, so gradient accumulation and multi-host runs give the same
loss as one big batch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qwen_jax.sharding import constrain


def fused_cross_entropy(hidden, w_out, targets, loss_mask, *, chunk_size: int = 1024, z_weight: float = 0.0,
                        vocab_major: bool = False):
    """(objective_sum, nll_sum, z_sum) for hidden [b, t, e], w_out [e, vocab], targets [b, t], loss_mask [b, t].

    `vocab_major=True`: `w_out` is [vocab, e] instead (a tied embedding as it is stored).  Its
    gradient is then accumulated in that layout too, so no [vocab, e] transpose is
    materialised when it meets the embedding lookup's gradient.

    nll_sum = sum over tokens of mask * (logsumexp(logits) - logits[target]),
    z_sum = sum of mask * logsumexp(logits)^2, objective_sum = nll_sum + z_weight * z_sum.

    Only `objective_sum` is differentiable (with respect to `hidden` and `w_out`).  `nll_sum`
    and `z_sum` are returned through `lax.stop_gradient`: their cotangents are therefore always
    zero, which is what makes the custom backward (which ignores them and scales the gradient
    of the objective computed in the forward pass) exact for any function of the three outputs.
    `targets` are integers (no cotangent) and `loss_mask` is treated as a constant (its
    cotangent is zero).  `chunk_size` and `z_weight` are static Python numbers.
    """
    embed_axis = 1 if vocab_major else 0
    if w_out.ndim != 2 or w_out.shape[embed_axis] != hidden.shape[-1]:
        want = "[vocab, embed]" if vocab_major else "[embed, vocab]"
        raise ValueError(f"fused_cross_entropy: w_out {tuple(w_out.shape)} is not {want} for hidden "
                         f"{tuple(hidden.shape)} (vocab_major={bool(vocab_major)})")
    objective, nll, z = _fused_ce(hidden, w_out, targets, loss_mask, int(chunk_size), float(z_weight),
                                  bool(vocab_major))
    return objective, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(z)


def model_loss_sums(model, batch, *, chunk_size: int = 1024, zigzag: bool = False, z_weight: float = 0.0,
                    with_router: bool = False):
    """(objective sum, NLL sum, z sum) of an NNX `Qwen` on a batch dict (see `fused_cross_entropy`).

    The batch holds input_ids, positions, segment_ids, targets, loss_mask.  `zigzag`: the batch
    was permuted to ring attention's zig-zag order (all five arrays together, targets shifted
    before); the token sum is order-invariant, so nothing is permuted back.
    `with_router=True` (mixture-of-experts models) appends the forward pass's `RouterStats`.
    """
    hidden, stats = model.hidden_states_and_router(batch["input_ids"], batch.get("positions"),
                                                   batch.get("segment_ids"), zigzag=zigzag)
    w_out, vocab_major = model.output_embedding()
    sums = fused_cross_entropy(hidden, w_out, batch["targets"], batch["loss_mask"], chunk_size=chunk_size,
                               z_weight=z_weight, vocab_major=vocab_major)
    return (*sums, stats) if with_router else sums


def reference_loss(logits, targets, loss_mask):
    """Unchunked masked-mean cross-entropy from full logits (tests)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


# ---------------------------------------------------------------- internals
def _chunks(hidden, targets, loss_mask, chunk_size):
    """[n, b, c, ...] chunks of the inputs, the last one padded with masked positions."""
    b, t, e = hidden.shape
    c = max(1, min(int(chunk_size), t))
    pad = (-t) % c
    loss_mask = loss_mask.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, e).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, c).swapaxes(0, 1)
    return hs, ts, ms


def _w_spec(vocab_major: bool) -> str:
    """einsum letters of the output projection: [vocab, embed] or [embed, vocab]."""
    return "ve" if vocab_major else "ev"


def logsumexp_one_pass(x):
    """log(sum(exp(x))) over the last axis, reading x once (online softmax as one variadic reduce).

    `jax.nn.logsumexp` makes two passes over x (max, then sum of exp(x - max)); on the loss's
    float32 [b, chunk, vocab] logits each pass is a memory-bound read of the whole chunk.  Here
    every element carries (running max, sum of exp(x - running max)) and pairs combine as
    (max, s1 * exp(m1 - max) + s2 * exp(m2 - max)); one of the two factors is always 1, so a
    combine costs one exp.  Computed in float32 whatever x's dtype (a bf16 running sum over
    151,936 words would stop growing).  Not differentiable (it runs inside the loss's custom VJP).
    """
    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        first = m1 >= m2
        # equal maxima (also both -inf, the init value): factor 1, never exp(-inf - -inf) = nan
        factor = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
        return jnp.where(first, m1, m2), jnp.where(first, s1 + s2 * factor, s2 + s1 * factor)

    x = x.astype(jnp.float32)
    neg_inf, zero = jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (neg_inf, zero), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _chunk_loss(h, w, tgt, m, vocab_major):
    """Logits of one chunk (float32), their log-sum-exp, and the chunk's NLL and z sums."""
    logits = jnp.einsum(f"bce,{_w_spec(vocab_major)}->bcv", h, w, preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    lse = logsumexp_one_pass(logits)
    target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return logits, lse, jnp.sum((lse - target_logit) * m), jnp.sum(jnp.square(lse) * m)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_ce(hidden, w_out, targets, loss_mask, chunk_size, z_weight, vocab_major):
    """Primal (no differentiation): the loss only, one matmul per chunk."""
    hs, ts, ms = _chunks(hidden, targets, loss_mask, chunk_size)
    w = w_out.astype(hidden.dtype)

    def body(carry, xs):
        h, tgt, m = xs
        _, _, nll, z = _chunk_loss(h, w, tgt, m, vocab_major)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return nll + z_weight * z, nll, z


def _fused_ce_fwd(hidden, w_out, targets, loss_mask, chunk_size, z_weight, vocab_major):
    """Loss and, chunk by chunk, its gradient w.r.t. hidden and w_out (3 matmuls per chunk).

    The arguments arrive as `CustomVJPPrimal`s (`symbolic_zeros=True`): when `w_out` is not
    differentiated (a frozen output projection, e.g. a LoRA base) its gradient is not computed,
    which saves a vocab-sized matmul per chunk and the float32 [embed, vocab] accumulator.
    """
    want_dw = w_out.perturbed
    hidden, w_out, targets, loss_mask = (a.value for a in (hidden, w_out, targets, loss_mask))
    b, t, e = hidden.shape
    hs, ts, ms = _chunks(hidden, targets, loss_mask, chunk_size)
    w = w_out.astype(hidden.dtype)
    vocab = w.shape[0 if vocab_major else 1]
    w_spec, w_axes = _w_spec(vocab_major), (("vocab", "embed") if vocab_major else ("embed", "vocab"))

    def body(carry, xs):
        nll_acc, z_acc, dw_acc = carry
        h, tgt, m = xs
        logits, lse, nll, z = _chunk_loss(h, w, tgt, m, vocab_major)
        # d(nll + z_weight * z)/dlogits: mask * (softmax * (1 + 2 z_weight lse) - onehot(target))
        p = jnp.exp(logits - lse[..., None])
        scale = m * (1.0 + 2.0 * z_weight * lse) if z_weight else m
        dlogits = p * scale[..., None] - jax.nn.one_hot(tgt, vocab, dtype=jnp.float32) * m[..., None]
        dlogits = constrain(dlogits.astype(h.dtype), ("batch", "length", "act_vocab"))
        dh = jnp.einsum(f"bcv,{w_spec}->bce", dlogits, w, preferred_element_type=jnp.float32).astype(hidden.dtype)
        if want_dw:
            dw_acc = constrain(dw_acc + jnp.einsum(f"bce,bcv->{w_spec}", h, dlogits,
                                                   preferred_element_type=jnp.float32), w_axes)
        return (nll_acc + nll, z_acc + z, dw_acc), dh

    # dW is sharded like the parameter, so a chunk's sum over the batch shards is a
    # reduce-scatter into the accumulator, not an all-reduce
    zero = jnp.zeros((), jnp.float32)
    dw0 = constrain(jnp.zeros(w.shape, jnp.float32), w_axes) if want_dw else None
    (nll, z, dw), dhs = jax.lax.scan(body, (zero, zero, dw0), (hs, ts, ms))
    d_hidden = dhs.swapaxes(0, 1).reshape(b, -1, e)[:, :t]
    return (nll + z_weight * z, nll, z), (d_hidden, None if dw is None else dw.astype(w_out.dtype))


def _fused_ce_bwd(chunk_size, z_weight, vocab_major, res, cts):
    """Scale the saved gradients by the objective's cotangent.

    The cotangents of nll_sum and z_sum are dropped: `fused_cross_entropy`, the only caller,
    returns those two outputs through `lax.stop_gradient`, so they are always zero.
    """
    d_hidden, d_w = res
    ct = cts[0]
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        ct = jnp.zeros(ct.shape, ct.dtype)
    g = ct.astype(jnp.float32)
    d_hidden = (d_hidden.astype(jnp.float32) * g).astype(d_hidden.dtype)
    d_w = None if d_w is None else (d_w.astype(jnp.float32) * g).astype(d_w.dtype)  # None: w_out not perturbed
    return d_hidden, d_w, None, None  # integer targets: float0; loss_mask: zero


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)

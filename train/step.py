"""The training step: masked next-token cross-entropy, gradient accumulation, AdamW update.

Parameters travel as flat dicts ``{dotted path: array}`` (the loader's names, e.g.
``layers.0.attn.lora.q.a``): optax and Orbax see plain pytrees; inside the step they are merged back
into the model's nnx state. The frozen part (the packed base in lora mode) is an input that is
never differentiated nor returned.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptoss_jax.layers.common import precision_for
from train import lora

BATCH_FIELDS = ("tokens", "targets", "mask", "positions", "segment_ids")


def _name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
    return ".".join(parts)


def to_tree(state) -> dict:
    """nnx State (or a same-structure tree: shardings, shapes) -> ``{dotted path: leaf}``."""
    return {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def from_tree(template, tree: dict):
    """Inverse of :func:`to_tree` onto ``template``'s structure."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [tree[_name(p)] for p, _ in leaves])


def cross_entropy_sum(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, mask: jax.Array,
                      chunk: int = 256) -> jax.Array:
    """Sum over masked tokens of -log p(target). hidden [B, T, H], unembedding [V, H], targets/mask [B, T].

    Loss tokens are moved to the front, and logits are computed ``chunk`` tokens at a time, only for
    chunks holding a loss token, and recomputed in the backward pass: at most [chunk, V] float32 logits
    exist at once (the vocabulary is 201088 wide) and prompt tokens cost no unembedding.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t, m = targets.reshape(-1), mask.reshape(-1)
    order = jnp.argsort(~m, stable=True)  # loss tokens first
    h, t, m = h[order], t[order], m[order]
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t, m = jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    w = unembedding.astype(h.dtype)

    @jax.checkpoint
    def one(hc, tc, mc):
        logits = jnp.einsum("mh,vh->mv", hc, w, precision=precision_for(hc.dtype), preferred_element_type=jnp.float32)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(mc, nll, 0.0))

    def body(total, xs):
        hc, tc, mc = xs
        return total + jax.lax.cond(jnp.any(mc), one, lambda *_: jnp.float32(0), hc, tc, mc), None

    shape = (-1, chunk)
    total, _ = jax.lax.scan(body, jnp.float32(0), (h.reshape(-1, chunk, h.shape[-1]), t.reshape(shape),
                                                    m.reshape(shape)))
    return total


def loss_sum(graphdef, params: dict, template, frozen, batch: dict, dropout_key) -> jax.Array:
    """Summed token loss of one micro-batch (fields [B, T]) for trainable ``params``."""
    model = nnx.merge(graphdef, from_tree(template, params), frozen)
    if lora.has_lora(model):
        lora.set_dropout_key(model, dropout_key)
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], None, batch["segment_ids"])
    return cross_entropy_sum(hidden, model.unembedding[...], batch["targets"], batch["mask"])


def make_train_step(graphdef, template, tx: optax.GradientTransformation):
    """-> step(params, opt_state, frozen, batch [A, B, T] fields, key) -> (params, opt_state, metrics).

    The loss is the mean over all loss tokens of the A micro-batches (exactly the large-batch loss);
    gradients are accumulated over micro-batches with a scan.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_sum, graphdef), argnums=0)

    def step(params, opt_state, frozen, batch, key):
        count = jnp.maximum(jnp.sum(batch["mask"]), 1).astype(jnp.float32)

        def micro(carry, xs):
            loss_acc, grads_acc = carry
            mb, i = xs
            loss, grads = grad_fn(params, template, frozen, mb, jax.random.fold_in(key, i))
            return (loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        micro_batches = batch["tokens"].shape[0]
        (total, grads), _ = jax.lax.scan(micro, (jnp.float32(0), zeros), (batch, jnp.arange(micro_batches)))
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "loss_tokens": count}
        return params, opt_state, metrics

    return step


def make_eval_step(graphdef, template):
    """-> eval(params, frozen, batch [B, T] fields) -> (summed loss, loss tokens); no dropout."""

    def evaluate(params, frozen, batch):
        return loss_sum(graphdef, params, template, frozen, batch, None), jnp.sum(batch["mask"])

    return evaluate

"""Expert-parallel MoE under ``shard_map``: each device computes only the experts it holds.

Experts (every leaf of the experts dict with a leading axis of E, packed MXFP4 or dense, and any
per-expert adapter added the same way) are split over the ``expert_axes`` (n devices, E/n each);
tokens are split over ``token_axes`` (the rules' batch axes). Inside the body a device maps the router's
global expert ids to its own: assignments to experts held elsewhere become empty slots (id E/n, weight
0), which :func:`gptoss_jax.layers.moe.experts_forward` gives no expert (the grouped path puts them in
no block; the gather path multiplies them by zero weights), so the local computation runs its E/n
experts on exactly the tokens routed to them.

Two ways to bring tokens to their experts and the results back:

- **replicate-and-reduce** (``reduce``, the default): tokens split over the expert axes are
  all-gathered over them (tokens already replicated there, e.g. a decode batch smaller than the mesh,
  need nothing); each device runs its local experts; the partial outputs are reduce-scattered back
  (all-reduced where the tokens were replicated). One or two collectives per layer, static shapes
  equal to the activations, exact.
- **all-to-all** (``all_to_all``): each (token, expert) pair travels to the device holding the expert
  and back (two all-to-alls). Exact with static shapes only if every destination has room for every
  assignment that could go there: N/n * min(k, E/n) rows per destination. Used only when tokens are
  split over all expert axes; otherwise it falls back to reduce.

Choice: replicate-and-reduce. Numbers from ``python -m benchmarks.moe_comm`` (BENCHMARKS.md,
"Sharding"); n = 8 expert devices, bf16 activations, H = 2880, k = 4; bytes each device sends per MoE
layer (gpt-oss-20b and 120b are alike: the volume depends on H, k and n, not on E):

| tokens in the group | reduce | all-to-all, dense exact | all-to-all, ragged (ideal) |
| ---: | ---: | ---: | ---: |
| decode 1 | 10.1 KB | 323 KB (32x) | 40.3 KB (4x: the token's device sends it k times) |
| decode 64 | 645 KB | 2.58 MB (4x) | 323 KB (0.5x) |
| train 8 x 4096 | 330 MB | 1.32 GB (4x) | 165 MB (0.5x; 0.42x sending a token once per device) |

- The exact static all-to-all moves min(k, E/n) = 4x the bytes of reduce (the compiled HLO on
  the fake mesh agrees: 57.5 KB vs 14.6 KB at 8 tokens, 14.7 MB vs 3.73 MB at 2048), and needs
  receive buffers k times the all-gathered activations.
- Measured on the fake 8-device CPU mesh (hidden 256, packed experts; 2 shared cores, collectives are
  memory copies, so this prices compute, routing and copies, not links): a tie up to 64 tokens;
  reduce is faster from 512 tokens (32 experts: 106 vs 139 ms at 512, 400 vs 549 ms at 2048; 128
  experts: 132 vs 180 ms, 716 vs 786 ms): both run N*k assignment rows per device, and the
  all-to-all adds its dispatch scatter and 4x larger buffers.
- A ragged all-to-all (only real rows sent) would halve the bytes for training batches at n = 8 (the
  ratio is k/n, so no gain at n <= 4), but XLA:CPU has no ``ragged-all-to-all`` (UNIMPLEMENTED), so it
  cannot be tested here; it needs three collectives per layer (sizes, dispatch, combine) and
  worst-case receive buffers. Decode (1..64 tokens, <= 645 KB per layer) is latency-bound: one or two
  collectives beat three.

So decode and training both use replicate-and-reduce; the dense all-to-all stays selectable
(``Layout(moe_scheme="all_to_all")``) for measurement. A ragged all-to-all for large training meshes on
GPU/TPU is the next step.

Partial outputs are summed in the activation dtype (bf16 in production: each device rounds its partial
sum once before the reduction, where one device rounds once after summing); float32 results match one
device up to summation order.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from gptoss_jax.layers.moe import experts_forward

REDUCE = "reduce"
ALL_TO_ALL = "all_to_all"
SCHEMES = (REDUCE, ALL_TO_ALL)


def local_assignments(ids: jax.Array, weights: jax.Array, per_shard: int, shard: jax.Array):
    """Global expert ids [N, k] -> this shard's local ids; assignments to experts held elsewhere become
    empty slots (id ``per_shard``, weight 0), which ``experts_forward`` gives no expert."""
    local = ids - shard * per_shard
    mine = (local >= 0) & (local < per_shard)
    return jnp.where(mine, local, per_shard), jnp.where(mine, weights, jnp.zeros_like(weights))


def _replicate_and_reduce(x, ids, weights, experts, *, per_shard, expert_axes, gather_axes, alpha, limit, path,
                          lora_dropout=None):
    """Body. Tokens split over ``gather_axes`` (a subset of ``expert_axes``) are all-gathered; each device
    runs its local experts on the tokens routed to them; partial outputs are summed over the expert
    axes (reduce-scattered back over ``gather_axes``, all-reduced over the others)."""
    if gather_axes:
        x, ids, weights = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True) for a in (x, ids, weights))
    if expert_axes:
        ids, weights = local_assignments(ids, weights, per_shard, jax.lax.axis_index(expert_axes))
    y = experts_forward(x, ids, weights, experts, per_shard, alpha, limit, path, lora_dropout)
    if gather_axes:
        y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
    rest = tuple(a for a in expert_axes if a not in gather_axes)
    return jax.lax.psum(y, rest) if rest else y


def _all_to_all(x, ids, weights, experts, *, per_shard, shards, expert_axes, alpha, limit, path, lora_dropout=None):
    """Body. Tokens split over every expert axis; each (token, expert) assignment is sent to the device
    holding the expert, computed there and sent back. Exact with static shapes: each destination has room
    for every assignment of this device's tokens that could go there (N * min(k, E/n) rows)."""
    n, h = shards, x.shape[1]
    tokens, k = ids.shape
    capacity = tokens * min(k, per_shard)
    flat = ids.reshape(-1)
    dest = flat // per_shard  # [N*k] destination device along expert_axes
    slot = jnp.take_along_axis(jnp.cumsum(dest[:, None] == jnp.arange(n), axis=0) - 1, dest[:, None], axis=1)[:, 0]
    send = jnp.zeros((n, capacity, h), x.dtype).at[dest, slot].set(jnp.repeat(x, k, axis=0))
    send_ids = jnp.full((n, capacity), per_shard, jnp.int32).at[dest, slot].set(flat % per_shard)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, split_axis=0, concat_axis=0, tiled=True)
    rows, row_ids = exchange(send).reshape(n * capacity, h), exchange(send_ids).reshape(n * capacity, 1)
    out = experts_forward(rows, row_ids, jnp.ones_like(row_ids, x.dtype), experts, per_shard, alpha, limit, path,
                          lora_dropout)
    back = exchange(out.reshape(n, capacity, h))[dest, slot].reshape(tokens, k, h)
    return jnp.einsum("mxh,mx->mh", back.astype(jnp.float32), weights.astype(jnp.float32)).astype(x.dtype)


def expert_parallel_forward(x: jax.Array, ids: jax.Array, weights: jax.Array, experts: dict, num_experts: int,
                            alpha: float, limit: float, *, mesh: Mesh, expert_axes: tuple[str, ...],
                            token_axes: tuple[str, ...], scheme: str = REDUCE, path: str | None = None,
                            lora_dropout=None) -> jax.Array:
    """``experts_forward`` on a mesh. x [N, H], ids/weights [N, k] with N split over ``token_axes``;
    every leaf of ``experts`` with a leading axis of size ``num_experts`` is split over ``expert_axes``
    (others replicated) -> [N, H] split like x. ``lora_dropout`` = (key, rate): the key is replicated."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown expert-parallel scheme {scheme!r}; choose one of {SCHEMES}")
    shards = math.prod(mesh.shape[a] for a in expert_axes)
    if num_experts % shards:
        raise ValueError(f"{num_experts} experts do not split over mesh axes {expert_axes} {dict(mesh.shape)}")
    per_shard = num_experts // shards
    if scheme == ALL_TO_ALL and expert_axes and set(expert_axes) <= set(token_axes):
        body = functools.partial(_all_to_all, per_shard=per_shard, shards=shards, expert_axes=expert_axes,
                                 alpha=alpha, limit=limit, path=path)
    else:  # replicate-and-reduce; also all_to_all's fallback when tokens are not split over the experts' axes
        gather_axes = tuple(a for a in token_axes if a in expert_axes)
        body = functools.partial(_replicate_and_reduce, per_shard=per_shard, expert_axes=expert_axes,
                                 gather_axes=gather_axes, alpha=alpha, limit=limit, path=path)
    tokens = P(token_axes or None)
    expert_specs = {name: P(expert_axes or None) if leaf.ndim and leaf.shape[0] == num_experts else P()
                    for name, leaf in experts.items()}
    # check_vma=False: the grouped matmul's lax.cond skips padding blocks with an invariant zero branch,
    # which the varying-axes type check rejects; values and gradients are checked against one device
    # (tests/test_sharding.py).
    if lora_dropout is None:
        return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, expert_specs),
                             out_specs=tokens, check_vma=False)(x, ids, weights, experts)
    key, rate = lora_dropout
    return jax.shard_map(lambda x, i, w, e, k: body(x, i, w, e, lora_dropout=(k, rate)), mesh=mesh,
                         in_specs=(tokens, tokens, tokens, expert_specs, P()), out_specs=tokens,
                         check_vma=False)(x, ids, weights, experts, key)

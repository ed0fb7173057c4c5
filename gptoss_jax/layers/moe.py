"""Mixture of experts: top-k router and clamped SwiGLU experts, computing only selected experts.

Router: logits = x W + b; take the top-k logits, softmax over those k only.
Experts: ``gate_up`` output is interleaved (even columns gate, odd columns up); the gate is clamped
from above at ``limit``, up to [-limit, limit]; ``out = gate * sigmoid(alpha * gate) * (up + 1)``;
then ``down``; per-expert biases on both. Outputs are summed with the router weights.

Expert weights are either packed MXFP4 (``*_blocks`` u8 [E, out, in/32, 16], ``*_scales`` u8
[E, out, in/32], the checkpoint's own layout) decoded inside the computation, or dense ``*_kernel``
[E, in, out]. Two execution paths, picked by static shapes:
- gather (few tokens, e.g. decode): read only the k selected experts of each token (packed experts
  stay packed: decoded inside the matrix-vector product);
- grouped (many tokens): sort assignments by expert and run ``jax.lax.ragged_dot`` (on CPU, whose
  ragged_dot is dense over all experts, a scan over one-expert tiles of rows instead).
Neither computes an expert for a token that did not select it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.common import dense, matmul, param, precision_for

PACKED = "mxfp4"
DENSE = "dense"
EXPERT_FORMATS = (PACKED, DENSE)


def router(x: jax.Array, kernel: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (weights [N, k] in x's dtype, expert ids [N, k] int32), top-k then softmax."""
    logits = dense(x, kernel, "nh,he->ne", bias)
    top, idx = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(x.dtype)
    return weights, idx.astype(jnp.int32)


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """Clamped SwiGLU on interleaved [..., 2I] -> [..., I] (float32 math, x's dtype out)."""
    h = gate_up.astype(jnp.float32)
    gate = jnp.minimum(h[..., 0::2], limit)
    up = jnp.clip(h[..., 1::2], -limit, limit)
    return (gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)).astype(gate_up.dtype)


def _all_expert_weights(experts: dict, name: str, dtype) -> jax.Array:
    """Weights of ``name`` ('gate_up' | 'down') for every expert, as [E, out, in]."""
    if f"{name}_blocks" in experts:
        return mxfp4.unpack(experts[f"{name}_blocks"], experts[f"{name}_scales"], dtype)
    return jnp.swapaxes(experts[f"{name}_kernel"], -1, -2).astype(dtype)


def _project_gathered(x: jax.Array, experts: dict, name: str, ids: jax.Array) -> jax.Array:
    """x [M, in] times the weight of expert ids[m] for each row m -> [M, out] (+ bias).

    One dynamic slice per row reads only that expert; packed weights go through
    :func:`mxfp4.matvec`, which reads them once, packed (nothing is unpacked into memory).
    """
    packed = f"{name}_blocks" in experts
    rows = []
    for m in range(x.shape[0]):
        def pick(a, m=m):
            return jax.lax.dynamic_index_in_dim(a, ids[m], keepdims=False)

        if packed:
            y = mxfp4.matvec(x[m], pick(experts[f"{name}_blocks"]), pick(experts[f"{name}_scales"]))
        else:
            y = matmul(x[m:m + 1], pick(experts[f"{name}_kernel"]), "mi,io->mo")[0]
        rows.append(y + pick(experts[f"{name}_bias"]).astype(jnp.float32))
    return jnp.stack(rows).astype(x.dtype)


def _project_grouped(x: jax.Array, experts: dict, name: str, sorted_ids: jax.Array,
                     group_sizes: jax.Array) -> jax.Array:
    """Rows of x [M, in] sorted by expert; group_sizes [E] -> [M, out] (+ bias), via ragged_dot."""
    w = _all_expert_weights(experts, name, x.dtype)  # [E, out, in]
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))
    y = jax.lax.ragged_dot_general(x, w, group_sizes, dims, precision=precision_for(x.dtype),
                                   preferred_element_type=jnp.float32)
    return (y + experts[f"{name}_bias"][sorted_ids].astype(jnp.float32)).astype(x.dtype)


def _project_tiled(x: jax.Array, experts: dict, name: str, group_sizes: jax.Array) -> jax.Array:
    """:func:`_project_grouped` without ragged_dot, whose XLA:CPU lowering multiplies every row by
    every expert (E times the work): a scan over tiles of rows that each belong to one expert, at
    most M/tile + E of them, each decoding only its expert's weight. Differentiable."""
    m, e = x.shape[0], group_sizes.shape[0]
    tile = int(min(128, max(8, pl2(-(-m // e)))))
    per_expert = (group_sizes + tile - 1) // tile
    first = jnp.cumsum(per_expert) - per_expert  # first tile of each expert
    start = jnp.cumsum(group_sizes) - group_sizes  # first row of each expert
    j = jnp.arange(-(-m // tile) + e)
    expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(per_expert), j, side="right"), e - 1)
    row0 = start[expert] + (j - first[expert]) * tile
    live = j < jnp.sum(per_expert)
    rows = jnp.concatenate([x, jnp.zeros((tile, x.shape[1]), x.dtype)])
    packed = f"{name}_blocks" in experts
    out = experts[f"{name}_bias"].shape[-1]

    def body(y, t):
        ex, r0, stop, ok = t

        def compute(y):
            pick = lambda a: jax.lax.dynamic_index_in_dim(a, ex, keepdims=False)  # noqa: E731
            xs = jax.lax.dynamic_slice_in_dim(rows, r0, tile)
            if packed:
                w = mxfp4.unpack(pick(experts[f"{name}_blocks"]), pick(experts[f"{name}_scales"]), x.dtype)
                ys = matmul(xs, w, "mi,oi->mo")
            else:
                ys = matmul(xs, pick(experts[f"{name}_kernel"]), "mi,io->mo")
            ys = ys + pick(experts[f"{name}_bias"]).astype(jnp.float32)
            valid = (r0 + jnp.arange(tile) < stop)[:, None]
            return jax.lax.dynamic_update_slice_in_dim(
                y, jnp.where(valid, ys, jax.lax.dynamic_slice_in_dim(y, r0, tile)), r0, 0)

        return jax.lax.cond(ok, compute, lambda y: y, y), None

    y, _ = jax.lax.scan(body, jnp.zeros((m + tile, out), jnp.float32),
                        (expert, row0, start[expert] + group_sizes[expert], live))
    return y[:m].astype(x.dtype)


def pl2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, int(n) - 1).bit_length()


def experts_forward(x: jax.Array, ids: jax.Array, weights: jax.Array, experts: dict, num_experts: int,
                    alpha: float, limit: float, path: str | None = None) -> jax.Array:
    """x [N, H], ids/weights [N, k] -> sum_k weights * expert_ids(x) [N, H].

    ``path``: 'gather' or 'grouped' (default: gather when N*k <= num_experts).
    """
    n, k = ids.shape
    if path is None:
        path = "gather" if n * k <= num_experts else "grouped"
    flat = ids.reshape(-1)
    if path == "gather":
        xs = jnp.repeat(x, k, axis=0)  # [N*k, H], row m = token m // k
        h = swiglu(_project_gathered(xs, experts, "gate_up", flat), alpha, limit)
        y = _project_gathered(h, experts, "down", flat)
    elif path == "grouped":
        order = jnp.argsort(flat, stable=True)
        sorted_ids = flat[order]
        group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        xs = x[order // k]
        if jax.default_backend() == "cpu":
            project = lambda v, name: _project_tiled(v, experts, name, group_sizes)  # noqa: E731
        else:
            project = lambda v, name: _project_grouped(v, experts, name, sorted_ids, group_sizes)  # noqa: E731
        h = swiglu(project(xs, "gate_up"), alpha, limit)
        y_sorted = project(h, "down")
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    else:
        raise ValueError(f"unknown expert path {path!r}")
    y = y.reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", y, weights.astype(jnp.float32)).astype(x.dtype)


class MoE(nnx.Module):
    """Router (``router_kernel`` [H, E], ``router_bias`` [E]) and E experts.

    Packed experts: ``gate_up_blocks`` [E, 2I, H/32, 16], ``gate_up_scales`` [E, 2I, H/32],
    ``down_blocks`` [E, H, I/32, 16], ``down_scales`` [E, H, I/32]; dense experts: ``gate_up_kernel``
    [E, H, 2I], ``down_kernel`` [E, I, H]. Biases ``gate_up_bias`` [E, 2I], ``down_bias`` [E, H].
    """

    def __init__(self, cfg: GptOssConfig, *, dtype, experts: str = PACKED, rngs: nnx.Rngs):
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.experts_per_token
        self.alpha = cfg.swiglu_alpha
        self.limit = cfg.swiglu_limit
        self.expert_format = experts
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size

        def normal(shape, axes, std=0.02):
            return param((std * jax.random.normal(rngs.params(), shape)).astype(dtype), axes)

        self.router_kernel = normal((h, e), ("embed", None))
        self.router_bias = normal((e,), (None,))
        if experts == PACKED:
            for name, (out_dim, in_dim, out_ax, in_ax) in {
                "gate_up": (2 * i, h, "mlp", "embed"), "down": (h, i, "embed", "mlp")}.items():
                bshape, sshape = mxfp4.packed_shape((e, out_dim, in_dim))
                blocks = jax.random.randint(rngs.params(), bshape, 0, 256, jnp.int32).astype(jnp.uint8)
                # E8M0 scale 2^-7 keeps random weights near the 0.02 scale of the other layers.
                scales = jnp.full(sshape, 127 - 7, jnp.uint8)
                setattr(self, f"{name}_blocks", param(blocks, ("experts", out_ax, in_ax, None)))
                setattr(self, f"{name}_scales", param(scales, ("experts", out_ax, in_ax)))
        else:
            self.gate_up_kernel = normal((e, h, 2 * i), ("experts", "embed", "mlp"))
            self.down_kernel = normal((e, i, h), ("experts", "mlp", "embed"))
        self.gate_up_bias = normal((e, 2 * i), ("experts", "mlp"))
        self.down_bias = normal((e, h), ("experts", "embed"))

    def expert_weights(self) -> dict:
        names = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales") if self.expert_format == PACKED \
            else ("gate_up_kernel", "down_kernel")
        return {n: getattr(self, n)[...] for n in (*names, "gate_up_bias", "down_bias")}

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H] -> [B, T, H]."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        weights, ids = router(flat, self.router_kernel[...], self.router_bias[...], self.top_k)
        y = experts_forward(flat, ids, weights, self.expert_weights(), self.num_experts, self.alpha, self.limit)
        return y.reshape(b, t, h)

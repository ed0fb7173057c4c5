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
- grouped (many tokens): sort assignments by expert and run a block-grouped matmul.
Neither computes an expert for a token that did not select it.

Packed experts on GPU / TPU run the grouped path as one Pallas kernel per projection
(:mod:`gptoss_jax.kernels.mxfp4_gmm`: MXFP4 decoded inside the kernel, each selected expert's bytes read
once per call, also for decode from two tokens on, so the batch's rows share their experts' reads; a
single token takes the gather path, except for experts in the TPU layout on the TPU kernel, where both
projections run in block order with the biases added in the kernel and SwiGLU in the gate_up kernel's
epilogue); on CPU the grouped path runs the kernel's plain-JAX loops (each used expert decoded once per
call, then its blocks' products; few tokens keep the gather path there); dense experts, and ``off``, the
block-grouped scan. :func:`kernel_choice` says which; ``GPTOSS_MOE_KERNEL`` overrides it (``off``, ``tpu``,
``gpu``, ``cpu``, ``interpret`` = the TPU kernel in Pallas interpret mode, ``interpret-gpu``).

Packed experts have two storage layouts (``MoE.expert_layout``; the code dispatches on the blocks'
dtype): ``checkpoint`` (u8 blocks as above) and ``tpu`` (:func:`gptoss_jax.mxfp4.to_tpu`: u32 words
``[E, in/8, out]`` (in padded to a multiple of 64) and scales ``[E, in/32 rounded up to 32, out]``, the
output dim minor), which TPU HBM holds without
padding and which the TPU kernel and the matrix-vector product read as stored. The loader picks ``tpu``
for parameters placed on TPU devices (:func:`set_expert_layout`); CPU and GPU keep the checkpoint's.

Optional per-expert LoRA adapters ride in the same experts dict with a leading expert axis:
``{name}_lora_a`` [E, in, r] and ``{name}_lora_b`` [E, r, out] (already scaled by alpha/r); each
row adds ``(x A_e) B_e`` for its own expert e inside the same gather / grouped path.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax import platform as gptoss_platform
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import mxfp4_gmm
from gptoss_jax.layers.common import dense, dropout, matmul, param, precision_for
from gptoss_jax.layers.lora import ExpertLoRA

PACKED = "mxfp4"
DENSE = "dense"
EXPERT_FORMATS = (PACKED, DENSE)
KERNEL_ENV = "GPTOSS_MOE_KERNEL"
KERNEL_MODES = ("auto", "off", mxfp4_gmm.TPU, mxfp4_gmm.GPU, mxfp4_gmm.CPU, "interpret", "interpret-gpu")
CHECKPOINT_LAYOUT = "checkpoint"
TPU_LAYOUT = "tpu"
EXPERT_LAYOUTS = (CHECKPOINT_LAYOUT, TPU_LAYOUT)


def kernel_choice(mode: str | None = None, platform: str | None = None) -> tuple[str, bool] | None:
    """(kernel backend, interpret) for packed grouped experts, or None for the block-grouped scan.

    ``mode``: one of KERNEL_MODES (default: $GPTOSS_MOE_KERNEL, else 'auto'); 'auto' takes the kernel of
    ``platform`` (where the data lives: default :func:`gptoss_jax.platform.current`, set by the entry point
    that traces for a platform, else ``jax.default_backend()``): Mosaic on 'tpu', Triton on 'gpu', the
    CPU loops elsewhere.
    """
    mode = mode or os.environ.get(KERNEL_ENV) or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV}={mode!r}: choose one of {KERNEL_MODES}")
    if mode == "auto":
        platform = gptoss_platform.normalize(platform or gptoss_platform.current() or jax.default_backend())
        mode = {"tpu": mxfp4_gmm.TPU, "gpu": mxfp4_gmm.GPU}.get(platform, mxfp4_gmm.CPU)
    if mode == "off":
        return None
    if mode.startswith("interpret"):
        return (mxfp4_gmm.GPU if mode == "interpret-gpu" else mxfp4_gmm.TPU), True
    return mode, False


def router(x: jax.Array, kernel: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (weights [N, k] in x's dtype, expert ids [N, k] int32), top-k then softmax."""
    logits = dense(x, kernel, "mh,he->me", bias)
    top, idx = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(x.dtype)
    return weights, idx.astype(jnp.int32)


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """Clamped SwiGLU on interleaved [..., 2I] -> [..., I] (float32 math, x's dtype out).

    The math is :func:`mxfp4_gmm.clamped_swiglu` (which the TPU kernel's fused epilogue runs too). The
    halves are sliced before the conversion (the same values): XLA:TPU wrote the whole float32 [rows, 2I]
    and both float32 halves (6.1 GB live at the peak of a 20b prefill of 32,768 tokens)."""
    return mxfp4_gmm.clamped_swiglu(gate_up[..., 0::2].astype(jnp.float32), gate_up[..., 1::2].astype(jnp.float32),
                                    alpha, limit).astype(gate_up.dtype)


def take_experts(a: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``a[ids]`` of a per-expert array [E, ...]; an empty slot (id E) gives zeros."""
    return jnp.take(a, ids, axis=0, mode="fill", fill_value=0)


def _expert_weight(experts: dict, name: str, ids: jax.Array, dtype, d_in: int) -> jax.Array:
    """Weights of ``name`` ('gate_up' | 'down') for expert ``ids``, as [.., out, d_in] in ``dtype``."""
    if f"{name}_blocks" in experts:
        blocks, scales = take_experts(experts[f"{name}_blocks"], ids), take_experts(experts[f"{name}_scales"], ids)
        if mxfp4.is_tpu(blocks):
            return mxfp4.unpack_tpu(blocks, scales, dtype, d_in)
        return mxfp4.unpack(blocks, scales, dtype)
    return jnp.swapaxes(take_experts(experts[f"{name}_kernel"], ids), -1, -2).astype(dtype)


def _lora_input(x: jax.Array, name: str, lora_dropout) -> jax.Array:
    """The LoRA branch's input: x with dropout when ``lora_dropout`` = (key, rate) is given."""
    if lora_dropout is None:
        return x
    key, rate = lora_dropout
    return dropout(x, jax.random.fold_in(key, name == "down"), rate)


def _project_gathered(x: jax.Array, experts: dict, name: str, ids: jax.Array, lora_dropout=None) -> jax.Array:
    """x [M, in] times the weight of expert ids[m] for each row m -> [M, out] (+ LoRA, + bias).

    One dynamic slice per row reads only that expert; packed weights go through
    :func:`mxfp4.matvec`, which reads them once, packed (nothing is unpacked into memory).
    Rows of empty slots (id E) give zeros.
    """
    packed = f"{name}_blocks" in experts
    matvec = mxfp4.matvec_tpu if packed and mxfp4.is_tpu(experts[f"{name}_blocks"]) else mxfp4.matvec
    rows = []
    for m in range(x.shape[0]):
        def pick(a, m=m):
            return jax.lax.dynamic_index_in_dim(a, ids[m], keepdims=False)

        if packed:
            rows.append(matvec(x[m], pick(experts[f"{name}_blocks"]), pick(experts[f"{name}_scales"])))
        else:
            rows.append(matmul(x[m:m + 1], pick(experts[f"{name}_kernel"]), "mi,io->mo")[0])
    y = jnp.stack(rows)
    if f"{name}_lora_a" in experts:  # A [E, in, r], B [E, r, out] of each row's own expert
        prec = precision_for(x.dtype)
        a = take_experts(experts[f"{name}_lora_a"], ids).astype(x.dtype)
        b = take_experts(experts[f"{name}_lora_b"], ids).astype(x.dtype)
        h = jnp.einsum("mi,mir->mr", _lora_input(x, name, lora_dropout), a, precision=prec,
                       preferred_element_type=jnp.float32).astype(x.dtype)
        y = y + jnp.einsum("mr,mro->mo", h, b, precision=prec, preferred_element_type=jnp.float32)
    y = y + take_experts(experts[f"{name}_bias"], ids).astype(jnp.float32)
    return jnp.where((ids < experts[f"{name}_bias"].shape[0])[:, None], y, 0).astype(x.dtype)


def _block_size(rows: int, num_experts: int, smallest: int = 8) -> int:
    """Rows per block: about rows/E (padding stays <= the real rows), a power of two in [smallest, 256]."""
    per_expert = max(1, -(-rows // num_experts))
    return int(min(256, max(smallest, 1 << (per_expert - 1).bit_length())))


def _cpu_block_size(rows: int, num_experts: int) -> int:
    """Rows per block of the CPU kernel: about a quarter of rows/E, a power of two in [16, 64]. Its loop
    visits only real blocks, so smaller blocks cut the padding rows it multiplies (up to ~1.5x the real
    rows with blocks of rows/E); below 16 rows per product the per-block cost dominates."""
    return min(64, _block_size(-(-rows // 4), num_experts, 16))


def _project_grouped(x: jax.Array, experts: dict, name: str, sorted_ids: jax.Array,
                     group_sizes: jax.Array, lora_dropout=None, kernel=None) -> jax.Array:
    """Rows of x [M, in] sorted by expert; group_sizes [E] -> [M, out] (+ LoRA, + bias).

    A grouped matmul that touches each expert only for its own rows: every expert's group is padded
    to whole blocks, and a scan runs one [block, in] x [in, out] product per block with that
    block's expert weights (decoded from MXFP4 once per expert and call, see :func:`_scan_blocks`; plus
    that expert's LoRA adapters).
    Blocks past the last group are skipped. (jax.lax.ragged_dot lowers to a dense masked product
    over all experts on CPU, which would compute every expert for every row.) ``kernel`` (from
    :func:`kernel_choice`, packed weights only): the blocks' products run in one
    :func:`mxfp4_gmm.grouped_matmul` call instead of the scan (which also adds the bias and rounds to x's
    dtype, without LoRA); LoRA adds ``(x A_e) B_e`` per block.
    """
    m, d_in = x.shape
    e = group_sizes.shape[0]
    d_out = experts[f"{name}_bias"].shape[-1]
    kernel = kernel if f"{name}_blocks" in experts else None
    if kernel is None:
        bsz = _block_size(m, e)
    else:
        bsz = _cpu_block_size(m, e) if kernel[0] == mxfp4_gmm.CPU else _block_size(m, e, 16)
    num_blocks, dest, src, block_expert = _block_plan(sorted_ids, group_sizes, bsz)

    def to_blocks(rows):
        return jnp.take(rows, src, axis=0, mode="fill", fill_value=0).reshape(num_blocks, bsz, d_in)

    lora = f"{name}_lora_a" in experts
    xb = to_blocks(x)
    xl = to_blocks(_lora_input(x, name, lora_dropout)) if lora else xb
    prec = precision_for(x.dtype)
    if kernel is not None and not lora:
        # the bias added and the sum rounded to x's dtype inside the kernel: the same float32 sum and one
        # rounding as below, but the [blocks, d_out] output is x's dtype (a float32 one was the largest
        # temporary of a prefill: 3.2 of 4.27 GB for the 20b gate_up at 32,768 tokens on h100)
        backend, interpret = kernel
        y = mxfp4_gmm.grouped_matmul(xb.reshape(num_blocks * bsz, d_in), experts[f"{name}_blocks"],
                                     experts[f"{name}_scales"], jnp.minimum(block_expert, e), bsz, backend, interpret,
                                     m, experts[f"{name}_bias"], x.dtype)
        return jnp.take(y, dest, axis=0, mode="fill", fill_value=0)  # empty slots (dest past the end): zeros
    if kernel is not None:
        block_expert = jnp.minimum(block_expert, e)
        y = _kernel_blocks(xb, xl, experts, name, block_expert, bsz, kernel, prec, m)
        y = jnp.take(y, dest, axis=0, mode="fill", fill_value=0)
        return (y + take_experts(experts[f"{name}_bias"], sorted_ids).astype(jnp.float32)).astype(x.dtype)
    y = _scan_blocks(xb, xl, experts, name, jnp.minimum(block_expert, e), prec)
    y = jnp.take(y.reshape(num_blocks * bsz, d_out), dest, axis=0, mode="fill", fill_value=0)
    return (y + take_experts(experts[f"{name}_bias"], sorted_ids).astype(jnp.float32)).astype(x.dtype)


def _scan_blocks(xb, xl, experts, name, block_expert, prec):
    """The block-grouped scan: row blocks xb [nb, bsz, in] (LoRA inputs xl) times each block's expert
    (block_expert [nb], ascending; E = a padding block, zeros) -> float32 [nb, bsz, out].

    Blocks are sorted by expert, so the scan carries the last expert's weight [out, in] and decodes (or
    gathers) an expert only at its first block: once per call, however many blocks its rows fill.
    """
    e, d_out = experts[f"{name}_bias"].shape
    lora = f"{name}_lora_a" in experts
    bsz, dtype = xb.shape[1], xb.dtype

    def block(carry, args):
        rows, lora_rows, eid = args
        last, w_last = carry
        # a new expert: decode it; the same one again, or a padding block: keep the carried weight
        w = jax.lax.cond((eid == last) | (eid >= e), lambda: w_last,
                         lambda: _expert_weight(experts, name, jnp.minimum(eid, e - 1), dtype, xb.shape[2]))

        def compute(_):
            y = jnp.einsum("li,oi->lo", rows, w, precision=prec, preferred_element_type=jnp.float32)
            if lora:
                a = experts[f"{name}_lora_a"][eid].astype(dtype)
                b = experts[f"{name}_lora_b"][eid].astype(dtype)
                h = jnp.einsum("li,ir->lr", lora_rows, a, precision=prec, preferred_element_type=jnp.float32)
                y = y + jnp.einsum("lr,ro->lo", h.astype(dtype), b, precision=prec, preferred_element_type=jnp.float32)
            return y

        y = jax.lax.cond(eid < e, compute, lambda _: jnp.zeros((bsz, d_out), jnp.float32), None)
        return (jnp.where(eid < e, eid, last), w), y

    w0 = jnp.zeros((d_out, xb.shape[2]), dtype)
    _, y = jax.lax.scan(block, (jnp.int32(-1), w0), (xb, xl, block_expert))
    return y


def _block_plan(sorted_ids: jax.Array, group_sizes: jax.Array, bsz: int):
    """Rows sorted by expert (ids [M], E = an empty slot), group_sizes [E] -> (num_blocks, dest [M]: each
    row's place in the blocks (num_blocks * bsz: none), src [num_blocks * bsz]: each block row's sorted
    row (M: padding), block_expert [num_blocks] (E: a padding block)); every group padded to whole blocks."""
    m, e = sorted_ids.shape[0], group_sizes.shape[0]
    # static bound: at most c = min(E, M) groups are non-empty, so sum_e ceil(g_e / bsz) <= ceil(M / bsz) + c - 1
    num_blocks = -(-m // bsz) + min(e, m)
    padded = (group_sizes + bsz - 1) // bsz * bsz
    padded_end = jnp.cumsum(padded)
    dest = (padded_end - padded)[sorted_ids] + jnp.arange(m) - (jnp.cumsum(group_sizes) - group_sizes)[sorted_ids]
    dest = jnp.where(sorted_ids < e, dest, num_blocks * bsz)  # empty slots (id E) go to no block
    # block row r holds sorted row src[r] (m: a padding row, zeros). A gather, not zeros + scatter: XLA:GPU
    # fused every layer's zero [rows, d_in] buffers into one broadcast kept live for the whole program
    # (52 of the 56 GB of temporaries of a 20b prefill of 32,768 tokens)
    src = jnp.full((num_blocks * bsz,), m, jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    block_expert = jnp.sum(padded_end[None, :] <= (jnp.arange(num_blocks) * bsz)[:, None], axis=1)
    return num_blocks, dest, src, block_expert


def _grouped_tpu_mlp(xs: jax.Array, experts: dict, sorted_ids: jax.Array, group_sizes: jax.Array,
                     alpha: float, limit: float, interpret: bool) -> jax.Array:
    """Rows xs [M, H] sorted by expert -> [M, H] (both projections, SwiGLU, biases) on the TPU kernel,
    packed experts without LoRA: the rows stay in block order from gate_up through down
    (:func:`mxfp4_gmm.gmm_swiglu`: gate_up with its bias and SwiGLU in the kernel, [rows, I] out;
    :func:`mxfp4_gmm.gmm_bias`: down with its bias), leaving it once at the end.
    Padding rows carry SwiGLU(bias) through down and are dropped; real rows equal the two
    :func:`_project_grouped` calls and :func:`swiglu`. (Between the projections XLA:TPU held the float32
    products, their biased float32 copies and the gathered rows: 23.5 GB of temporaries for a 20b prefill of
    32,768 tokens with the residual stream's adds; then the bf16 [rows, 2I] gate_up output and the two
    strided halves it wrote for SwiGLU's even / odd columns, 3.2 GB live at the peak.)"""
    e = group_sizes.shape[0]
    bsz = _block_size(xs.shape[0], e, 16)
    num_blocks, dest, src, block_expert = _block_plan(sorted_ids, group_sizes, bsz)
    block_expert = jnp.minimum(block_expert, e)
    xb = jnp.take(xs, src, axis=0, mode="fill", fill_value=0)

    h = mxfp4_gmm.gmm_swiglu(xb, experts["gate_up_blocks"], experts["gate_up_scales"], experts["gate_up_bias"],
                             block_expert, bsz, alpha, limit, interpret, xs.shape[0], True)  # slabs: down reads them
    y = mxfp4_gmm.gmm_bias(h, experts["down_blocks"], experts["down_scales"], experts["down_bias"], block_expert,
                           bsz=bsz, interpret=interpret, rows=xs.shape[0])
    return jnp.take(y, dest, axis=0, mode="fill", fill_value=0)


def _kernel_blocks(xb, xl, experts, name, block_expert, bsz, kernel, prec, rows=None):
    """Blocks xb [nb, bsz, in] (LoRA inputs xl; ``rows`` real rows) times their experts' packed weights
    -> float32 [nb*bsz, out]."""
    nb, _, d_in = xb.shape
    backend, interpret = kernel
    y = mxfp4_gmm.grouped_matmul(xb.reshape(nb * bsz, d_in), experts[f"{name}_blocks"], experts[f"{name}_scales"],
                                 block_expert, bsz, backend, interpret, rows)
    if f"{name}_lora_a" in experts:  # padding blocks (id E) take zero adapters
        a = take_experts(experts[f"{name}_lora_a"], block_expert).astype(xb.dtype)  # [nb, in, r]
        b = take_experts(experts[f"{name}_lora_b"], block_expert).astype(xb.dtype)  # [nb, r, out]
        h = jnp.einsum("cli,cir->clr", xl, a, precision=prec, preferred_element_type=jnp.float32).astype(xb.dtype)
        y = y + jnp.einsum("clr,cro->clo", h, b, precision=prec, preferred_element_type=jnp.float32).reshape(y.shape)
    return y


def experts_forward(x: jax.Array, ids: jax.Array, weights: jax.Array, experts: dict, num_experts: int,
                    alpha: float, limit: float, path: str | None = None, lora_dropout=None,
                    kernel: str | None = None) -> jax.Array:
    """x [N, H], ids/weights [N, k] -> sum_k weights * expert_ids(x) [N, H].

    ``path``: 'gather' or 'grouped' (default: gather when N*k <= num_experts). An id equal to
    ``num_experts`` is an empty slot: no expert, zero output (expert parallelism marks assignments to
    experts held by other devices so); per-expert leaves are read through ``take_experts``.
    ``lora_dropout``: (key, rate) for the LoRA adapters' inputs while training, else None.
    ``kernel``: a :data:`KERNEL_MODES` entry for packed experts (default: :func:`kernel_choice`'s); with a
    kernel the default path is grouped from two tokens on (each selected expert read once, whatever the
    batch), and gather for a single token: its k experts are distinct, so each is read exactly once by
    its own fused matrix-vector product, with no padding blocks, planes or scatters around a kernel.
    Experts in the TPU layout on the TPU kernel take the kernel for a single token too: XLA:TPU does not
    fuse the words' decode into the product (it writes float32 planes of each expert), while the kernel
    reads each selected expert once (padding blocks fetch nothing).
    """
    n, k = ids.shape
    use = kernel_choice(kernel) if "gate_up_blocks" in experts else None
    tpu_kernel = use is not None and use[0] == mxfp4_gmm.TPU and mxfp4.is_tpu(experts["gate_up_blocks"])
    if path is None:
        few = use is None or use[0] == mxfp4_gmm.CPU or (n == 1 and not tpu_kernel)
        path = "gather" if n * k <= num_experts and few else "grouped"
    flat = ids.reshape(-1)
    if path == "gather":
        xs = jnp.repeat(x, k, axis=0)  # [N*k, H], row m = token m // k
        h = swiglu(_project_gathered(xs, experts, "gate_up", flat, lora_dropout), alpha, limit)
        y = _project_gathered(h, experts, "down", flat, lora_dropout)
    elif path == "grouped":
        order = jnp.argsort(flat, stable=True)
        sorted_ids = flat[order]
        group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        xs = x[order // k]
        if tpu_kernel and "gate_up_lora_a" not in experts and "down_lora_a" not in experts:
            y_sorted = _grouped_tpu_mlp(xs, experts, sorted_ids, group_sizes, alpha, limit, use[1])
        else:
            h = swiglu(_project_grouped(xs, experts, "gate_up", sorted_ids, group_sizes, lora_dropout, use),
                       alpha, limit)
            y_sorted = _project_grouped(h, experts, "down", sorted_ids, group_sizes, lora_dropout, use)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        y = jnp.take(y_sorted, inverse, axis=0)  # unsorted by a gather: no zero buffer per layer (see above)
        if tpu_kernel:
            return _combine_elementwise(y.reshape(n, k, -1), weights).astype(x.dtype)
    else:
        raise ValueError(f"unknown expert path {path!r}")
    y = y.reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("mxh,mx->mh", y, weights.astype(jnp.float32)).astype(x.dtype)


def _combine_elementwise(y: jax.Array, weights: jax.Array) -> jax.Array:
    """y [N, k, H], weights [N, k] -> float32 sum_j y[:, j] * weights[:, j] [N, H], as products and adds
    (the einsum's float32 products and k-term sum, in the order j = 0..k-1). XLA:TPU lowered the einsum as a
    dot over k whose float32 [N*k, H] operand and its relaid-out copy (2 x 1.5 GB for a 20b prefill of 32,768
    tokens) were the largest values of the program; products and adds fuse with the rows' conversion."""
    w = weights.astype(jnp.float32)
    out = y[:, 0].astype(jnp.float32) * w[:, 0, None]
    for j in range(1, y.shape[1]):
        out = out + y[:, j].astype(jnp.float32) * w[:, j, None]
    return out


class MoE(nnx.Module):
    """Router (``router_kernel`` [H, E], ``router_bias`` [E]) and E experts.

    Packed experts: ``gate_up_blocks`` [E, 2I, H/32, 16], ``gate_up_scales`` [E, 2I, H/32],
    ``down_blocks`` [E, H, I/32, 16], ``down_scales`` [E, H, I/32]; dense experts: ``gate_up_kernel``
    [E, H, 2I], ``down_kernel`` [E, I, H]. Biases ``gate_up_bias`` [E, 2I], ``down_bias`` [E, H].
    ``lora``: None, or the per-expert :class:`~gptoss_jax.layers.lora.ExpertLoRA` adapters of
    gate_up / down (attached by ``train.lora.add_lora``).
    """

    def __init__(self, cfg: GptOssConfig, *, dtype, experts: str = PACKED, rngs: nnx.Rngs):
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.experts_per_token
        self.alpha = cfg.swiglu_alpha
        self.limit = cfg.swiglu_limit
        self.expert_format = experts
        self.layout = None  # a gptoss_jax.sharding.Layout when placed on a mesh (shard_model)
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
        self.lora: ExpertLoRA | None = nnx.data(None)  # a data field: adapters may be attached

    def expert_weights(self) -> dict:
        names = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales") if self.expert_format == PACKED \
            else ("gate_up_kernel", "down_kernel")
        out = {n: getattr(self, n)[...] for n in (*names, "gate_up_bias", "down_bias")}
        lo = self.lora
        for name, adapter in (() if lo is None else (("gate_up", lo.gate_up), ("down", lo.down))):
            if adapter is not None:  # experts_forward's dict keys
                out[f"{name}_lora_a"] = adapter.a[...]
                out[f"{name}_lora_b"] = adapter.b[...] * lo.scale
        return out

    @property
    def expert_layout(self) -> str | None:
        """'checkpoint' or 'tpu' for packed experts (see the module docstring), None for dense ones."""
        if self.expert_format != PACKED:
            return None
        return TPU_LAYOUT if mxfp4.is_tpu(self.gate_up_blocks) else CHECKPOINT_LAYOUT

    def set_expert_layout(self, layout: str) -> None:
        """Store the packed experts in ``layout`` (EXPERT_LAYOUTS), converting on the arrays' own devices
        (placed again by the MoE's sharding layout, if any); abstract (``ShapeDtypeStruct``) parameters
        are converted abstractly. Dense experts and a layout already held are left as they are."""
        if layout not in EXPERT_LAYOUTS:
            raise ValueError(f"expert layout must be one of {EXPERT_LAYOUTS}, got {layout!r}")
        if self.expert_layout in (None, layout):
            return
        in_dims = {"gate_up": self.down_bias.shape[-1], "down": self.gate_up_bias.shape[-1] // 2}  # H, I
        for name in ("gate_up", "down"):
            fn = mxfp4.to_tpu if layout == TPU_LAYOUT else functools.partial(mxfp4.from_tpu, k=in_dims[name])
            bvar, svar = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
            out_ax, in_ax = svar.get_metadata()["out_sharding"][1:] if layout == TPU_LAYOUT else \
                svar.get_metadata()["out_sharding"][:0:-1]
            values = (bvar.get_value(), svar.get_value())
            if any(isinstance(v, jax.ShapeDtypeStruct) for v in values):
                blocks, scales = jax.eval_shape(fn, *values)
            else:
                blocks, scales = jax.jit(fn)(*values)
            baxes = ("experts", in_ax, out_ax) if layout == TPU_LAYOUT else ("experts", out_ax, in_ax, None)
            saxes = ("experts", in_ax, out_ax) if layout == TPU_LAYOUT else ("experts", out_ax, in_ax)
            if self.layout is not None and not isinstance(blocks, jax.ShapeDtypeStruct):
                blocks = jax.device_put(blocks, self.layout.sharding(baxes, blocks.shape))
                scales = jax.device_put(scales, self.layout.sharding(saxes, scales.shape))
            setattr(self, f"{name}_blocks", param(blocks, baxes))
            setattr(self, f"{name}_scales", param(scales, saxes))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H] -> [B, T, H]."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        weights, ids = router(flat, self.router_kernel[...], self.router_bias[...], self.top_k)
        lo = self.lora
        lora_dropout = None if lo is None or lo.key is None else (lo.key[...], lo.dropout)
        args = (flat, ids, weights, self.expert_weights(), self.num_experts, self.alpha, self.limit)
        if self.layout is None:
            y = experts_forward(*args, lora_dropout=lora_dropout)
        else:
            y = self.layout.experts_forward(*args, batch=b, lora_dropout=lora_dropout)
        return y.reshape(b, t, h)


def set_expert_layout(model: nnx.Module, layout: str) -> nnx.Module:
    """:meth:`MoE.set_expert_layout` on every MoE layer of ``model`` (in place); returns the model."""
    for node in [n for _, n in nnx.iter_graph(model) if isinstance(n, MoE)]:
        node.set_expert_layout(layout)
    return model


def layout_for(platform: str) -> str:
    """The expert layout for parameters living on ``platform`` ('tpu' on TPU, else the checkpoint's)."""
    return TPU_LAYOUT if gptoss_platform.normalize(platform) == "tpu" else CHECKPOINT_LAYOUT

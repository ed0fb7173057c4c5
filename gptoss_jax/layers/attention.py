"""Grouped-query attention with learned sinks, biases, YaRN RoPE and an optional sliding window.

Query head ``h`` uses KV head ``h // (num_attention_heads / num_key_value_heads)``. Each head has one learned sink
logit that joins the softmax denominator only: ``p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``.
Key ``j`` is visible to query ``i`` iff ``k_pos[j] >= 0``, ``k_pos[j] <= q_pos[i]`` and, for a window
``w > 0``, ``k_pos[j] > q_pos[i] - w`` (the window counts the query's own position).
Positions < 0 mark padding or empty cache slots. Optional segment ids (packed training sequences)
additionally require ``q_seg[i] == k_seg[j]``, so packed samples never attend to each other.
"""
from __future__ import annotations

import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from gptoss_jax import platform
from gptoss_jax.config import ATTENTION_IMPLS, GptOssConfig
from gptoss_jax.kernels.flash_attention import flash_attention, kernel_choice, unsupported
from gptoss_jax.layers.common import dense, lora_delta, matmul, param, precision_for
from gptoss_jax.layers.flash import BLOCK_K, block_attention_kv_major
from gptoss_jax.layers.kv_cache import LayerCache, update_cache
from gptoss_jax.layers.lora import AttentionLoRA
from gptoss_jax.layers.qkv import PARTS, fuse_qkv, split_qkv
from gptoss_jax.layers.rope import apply_rope


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int, q_seg: jax.Array | None = None,
                   k_seg: jax.Array | None = None) -> jax.Array:
    """[B, Tq, Tk] bool: which keys each query may see (causal, valid, inside the window, same segment)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (q >= 0) & (k <= q)
    if window > 0:
        mask &= k > q - window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_pos: jax.Array,
              k_pos: jax.Array, window: int, q_seg: jax.Array | None = None,
              k_seg: jax.Array | None = None) -> jax.Array:
    """Softmax attention with sinks. q [B,Tq,nq,D], k/v [B,Tk,nkv,D], sinks [nq] -> [B,Tq,nq,D].

    Scores, sinks and softmax are float32; the weighted sum of values accumulates in float32.
    """
    return attention_kv_major(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), sinks, q_pos, k_pos, window,
                              q_seg, k_seg)


def attention_kv_major(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_pos: jax.Array,
                       k_pos: jax.Array, window: int, q_seg: jax.Array | None = None,
                       k_seg: jax.Array | None = None) -> jax.Array:
    """:func:`attention` with k/v in the cache layout [B, nkv, Tk, D]."""
    b, tq, nq, d = q.shape
    nkv = k.shape[1]
    g = nq // nkv
    prec = precision_for(q.dtype)
    qg = q.reshape(b, tq, nkv, g, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, precision=prec, preferred_element_type=jnp.float32)
    scores = computed_once(scores * jnp.float32(1.0 / math.sqrt(d)))
    mask = attention_mask(q_pos, k_pos, window, q_seg, k_seg)[:, None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, nkv, g, 1, 1), (b, nkv, g, tq, 1))
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, precision=prec,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, tq, nq, d).astype(q.dtype)


def computed_once(x):
    """``x`` (arrays of any shape, a pytree) as it is. In a program for the GPU, behind an optimization
    barrier, so that XLA computes it once. XLA:GPU's rematerialization squeezes temporaries toward
    nothing when parameters and outputs exceed 80% of the device memory (120b weights and a batch-64
    cache on an 80 GB H100): it recomputed a full layer's scores dot for each of the softmax's three
    passes (the keys read three times, 12 GB more per decode step at batch 64, context 4,096, to save
    67 MB of float32 scores per layer) and the q/k/v projection for the cache write (its weight read
    twice). A value behind a barrier is not rematerialized."""
    return platform.dependent(x, gpu=jax.lax.optimization_barrier, default=lambda x: x)


def check_attention_impl(impl: str) -> str:
    """``impl`` if it names an implementation (ATTENTION_IMPLS: 'auto' picks per call, see
    :func:`attention_path`; 'xla' is the exact path above; 'blocked' the flash-style plain-JAX path of
    :mod:`gptoss_jax.layers.flash`; 'pallas' the kernel of :mod:`gptoss_jax.kernels.flash_attention`),
    else a ValueError listing them."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
    return impl


_on_mesh: contextvars.ContextVar[bool] = contextvars.ContextVar("gptoss_attention_on_mesh", default=False)


def mesh_aware(hidden_states):
    """Decorates ``GptOss.hidden_states``: while it traces a model placed on a mesh (``self.layout``),
    'auto' does not pick the Pallas kernel (a kernel call is not partitioned by XLA: sharded operands
    would be gathered; it is not wrapped in shard_map yet)."""
    @functools.wraps(hidden_states)
    def wrapped(self, *args, **kwargs):
        token = _on_mesh.set(getattr(self, "layout", None) is not None)
        try:
            return hidden_states(self, *args, **kwargs)
        finally:
            _on_mesh.reset(token)
    return wrapped


def attention_path(impl: str, n_keys: int, n_queries: int | None = None) -> str:
    """'xla', 'blocked' or 'pallas' for a call of ``n_queries`` queries over ``n_keys`` keys.

    'auto': the exact path while all keys fit one key block (``n_keys <= BLOCK_K``: blocking would
    compute the same single block, so the exact path is as small and is the parity reference), and for
    one query (decode) in a program traced for a TPU or GPU (:func:`gptoss_jax.platform.current`): its
    scores are [B, nq, n_keys], the keys it is given are the decode step's length bucket
    (:func:`gptoss_jax.decode.runner.decode_bucket`), and a static program has no data-dependent loop
    (on a GPU each trip of one is a round trip to the host). Beyond, the Pallas kernel for several
    queries (prefill, training) in a program traced for a TPU or GPU of a model not on a mesh
    (:func:`mesh_aware`), else the blocked path (its memory is O(T x block) instead of T x S scores,
    sliding layers do O(T x window) work, and a context-sized cache is read only up to the filled
    slots). Decode never takes the kernel: 'pallas' there means what 'auto' picks.
    """
    impl = check_attention_impl(impl)
    if impl == "pallas" and n_queries == 1:
        impl = "auto"
    if impl == "auto":
        if n_keys <= BLOCK_K or (n_queries == 1 and platform.current() in ("tpu", "gpu")):
            return "xla"
        kernel = (n_queries is not None and n_queries > 1 and platform.current() in ("tpu", "gpu")
                  and not _on_mesh.get())
        return "pallas" if kernel else "blocked"
    return impl


def attend_kv_major(q, k, v, sinks, q_pos, k_pos, window: int, q_seg=None, k_seg=None, impl: str = "auto"):
    """:func:`attention_kv_major` (k/v [B, nkv, S, D]) by the implementation :func:`attention_path` picks."""
    path = attention_path(impl, k.shape[2], q.shape[1])
    if path == "pallas" and impl == "auto":  # traced for a TPU / GPU: kernel_choice() names the kernel
        backend, interpret = kernel_choice()
        if unsupported(backend, q.shape[2], k.shape[1], q.shape[3], interpret):
            path = "blocked"  # heads the compiled kernel cannot tile (tiny test models)
    if path == "pallas":
        return flash_attention(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg)
    if path == "blocked":
        return block_attention_kv_major(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg)
    return attention_kv_major(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg)


def set_attention(model, impl: str) -> None:
    """Make every attention layer of ``model`` (a GptOss) use ``impl`` (one of ATTENTION_IMPLS)."""
    impl = check_attention_impl(impl)
    for block in model.layers:
        block.attn.impl = impl


class Attention(nnx.Module):
    """The fused q/k/v projection and the o projection with biases, and per-head sinks, for one layer.

    Parameters: ``qkv_kernel`` [H, nkv, G + 2, D] and ``qkv_bias`` [nkv, G + 2, D] (G = nq / nkv;
    per KV head its G query heads, then its key, then its value: :mod:`gptoss_jax.layers.qkv`),
    ``o_kernel`` [nq, D, H], ``o_bias`` [H], ``sinks`` [nq]. One matmul computes q, k and v.
    Tensor parallelism splits the fused tensors over their KV-head axis (``kv_heads``), each query head
    staying with its KV head; a ``model`` axis that does not divide nkv leaves them replicated.

    ``lora``: None, or the :class:`~gptoss_jax.layers.lora.AttentionLoRA` adapters of q/k/v/o
    (attached by ``train.lora.add_lora``); the q, k and v updates are added to their slots of the
    fused projection's output.
    """

    #: LoRA einsum specs per projection: x -> rank r, rank r -> output.
    LORA_SPECS = {"q": ("bth,hr->btr", "btr,rnd->btnd"), "k": ("bth,hr->btr", "btr,rkd->btkd"),
                  "v": ("bth,hr->btr", "btr,rkd->btkd"), "o": ("btnd,ndr->btr", "btr,rh->bth")}

    def __init__(self, cfg: GptOssConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.window = cfg.window(layer)
        self.impl = "auto"
        h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def normal(shape, axes, std=0.02):
            return param((std * jax.random.normal(rngs.params(), shape)).astype(dtype), axes)

        slots = nq // nkv + 2
        self.qkv_kernel = normal((h, nkv, slots, d), ("embed", "kv_heads", None, "head_dim"))
        self.qkv_bias = normal((nkv, slots, d), ("kv_heads", None, "head_dim"))
        self.o_kernel = normal((nq, d, h), ("heads", "head_dim", "embed"))
        self.o_bias = normal((h,), ("embed",))
        self.sinks = normal((nq,), ("heads",), std=1.0)
        self.lora: AttentionLoRA | None = nnx.data(None)  # a data field: adapters may be attached

    def _lora(self, name: str, x: jax.Array) -> jax.Array | None:
        """The float32 LoRA update of projection ``name`` on input ``x``, or None when none is attached."""
        lo = self.lora
        adapter = None if lo is None else {"q": lo.q, "k": lo.k, "v": lo.v, "o": lo.o}[name]
        if adapter is None:
            return None
        return lora_delta(x, adapter.a[...], adapter.b[...] * lo.scale, *self.LORA_SPECS[name],
                          lo.dropout_key("qkvo".index(name)), lo.dropout)

    def _qkv_lora(self, x: jax.Array) -> jax.Array | None:
        """The q, k and v LoRA updates laid out as the fused output [B, T, nkv, G + 2, D] (zeros for a
        projection without an adapter), or None when none of them has one."""
        deltas = {p: self._lora(p, x) for p in PARTS}
        if all(dl is None for dl in deltas.values()):
            return None
        b, t = x.shape[:2]
        nkv, slots, d = self.qkv_kernel.shape[1:]
        shapes = {"q": (b, t, nkv * (slots - 2), d), "k": (b, t, nkv, d), "v": (b, t, nkv, d)}
        deltas = {p: jnp.zeros(shapes[p], jnp.float32) if dl is None else dl for p, dl in deltas.items()}
        return fuse_qkv(deltas["q"], deltas["k"], deltas["v"], xp=jnp)

    def project_qkv(self, x: jax.Array, once: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, H] -> q [B, T, nq, D], k, v [B, T, nkv, D] (before RoPE): one matmul with the fused
        kernel, its bias and, when attached, the LoRA updates (float32 sums, one rounding to x's dtype).
        ``once``: the fused output goes through :func:`computed_once` (the same values)."""
        qkv = dense(x, self.qkv_kernel[...], "bth,hkqd->btkqd", self.qkv_bias[...], self._qkv_lora(x))
        return split_qkv(computed_once(qkv) if once else qkv)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 cache: LayerCache | None = None, segment_ids: jax.Array | None = None,
                 kv_len: int | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, H], cos/sin [B, T, D/2], positions [B, T] -> ([B, T, H], updated cache).

        ``segment_ids`` [B, T] (packed training sequences, no cache): tokens attend within their segment.
        ``kv_len`` (static; with a cache): a full-attention layer attends over its first ``kv_len`` slots
        only (:func:`visible_slots`); the caller promises every position < ``kv_len``.
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training sequences and cannot be used with a cache")
        q, k, v = self.project_qkv(x, once=cache is not None)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attend_kv_major(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), self.sinks[...], positions,
                                  positions, self.window, segment_ids, segment_ids, self.impl)
            return self._project_out(out), None
        if self.window == 0 or x.shape[1] == 1:
            # A full-context cache, or a ring receiving one token (which only overwrites the position
            # that just left the window), holds every key the chunk needs once updated: attend to it
            # in place instead of copying it.
            cache = update_cache(cache, k, v, positions)
            keys, values, k_pos = visible_slots(cache, None if self.window else kv_len)
            keys, values = keys.astype(k.dtype), values.astype(v.dtype)
        else:  # a ring may overwrite keys that earlier queries of the chunk still see: attend to
            # what it held before the chunk, plus the chunk itself
            keys = jnp.concatenate([cache.k.astype(k.dtype), jnp.swapaxes(k, 1, 2)], axis=2)
            values = jnp.concatenate([cache.v.astype(v.dtype), jnp.swapaxes(v, 1, 2)], axis=2)
            k_pos = jnp.concatenate([cache.pos, positions], axis=1)
            cache = update_cache(cache, k, v, positions)
        out = attend_kv_major(q, keys, values, self.sinks[...], positions, k_pos, self.window, impl=self.impl)
        return self._project_out(out), cache

    def _project_out(self, out: jax.Array) -> jax.Array:
        """[B, T, nq, D] -> [B, T, H] (:func:`project_out`) with the bias and, when attached, the LoRA update."""
        y = project_out(out, self.o_kernel[...])
        delta = self._lora("o", out)
        if delta is not None:
            y = y + delta
        return (y + self.o_bias[...].astype(jnp.float32)).astype(out.dtype)


def visible_slots(cache: LayerCache, kv_len: int | None) -> LayerCache:
    """The first ``kv_len`` slots of a full-attention layer's cache (all of them for None): k, v
    [B, nkv, kv_len, D], pos [B, kv_len]. A full layer holds position p in slot p, so when every query
    position is below ``kv_len`` the slots cut off hold only invisible keys (empty, or positions after
    the queries) and attention over the rest is the same. A static slice of the updated cache: XLA
    reads only those slots (the write before it stays in place in the whole cache). In a program for
    the GPU k and v keep the cache's row-major layout (:func:`_row_major`)."""
    if kv_len is not None and kv_len < 1:
        raise ValueError(f"kv_len must be >= 1, got {kv_len}")
    if kv_len is not None and kv_len < cache.pos.shape[1]:
        cache = LayerCache(cache.k[:, :, :kv_len], cache.v[:, :, :kv_len], cache.pos[:, :kv_len])
    if platform.current() == "gpu":
        cache = cache._replace(k=_row_major(cache.k), v=_row_major(cache.v))
    return cache


def _row_major(x: jax.Array) -> jax.Array:
    """``x`` in the row-major layout the cache has. In a program for the GPU XLA otherwise gives the
    values the layout the exact path's dot prefers (slots minor) and propagates it back through the
    cache write: the whole cache was copied, transposed, updated and transposed back every step (20 MB
    per full layer at context 4,096, 18 GB per step for 120b at 131,072 with a slice). Not on TPU,
    where the same constraint makes XLA copy the cache to reach it (its tiled layouts differ)."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def project_out(out: jax.Array, o_kernel: jax.Array) -> jax.Array:
    """out [B, T, nq, D] times ``o_kernel`` [nq, D, H] -> float32 [B, T, H].

    In a program compiled for the CPU the heads are merged into one contraction axis first (XLA:CPU
    upcasts bf16 dots contracting two); elsewhere both axes are contracted as stored: on TPU the merged
    form makes XLA convert the whole kernel to a float32 copy before reshaping it, every call (5x its
    bytes at batch 1). Same products and sums either way.
    """
    def merged(out, w):
        b, t, nq, d = out.shape
        return matmul(out.reshape(b, t, nq * d), w.reshape(nq * d, -1), "btf,fh->bth")

    return platform.dependent(out, o_kernel, cpu=merged, default=lambda out, w: matmul(out, w, "btnd,ndh->bth"))

"""Layers of the gpt-oss transformer: pure functions (tested directly) and the nnx modules holding
their parameters.

Einsum legend: one letter is one axis, in every einsum of the package (layers, model, sharding, train)::

    b  batch                         h  hidden (embed) size H
    t  query / sequence positions T  s  key / value (cache) positions S
    n  query heads nq                k  key/value heads nkv
    g  query heads per kv head (n = k * g)
    d  head dim D                    f  flattened nq * D (the o projection's input)
    v  vocabulary                    e  experts E
    m  token rows (B * T flattened, or gathered token-expert rows)
    x  top-k expert slot of a token  r  LoRA rank
    c  row blocks (grouped experts)  l  rows in a block
    i  a projection's input          o  a projection's output
    q  a slot of the fused q/k/v projection (g query heads, then k, then v: g + 2)
"""

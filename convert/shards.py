"""Writing official-layout tensor files: JSON files and safetensors shards (with the index)."""
from __future__ import annotations

import itertools
import json
import os
from typing import Iterator

import numpy as np

from gptoss_jax.checkpoint import safetensors_file
from gptoss_jax.checkpoint.official import INDEX

#: The transformers converter's shard limit (published 20b shards are <= 4.8 GB).
MAX_SHARD_BYTES = 4_800_000_000


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_shards(folder: str, entries: list[tuple[str, str, tuple[int, ...]]],
                 values: Iterator[tuple[str, np.ndarray]], *, max_shard_bytes: int | None = None,
                 single_file: str | None = "model.safetensors") -> dict[str, str]:
    """Write tensors as the transformers layout does, streaming one tensor at a time.

    entries: (name, safetensors dtype, shape) in writing order; ``values`` yields (name, array) in that
    order. Tensors fill shards of at most ``max_shard_bytes`` in order (a bigger tensor gets its own).
    One shard is written as ``single_file``; otherwise (or when ``single_file`` is None) as 0-based
    ``model-0000k-of-0000N.safetensors`` (N = last index, the transformers converter's naming) with
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``). Returns the weight map.
    """
    sizes = [int(np.prod(shape, dtype=np.int64)) * safetensors_file.DTYPES[dt].itemsize for _, dt, shape in entries]
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    if len(shards) == 1 and single_file:
        names = [single_file]
    else:
        names = [f"model-{k:05d}-of-{len(shards) - 1:05d}.safetensors" for k in range(len(shards))]
    values = iter(values)
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        specs = [entries[i] for i in shard]
        safetensors_file.write(os.path.join(folder, fname), itertools.islice(values, len(specs)), {"format": "pt"},
                               specs=specs)
        weight_map.update({name: fname for name, _, _ in specs})
    if len(names) > 1 or not single_file:
        write_json(os.path.join(folder, INDEX), {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    return weight_map

"""One process of the two-process test: join the job, build the global mesh, run the forward.

    python -m tests.multihost_worker --ckpt DIR --tokens IN.npy --out OUT.npy --mesh data=2,expert=4 \
        --rules expert --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I

Process 0 writes the full float32 logits to OUT.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import gptoss_jax
from gptoss_jax.sharding import add_mesh_arguments, mesh_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True)
    args = add_mesh_arguments(parser).parse_args(argv)
    mesh = mesh_from_args(args)
    assert jax.process_count() == args.num_processes and mesh.size == jax.device_count() > jax.local_device_count()
    model = gptoss_jax.load(args.ckpt, dtype=jnp.float32, mesh=mesh, rules=args.rules)
    logits = multihost_utils.process_allgather(model.logits(np.load(args.tokens)), tiled=True)
    if jax.process_index() == 0:
        np.save(args.out, np.asarray(logits))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The read side of checkpoints: the name table, safetensors, both official layouts, our Orbax folders.

    from gptoss_jax.checkpoint.loader import load    # = gptoss_jax.load

- :mod:`~gptoss_jax.checkpoint.names`: our parameter paths <-> transformers / original/ names;
- :mod:`~gptoss_jax.checkpoint.shapes`: parameter shapes, from ``nnx.eval_shape`` of the model;
- :mod:`~gptoss_jax.checkpoint.safetensors_file`, :mod:`~gptoss_jax.checkpoint.official`: official folders;
- :mod:`~gptoss_jax.checkpoint.orbax`: folders written by ``gptoss-jax convert`` (the writers live in ``convert/``);
- :mod:`~gptoss_jax.checkpoint.loader`: :func:`load`, the one path from a folder to a model.
"""
from gptoss_jax.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]  # the modules are imported on their own: the error needs no JAX

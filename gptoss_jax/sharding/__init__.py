"""Sharding: meshes (data, expert, model), logical-axis rules and presets, a model placed on a mesh,
and the expert-parallel MoE.

    mesh = mesh_from_spec("data=2,expert=4")
    model = shard_model(model, mesh, "expert")      # or gptoss_jax.load(path, mesh=mesh, rules="expert")
    logits = model.logits(tokens)
"""
from gptoss_jax.sharding.expert_parallel import expert_parallel_forward
from gptoss_jax.sharding.layout import CACHE_AXES, Layout, cache_shardings, shard_model, use_layout
from gptoss_jax.sharding.mesh import (MESH_AXES, add_mesh_arguments, initialize_distributed, mesh_from_args,
                                      mesh_from_spec, parse_mesh_spec)
from gptoss_jax.sharding.rules import (DEFAULT_RULES, PRESETS, bytes_per_device, get_rules, logical_to_spec,
                                       state_shardings, tree_shardings)

__all__ = [
    "CACHE_AXES", "DEFAULT_RULES", "Layout", "MESH_AXES", "PRESETS", "add_mesh_arguments", "bytes_per_device",
    "cache_shardings", "expert_parallel_forward", "get_rules", "initialize_distributed", "logical_to_spec",
    "mesh_from_args", "mesh_from_spec", "parse_mesh_spec", "shard_model", "state_shardings", "tree_shardings",
    "use_layout",
]

"""Sharding: logical axis names on parameters mapped to mesh axes by rules."""
from gptoss_jax.sharding.rules import DEFAULT_RULES, logical_to_spec, state_shardings

__all__ = ["DEFAULT_RULES", "logical_to_spec", "state_shardings"]

"""Official gpt-oss checkpoints <-> gptoss-jax: the name table, readers, writers, conversion."""

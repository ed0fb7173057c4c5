"""Serving gpt-oss: the generate/chat/serve/demo commands and the OpenAI-compatible HTTP server.

They all drive the batched decoding engine (:mod:`gptoss_jax.decode`) and speak harmony through
:mod:`gptoss_jax.harmony`.
"""

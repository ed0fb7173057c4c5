"""Decoding: jitted KV-cache prefill/decode, on-device sampling, continuous batching.

    from gptoss_jax.decode import Engine, SamplingParams
    engine = Engine(model, max_batch=8, context=4096)
    completions = engine.generate([[200006, 17360, 200008]], SamplingParams(temperature=0, max_tokens=32))
"""
from gptoss_jax.decode.engine import FINISH_REASONS, Engine, Request
from gptoss_jax.decode.sampling import STOP_TOKENS, SamplingParams
from gptoss_jax.layers.attention import set_attention

__all__ = ["Engine", "Request", "SamplingParams", "STOP_TOKENS", "FINISH_REASONS", "set_attention"]

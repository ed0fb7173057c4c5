"""The reference for parity tests: transformers' GptOssForCausalLM loaded from the same safetensors
files (MXFP4 experts dequantized on load), and hooks that capture each module's inputs/outputs."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

torch.set_num_threads(2)


def load_reference(path, dtype=torch.float32):
    """transformers' model for an official-layout folder, eval mode, eager attention."""
    from transformers import GptOssForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "MXFP4 needs Triton, dequantizing" notices
    model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


@contextlib.contextmanager
def capture(model, names: list[str]):
    """Record ``{name: (args, kwargs, output)}`` for the named submodules during a forward."""
    records: dict = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        def hook(mod, args, kwargs, out, name=name):
            records[name] = (args, kwargs, out)
        handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def reference_logits(model, tokens, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        m = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        return model(input_ids=t, attention_mask=m).logits.float().numpy()


def to_np(t) -> np.ndarray:
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()

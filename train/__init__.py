"""Fine-tuning gpt-oss: LoRA (frozen MXFP4 base, adapters on attention and on every expert) and full SFT.

``python -m train CONFIG`` (or ``gptoss-jax train CONFIG``) runs :func:`train.trainer.train`;
``python -m train.merge`` folds adapters into the base.
"""

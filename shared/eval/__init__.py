"""Evaluation of personalized generations: CLIP-I, CLIP-T and DINO (DreamBooth's metrics) on DreamBooth's prompts.

`shared.eval.prompts` is torch-free; `metrics`, `tiny` and `run` need torch and transformers (the worker
extra). The gateway never imports this package.
"""

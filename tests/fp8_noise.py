"""The noise floor of comparing two FP8 runs of one model.

A static-scale FP8 model is a discontinuous function of its input: an activation that moves by a
relative δ crosses one of E4M3's rounding boundaries (values 6-12% apart) with probability ~δ/0.1,
and each crossing is an error of a whole step, so the next layer's input moves by ~sqrt(0.1·δ).
Measured on SmolLM2: a 1e-6 relative perturbation of the embeddings moves the FP8 model by mean KL
0.023-0.031 per 511-token window, as far as float32 summation order in another kernel does. Two FP8
paths are compared against that floor: an implementation difference adds to it, order alone does not.
"""
import torch


def perturb_embeddings(llm, relative: float, seed: int = 0) -> None:
    """Multiply every embedding output of `llm` by (1 + relative·N(0, 1)), elementwise."""
    g = torch.Generator().manual_seed(seed)
    llm.engine.host.model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: out * (1 + relative * torch.randn(out.shape, generator=g)))

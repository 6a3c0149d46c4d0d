"""fp8lm: calibrate a Llama-family model, quantize it to FP8 and serve it (INC-flow compatible)."""
from fp8lm.engine.sampling_params import SamplingParams
from fp8lm.entrypoints.llm import LLM
from fp8lm.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]

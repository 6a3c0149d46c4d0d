"""How large the KV cache is: a byte budget or a fraction of free memory, less the peak of the
largest step, measured by a profile forward on a throwaway cache (as vLLM does). Functions of the
model host (what the rank holds), the engine's config and its step budget."""
from __future__ import annotations

import logging
import time

from fp8lm.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from fp8lm.engine.model_host import ModelHost
from fp8lm.engine.step_channel import StepChannel
from fp8lm.engine.memory import PeakMemory, available_memory
from fp8lm.engine.sampling_params import SamplingParams
from fp8lm.engine.sequence import Sequence
from fp8lm.errors import FP8LMError

log = logging.getLogger(__name__)


def kv_budget(config: EngineConfig, host: ModelHost) -> int | float:
    """Bytes, or a fraction of the memory available."""
    budget = config.kv_cache_memory
    if budget is None:
        budget = DEFAULT_CPU_KV_CACHE_BYTES if host.device.type == "cpu" else 0.8
    return budget


def step_peak_bytes(config: EngineConfig, host: ModelHost, step_tokens: int, channel: StepChannel | None) -> int | None:
    """Where the KV cache is a fraction of free memory: the peak memory of the largest step
    (`step_tokens` prompt tokens), measured by running it on a throwaway KV cache before the real
    one is sized from what is left (as vLLM does). Not while measuring: INC observes every token
    the model sees. None where nothing was measured."""
    if config.num_kv_blocks or not isinstance(kv_budget(config, host), float):
        return None
    if host.measurement is not None:
        log.info("no profile forward while measuring: the KV cache is sized without it")
        return None
    n = min(step_tokens, host.max_model_len - 1)
    blocks = -(-n // config.block_size)
    if channel is not None:
        channel.send(("init", blocks))
    runner = host.make_runner(blocks, channel)
    seq = Sequence(-1, "profile", 0, [0] * n, SamplingParams(temperature=0, max_tokens=1), None)
    seq.block_table = list(range(blocks))
    start = time.perf_counter()
    with PeakMemory(host.device) as peak:
        runner.run([seq], [n])
    log.info("profile forward of %d tokens: %.1f MiB above the model at its peak, %.2f s", n,
             peak.bytes / 2**20, time.perf_counter() - start)
    return peak.bytes


def num_kv_blocks(config: EngineConfig, host: ModelHost, step_tokens: int, step_peak: int | None) -> int:
    """How many blocks the KV cache holds (`step_peak`: what `step_peak_bytes` measured)."""
    bs, dtype, attention = config.block_size, host.dtype, host.model.attention_layers()
    bytes_per_block = sum(2 * (bs * a.cache_dtype(dtype).itemsize + a.exact_first_token * dtype.itemsize)
                          * a.num_kv_heads * a.head_dim for a in attention)
    per_seq = -(-host.max_model_len // bs)
    free = available_memory(host.device)
    if config.num_kv_blocks:
        num = config.num_kv_blocks
    else:
        budget = kv_budget(config, host)
        if isinstance(budget, float):
            # What a step needs at its peak stays free (it was measured with the model loaded).
            budget = int(budget * free) - (step_peak or 0)
        # More blocks than max_num_seqs full-length sequences could ever use is waste.
        num = min(budget // bytes_per_block, config.max_num_seqs * per_seq)
    peak = "" if step_peak is None else (
        f" after the {step_peak / 2**20:.0f} MiB a step of max_num_batched_tokens={step_tokens} needs (profiled)")
    if num < per_seq:
        raise FP8LMError(
            f"the KV cache holds {max(num, 0)} blocks of {bs} tokens ({max(num, 0) * bytes_per_block / 2**20:.1f} "
            f"MiB{peak}), fewer than the {per_seq} one sequence of max_model_len={host.max_model_len} needs: "
            f"raise kv_cache_memory / num_kv_blocks or lower max_model_len / max_num_batched_tokens")
    if num * bytes_per_block > free:
        raise FP8LMError(f"a KV cache of {num * bytes_per_block / 2**20:.0f} MiB does not fit in the "
                         f"{free / 2**20:.0f} MiB available: lower kv_cache_memory / num_kv_blocks")
    kv_dtypes = sorted({str(a.cache_dtype(dtype)).replace("torch.", "") for a in attention})
    log.info("KV cache: %d blocks x %d tokens, %s, %.1f MiB", num, bs, "/".join(kv_dtypes),
             num * bytes_per_block / 2**20)
    return num

"""How large the KV cache is: a byte budget or a fraction of free memory, less the peak of the
largest step, measured by a profile forward on a throwaway cache (as vLLM does).

Mixed into LLMEngine (it uses the engine's config, model, device, dtype, step budget, channel and
`make_runner`); kept apart because sizing is a concern of its own.
"""
from __future__ import annotations

import logging
import time

from fp8lm.engine.config import DEFAULT_CPU_KV_CACHE_BYTES
from fp8lm.engine.memory import PeakMemory, available_memory
from fp8lm.engine.sampling_params import SamplingParams
from fp8lm.engine.sequence import Sequence
from fp8lm.errors import FP8LMError

log = logging.getLogger(__name__)


class KVCacheSizing:
    def _kv_budget(self) -> int | float:
        """Bytes, or a fraction of the memory available."""
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = DEFAULT_CPU_KV_CACHE_BYTES if self.device.type == "cpu" else 0.8
        return budget

    def _kv_from_free_memory(self) -> bool:
        return not self.config.num_kv_blocks and isinstance(self._kv_budget(), float)

    def _profile_step(self) -> int | None:
        """The peak memory of the largest step (max_num_batched_tokens prompt tokens), measured by
        running it on a throwaway KV cache before the real one is sized from what is left (as vLLM
        does). Not while measuring: INC observes every token the model sees."""
        if self.measurement is not None:
            log.info("no profile forward while measuring: the KV cache is sized without it")
            return None
        n = min(self.max_num_batched_tokens, self.max_model_len - 1)
        blocks = -(-n // self.config.block_size)
        if self.channel is not None:
            self.channel.send(("init", blocks))
        runner = self.make_runner(blocks, self.channel)
        seq = Sequence(-1, "profile", 0, [0] * n, SamplingParams(temperature=0, max_tokens=1), None)
        seq.block_table = list(range(blocks))
        start = time.perf_counter()
        with PeakMemory(self.device) as peak:
            runner.run([seq], [n])
        log.info("profile forward of %d tokens: %.1f MiB above the model at its peak, %.2f s", n,
                 peak.bytes / 2**20, time.perf_counter() - start)
        return peak.bytes

    def _num_kv_blocks(self) -> int:
        bs = self.config.block_size
        bytes_per_block = sum(2 * (bs * a.cache_dtype(self.dtype).itemsize + a.exact_first_token * self.dtype.itemsize)
                              * a.num_kv_heads * a.head_dim for a in self.model.attention_layers())
        per_seq = -(-self.max_model_len // bs)
        free = available_memory(self.device)
        if self.config.num_kv_blocks:
            num = self.config.num_kv_blocks
        else:
            budget = self._kv_budget()
            if isinstance(budget, float):
                # What a step needs at its peak stays free (it was measured with the model loaded).
                budget = int(budget * free) - (self.step_peak_bytes or 0)
            # More blocks than max_num_seqs full-length sequences could ever use is waste.
            num = min(budget // bytes_per_block, self.config.max_num_seqs * per_seq)
        peak = "" if self.step_peak_bytes is None else (
            f" after the {self.step_peak_bytes / 2**20:.0f} MiB a step of max_num_batched_tokens="
            f"{self.max_num_batched_tokens} needs (profiled)")
        if num < per_seq:
            raise FP8LMError(
                f"the KV cache holds {max(num, 0)} blocks of {bs} tokens ({max(num, 0) * bytes_per_block / 2**20:.1f} "
                f"MiB{peak}), fewer than the {per_seq} one sequence of max_model_len={self.max_model_len} needs: "
                f"raise kv_cache_memory / num_kv_blocks or lower max_model_len / max_num_batched_tokens")
        if num * bytes_per_block > free:
            raise FP8LMError(f"a KV cache of {num * bytes_per_block / 2**20:.0f} MiB does not fit in the "
                             f"{free / 2**20:.0f} MiB available: lower kv_cache_memory / num_kv_blocks")
        kv_dtypes = sorted({str(a.cache_dtype(self.dtype)).replace("torch.", "") for a in self.model.attention_layers()})
        log.info("KV cache: %d blocks x %d tokens, %s, %.1f MiB", num, bs, "/".join(kv_dtypes),
                 num * bytes_per_block / 2**20)
        return num

"""The profile step that sizes the KV cache: peak-memory measurement against known allocations,
and the cache sized from free memory minus what the largest step takes."""
import subprocess
import sys

import pytest
import torch

from fp8lm import LLM
from fp8lm.engine import kv_sizing
from fp8lm.engine.memory import PeakMemory
from fp8lm.errors import FP8LMError

MiB = 2**20


def touch(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32)      # written, so resident


def test_peak_memory_sees_a_freed_allocation_and_forgets_earlier_peaks():
    big = touch(256 * MiB)
    del big                                                  # the process's peak is now >= 256 MiB
    with PeakMemory(torch.device("cpu")) as peak:
        x = touch(48 * MiB)
        del x
    # Pages the allocator gives back meanwhile lower the figure slightly; the old 256 MiB peak is gone.
    assert 44 * MiB <= peak.bytes < 64 * MiB


def test_kv_cache_sized_from_free_memory_leaves_the_profiled_step_room(tiny_model, monkeypatch):
    free = 64 * MiB
    monkeypatch.setattr(kv_sizing, "available_memory", lambda device: free)
    llm = LLM(str(tiny_model), max_model_len=256, max_num_batched_tokens=1024, kv_cache_memory=0.5,
              max_num_seqs=1000, skip_warmup=True)
    e = llm.engine
    per_block = sum(2 * 16 * a.num_kv_heads * a.head_dim * 4 for a in e.host.model.attention_layers())
    # the step's activations, at least: q/k/v/o and the MLP's three projections of 255 tokens (float32)
    assert e.step_peak_bytes >= 255 * (4 * 64 + 3 * 128) * 4
    assert e.num_kv_blocks == (free // 2 - e.step_peak_bytes) // per_block
    with pytest.raises(FP8LMError, match="profiled"):
        LLM(str(tiny_model), max_model_len=256, kv_cache_memory=0.001, skip_warmup=True)   # 64 KiB < a step


def test_fixed_kv_budgets_are_not_profiled(tiny_model):
    llm = LLM(str(tiny_model), max_model_len=256, kv_cache_memory="4MiB", skip_warmup=True)
    assert llm.engine.step_peak_bytes is None


GROWING_TENSORS = """
import resource, sys, torch
from fp8lm.engine.memory import keep_freed_memory_for_reuse
if sys.argv[1] == "keep":
    assert keep_freed_memory_for_reuse()
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(1, 16):               # a step's tensors: each size new, each freed before the next
    torch.ones(mib << 18)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Without fixed thresholds glibc maps each new larger block afresh: every byte of 15 growing
    tensors (120 MiB) faulted in; with them the heap's freed memory serves the next one (about
    twice the largest tensor)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", GROWING_TENSORS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    default, kept = faults("default"), faults("keep")
    pages = (15 << 20) // 4096
    assert default > 5 * pages and kept < 3 * pages, (default, kept)

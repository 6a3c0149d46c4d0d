"""BlockManager, the prefix cache and the Scheduler on their own: no model, no engine. Each
expectation is counted by hand from the block size and the token budget."""
import pytest

from fp8lm.engine.block_manager import BlockManager
from fp8lm.engine.prefix_cache import PrefixCache, block_key
from fp8lm.engine.sampling_params import SamplingParams
from fp8lm.engine.scheduler import Scheduler
from fp8lm.engine.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def seq(seq_id: int, tokens, params: SamplingParams = GREEDY) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), params, None)


def computed(manager: BlockManager, s: Sequence, n: int) -> None:
    """What the engine does after a step that computed `n` more of the sequence's tokens."""
    s.num_computed_tokens += n
    manager.mark_computed(s, s.num_computed_tokens - n)


# ---- BlockManager ---------------------------------------------------------------------------

def test_allocation_takes_ceil_tokens_over_block_size_and_free_returns_them():
    m = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(0, range(9)), seq(1, range(4))
    m.allocate(a)
    m.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1           # 9 tokens: 3 blocks; 4: 1
    assert set(a.block_table).isdisjoint(b.block_table)
    assert m.num_free_blocks == 4 and m.num_used_blocks == 4
    m.free(a)
    assert m.num_free_blocks == 7 and a.block_table == [] and a.num_computed_tokens == 0
    with pytest.raises(RuntimeError, match="already holds blocks"):
        m.allocate(b)


def test_can_allocate_and_can_append_count_free_blocks():
    m = BlockManager(num_blocks=3, block_size=4)
    big = seq(0, range(13))                                     # 4 blocks > 3
    assert not m.can_allocate(big)
    s = seq(1, range(8))
    m.allocate(s)                                               # 2 blocks, 1 left
    assert m.can_append(s, 12) and not m.can_append(s, 13)      # 12 tokens fit 3 blocks, 13 need 4
    m.may_append(s, 12)
    assert len(s.block_table) == 3 and m.num_free_blocks == 0


def test_shared_prefix_reuses_full_blocks_only_and_leaves_the_last_token_to_compute():
    m = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = seq(0, range(10))                                   # blocks [0-3] [4-7] [8-9]
    m.allocate(first)
    computed(m, first, 10)
    second = seq(1, list(range(8)) + [99, 98, 97])              # shares the two full blocks
    m.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert m.refs[first.block_table[0]] == 2
    exact = seq(2, range(8))                                    # all 8 tokens cached: the last block is recomputed
    m.allocate(exact)
    assert exact.num_cached_tokens == 4 and exact.block_table[0] == first.block_table[0]
    assert m.cache.queries == 10 + 11 + 8 and m.cache.hits == 0 + 8 + 4          # in tokens


def test_prompt_logprobs_and_uncached_allocations_skip_the_cache():
    m = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = seq(0, range(9))
    m.allocate(first)
    computed(m, first, 9)
    wants_logits = seq(1, range(9), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    m.allocate(wants_logits)
    assert wants_logits.num_cached_tokens == 0 and set(wants_logits.block_table).isdisjoint(first.block_table)
    plain = seq(2, range(9))
    m.allocate(plain, cached=False)
    assert plain.num_cached_tokens == 0


def test_unused_cached_blocks_stay_findable_until_evicted_least_recently_used_first():
    m = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = seq(0, [1, 2, 9]), seq(1, [3, 4, 9])             # each: a full cached block + a partial one
    for s in (old, new):
        m.allocate(s)
        computed(m, s, 3)
    old_block, new_block = old.block_table[0], new.block_table[0]
    m.free(old)
    m.free(new)                                                 # released after `old`: more recently used
    assert m.num_free_blocks == 4 and m.cache.num_evictable == 2       # cached, not in the plain free list
    fresh = seq(2, range(100, 104))
    m.allocate(fresh)                                           # the two never-cached blocks come first
    assert set(fresh.block_table).isdisjoint({old_block, new_block})
    assert not m.can_allocate(seq(3, range(200, 206)))          # 3 blocks: only the 2 evictable are left
    one = seq(4, [50, 51])
    m.allocate(one)
    assert one.block_table == [old_block]                       # the least recently used is evicted
    assert m.cache.lookup(block_key(None, [1, 2])) is None
    again = seq(5, [3, 4, 7])
    m.free(fresh)
    m.allocate(again)
    assert again.block_table[0] == new_block and again.num_cached_tokens == 2   # found after its user left


def test_block_keys_chain_their_prefix():
    assert block_key(None, [1, 2]) != block_key(block_key(None, [0, 0]), [1, 2])
    assert block_key(None, [1, 2]) == block_key(None, [1, 2])
    cache = PrefixCache()
    cache.register(b"k", 3)
    cache.register(b"k", 5)                                              # the first holder keeps the key
    assert cache.lookup(b"k") == 3 and not cache.is_cached(5)


# ---- Scheduler -------------------------------------------------------------------------------

def scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, chunked=True, preempted=None,
              prompt_tokens_while_decoding=None):
    m = BlockManager(num_blocks, block_size)
    return m, Scheduler(m, max_num_seqs, budget, chunked, None if preempted is None else preempted.append,
                        prompt_tokens_while_decoding)


def step(m: BlockManager, sched: Scheduler, decode_token: int = 7):
    """One step as the engine runs it: every scheduled sequence computes its tokens; those done with
    their prompt (or decoding) get one new token."""
    seqs, lens = sched.schedule()
    for s, q in zip(seqs, lens):
        computed(m, s, q)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(decode_token)
    return [(s.seq_id, q) for s, q in zip(seqs, lens)]


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget_and_decodes_go_first():
    m, sched = scheduler(budget=16)
    short, long = seq(0, range(5)), seq(1, range(40))
    sched.add(short)
    sched.add(long)
    assert step(m, sched) == [(0, 5), (1, 11)]                  # the long prompt gets what is left
    assert step(m, sched) == [(0, 1), (1, 15)]                  # decode first, then the next chunk
    assert step(m, sched) == [(0, 1), (1, 14)]                  # 40 = 11 + 15 + 14
    assert step(m, sched) == [(0, 1), (1, 1)]


def test_prompt_chunks_take_at_most_their_share_while_sequences_decode():
    """Budget 16, 4 prompt tokens while decoding: alone, a prompt takes the budget; once one
    sequence decodes, the other prompt advances 4 tokens per step (the decode's ITL stays one small step)."""
    m, sched = scheduler(budget=16, prompt_tokens_while_decoding=4)
    short, long = seq(0, range(5)), seq(1, range(40))
    sched.add(short)
    sched.add(long)
    assert step(m, sched) == [(0, 5), (1, 11)]                  # nobody decodes yet: the whole budget
    assert step(m, sched) == [(0, 1), (1, 4)]                   # 0 decodes: the prompt gets its share
    assert step(m, sched) == [(0, 1), (1, 4)]
    late = seq(2, range(9))
    sched.add(late)
    assert step(m, sched) == [(0, 1), (1, 4)]                   # the share is spent: the newcomer waits


def test_without_chunking_a_prompt_runs_whole_or_waits():
    m, sched = scheduler(budget=16, chunked=False)
    sched.add(seq(0, range(10)))
    sched.add(seq(1, range(10)))
    assert step(m, sched) == [(0, 10)]                           # 10 + 10 > 16: the second waits
    assert step(m, sched) == [(0, 1), (1, 10)]


def test_admission_stops_at_max_num_seqs():
    m, sched = scheduler(max_num_seqs=2, budget=100)
    for i in range(3):
        sched.add(seq(i, range(4)))
    assert [i for i, _ in step(m, sched)] == [0, 1]
    assert len(sched.waiting) == 1 and sched.waiting[0].status is SequenceStatus.WAITING


def test_a_full_pool_preempts_the_newest_running_sequence_which_is_recomputed_later():
    preempted = []
    m, sched = scheduler(num_blocks=4, block_size=4, budget=64, preempted=preempted)
    a, b, c = seq(0, range(8)), seq(1, range(2)), seq(2, range(2))    # 2 + 1 + 1 blocks: the pool is full
    for s in (a, b, c):
        sched.add(s)
    assert step(m, sched) == [(0, 8), (1, 2), (2, 2)]
    assert step(m, sched) == [(0, 1), (1, 1)]                   # a's 9th token needs a 3rd block: c gives way
    assert preempted == [c] and c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0 and sched.num_preemptions == 1
    sched.finish(a)
    a.finish("stop")
    assert step(m, sched) == [(1, 1), (2, 3)]                   # c's prompt and its output, recomputed


def test_finish_releases_blocks_of_running_and_waiting_sequences():
    m, sched = scheduler(max_num_seqs=1)
    running, waiting = seq(0, range(4)), seq(1, range(4))
    sched.add(running)
    sched.add(waiting)
    step(m, sched)
    sched.finish(running)
    sched.finish(waiting)
    assert not sched.has_unfinished() and m.num_free_blocks == m.num_blocks


def test_the_cpu_server_caps_prompt_tokens_while_decoding_and_offline_does_not():
    """`fp8lm serve` on the CPU defaults to 256 prompt tokens per decoding step (measured: P99 ITL
    2.6 s -> 0.5 s at 16 streams); a value the user gave is kept; offline keeps the whole budget."""
    from fp8lm.engine.config import EngineConfig
    from fp8lm.entrypoints.openai.launch import CPU_SERVE_PROMPT_TOKENS_WHILE_DECODING, apply_serve_defaults

    served, chosen, offline = (EngineConfig(model="m", device="cpu"),
                               EngineConfig(model="m", device="cpu", prompt_tokens_while_decoding=1024),
                               EngineConfig(model="m", device="cpu"))
    apply_serve_defaults(served)
    apply_serve_defaults(chosen)
    assert served.prompt_tokens_while_decoding == CPU_SERVE_PROMPT_TOKENS_WHILE_DECODING == 256
    assert chosen.prompt_tokens_while_decoding == 1024 and offline.prompt_tokens_while_decoding is None
    assert served.iteration_timeout_s == 60.0

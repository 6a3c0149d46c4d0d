"""The engine: requests in, batched model steps, sampled tokens out."""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import time
from pathlib import Path

import torch

from fp8lm.engine.block_manager import BlockManager
from fp8lm.engine.config import EngineConfig, resolve_device
from fp8lm.engine.cuda_graphs import graph_buckets
from fp8lm.engine.kv_sizing import num_kv_blocks, step_peak_bytes
from fp8lm.engine.model_host import ModelHost, run_worker
from fp8lm.engine.parallel import (DistInfo, LocalRendezvous, backend_for, check_divisible, init_group,
                                   spawn_local_workers, torchrun_info)
from fp8lm.engine.output_processor import OutputProcessor
from fp8lm.engine.outputs import RequestOutput
from fp8lm.engine.step_channel import StepChannel
from fp8lm.engine.sampler import Sampler
from fp8lm.engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from fp8lm.engine.scheduler import Scheduler
from fp8lm.engine.sequence import Request, Sequence
from fp8lm.engine.step_worker import StepWorker
from fp8lm.engine.structured_outputs import GrammarBackend
from fp8lm.errors import EngineDeadError, FP8LMError
from fp8lm.model.config import ModelConfig
from fp8lm.model.registry import resolve_model
from fp8lm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
WARMUP_PREFILL_TOKENS = (128, 256, 512)   # prompt-length buckets warmed (up to the step budget)


class LLMEngine:
    """Rank 0's engine: its model host (the model, measured or quantized), the KV cache sized for it,
    the scheduler, sampler and output processor, and the other ranks' workers."""

    def __init__(self, config: EngineConfig, step_thread: bool = True):
        """`step_thread`: with an iteration timeout, run steps on a thread of their own so that a hung
        step can be abandoned; the server passes False and times steps from outside (AsyncEngine)."""
        self.config = config
        self.workers: list = []
        self._threads_before_tp = torch.get_num_threads()   # the gloo ranks share the cores; restored at shutdown
        self.host = ModelHost(config, self._join_tensor_parallel_group(config))
        self.max_model_len = self.host.max_model_len
        self.max_num_batched_tokens = config.step_token_budget(self.max_model_len)
        self.tokenizer = Tokenizer.from_folder(self.host.model_path)
        self.channel = StepChannel() if self.host.world_size > 1 else None
        self.step_peak_bytes = step_peak_bytes(config, self.host, self.max_num_batched_tokens, self.channel)
        self.num_kv_blocks = num_kv_blocks(config, self.host, self.max_num_batched_tokens, self.step_peak_bytes)
        if self.channel is not None:
            self.channel.send(("init", self.num_kv_blocks))
        self.runner = self.host.make_runner(self.num_kv_blocks, self.channel,
                                            graph_buckets(config.max_num_seqs) if self._wants_decode_graphs() else None)
        if self.runner.graphs is not None and self.host.device.type == "cuda":
            self.runner.graphs.capture()
        # MEASURE observes every prompt token, as INC does: no prefix cache while calibrating.
        caching = config.enable_prefix_caching and self.host.measurement is None
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, caching)
        eos = set(self.host.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = tuple(sorted(eos))
        self.sampler = Sampler(self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   config.enable_chunked_prefill, self.output_processor.discard_prompt_logits,
                                   config.prompt_tokens_while_decoding)
        self._grammar_backend = None if self.tokenizer is None else GrammarBackend(
            self.tokenizer.hf, self.host.model_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)
        # Steps run on the caller's thread unless they must be timed out here: OpenMP (torch's thread
        # pool and fp8lm's kernels) throttles its spin-waiting once two threads own thread teams on a
        # machine with few cores, which costs ~40 us per parallel op here (see docs/BENCHMARKS.md).
        self._worker = StepWorker() if config.iteration_timeout_s and step_thread else None
        self.dead: EngineDeadError | None = None       # why the engine stopped, once it has
        self.last_step_started: float | None = None
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        if config.skip_warmup or self.host.measurement is not None:
            log.info("warm-up skipped (%s)", "measuring" if self.host.measurement else "FP8LM_SKIP_WARMUP")
        else:
            self.warmup()

    def discard_measurement(self) -> None:
        """Stops measuring without writing anything (an interrupted calibration)."""
        if self.host.measurement is not None and self.channel is not None:
            self.channel.send(("discard",))
        self.host.discard_measurement()

    def finalize_calibration(self) -> list[Path]:
        """Writes the measurement files (MEASURE mode; one per rank) and stops measuring."""
        if self.host.measurement is None:
            raise FP8LMError("finalize_calibration() needs quantization='inc' with a MEASURE QUANT_CONFIG")
        if self.channel is not None:
            self.channel.send(("finalize",))
        return self.host.write_measurement()

    # ---- tensor parallelism -------------------------------------------------------------------
    def _join_tensor_parallel_group(self, config: EngineConfig) -> DistInfo | None:
        world = config.tensor_parallel_size
        launched = torchrun_info()
        if world == 1 and launched is None:
            return None
        if launched is not None:
            if launched.world_size != world:
                raise FP8LMError(f"--tensor-parallel-size {world} but the launcher started {launched.world_size} "
                                 "processes (WORLD_SIZE)")
            init_group(backend_for(resolve_device(config.device)), 0, world, "env://")
            atexit.register(self.shutdown)
            return launched
        check_divisible(ModelConfig.from_folder(resolve_model(config.model)), world)
        rendezvous = LocalRendezvous(world)
        self.workers = spawn_local_workers(run_worker, config, world, rendezvous.port)
        rendezvous.join(backend_for(resolve_device(config.device)), self.workers)
        atexit.register(self.shutdown)
        return DistInfo(0, world, 0)

    # ---- set-up -----------------------------------------------------------------------------
    def _wants_decode_graphs(self) -> bool:
        """CUDA graphs for decode steps: on CUDA unless enforce_eager, on one rank (the ranks' steps
        hold collectives), and not while measuring (a replayed graph runs no observer)."""
        return (self.host.device.type == "cuda" and not self.config.enforce_eager and self.host.world_size == 1
                and self.host.measurement is None)

    def warmup_buckets(self) -> list[tuple[int, int]]:
        """(sequences, tokens each) of every warm-up step: one prompt per length bucket up to the
        step budget, then decode batches of 1, 2, 4, ... sequences up to max_num_seqs."""
        longest = min(self.max_model_len - 1, self.max_num_batched_tokens)
        prefills = sorted({min(n, longest) for n in WARMUP_PREFILL_TOKENS})
        most = min(self.config.max_num_seqs, self.block_manager.num_free_blocks)
        decodes = sorted({min(2**i, most) for i in range(most.bit_length() + 1)})
        return [(1, n) for n in prefills] + [(b, 1) for b in decodes]

    def warmup(self) -> None:
        """Runs each bucket's step once and logs its time. fp8lm compiles nothing per shape (the CPU
        kernels are built once per machine, for every shape); what a first step of a size pays for
        is oneDNN creating its primitives for float32 layers and the first touches of its buffers."""
        start = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=1)
        timings = []
        for batch, tokens in self.warmup_buckets():
            seqs = [Sequence(-1 - i, "warmup", 0, [0] * tokens, params, None) for i in range(batch)]
            for seq in seqs:
                self.block_manager.allocate(seq, cached=False)
            step = time.perf_counter()
            self.runner.run(seqs, [tokens] * batch)
            timings.append(f"{'prefill' if tokens > 1 else 'decode'} {batch}x{tokens} {time.perf_counter() - step:.3f} s")
            for seq in seqs:
                self.block_manager.free(seq)
        log.info("warm-up in %.2f s (FP8LM_SKIP_WARMUP skips it): %s", time.perf_counter() - start, ", ".join(timings))

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None, add_special_tokens: bool = True, grammar=None) -> Request:
        """prompt: text to tokenize, or token ids (then `prompt_text` is what outputs show as the prompt).
        A rendered chat template already holds its special tokens: add_special_tokens=False.
        `grammar`: the structured output constraint compiled already (`compile_grammar`, off this
        thread); else it is compiled here."""
        self._check_alive()
        if request_id in self.requests:
            raise FP8LMError(f"request id {request_id!r} is already in use")
        text, token_ids = (prompt, self.tokenize(prompt, add_special_tokens)) if isinstance(prompt, str) else \
            (prompt_text, [int(t) for t in prompt])
        self._validate_prompt(token_ids, params)
        seqs = [Sequence(next(self._seq_ids), request_id, i, token_ids, params, self._generator(params, i))
                for i in range(params.n)]
        if params.structured_outputs is not None and grammar is None:
            grammar = self.compile_grammar(params.structured_outputs)
        matchers = [None] * len(seqs) if grammar is None else GrammarBackend.matchers(grammar, params.n)
        for seq, matcher in zip(seqs, matchers):
            self.output_processor.start(seq, matcher)
        request = Request(request_id, text, token_ids, params, seqs, arrival_time=time.monotonic())
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        if self.host.measurement is not None:
            self.host.measurement.num_samples += 1
        return request

    def compile_grammar(self, constraint: StructuredOutputsParams):
        """A request's output constraint, compiled (thread safe: the server calls it off the engine thread)."""
        if self._grammar_backend is None:
            raise SamplingParamsError("structured_outputs", "this model has no tokenizer to constrain")
        return self._grammar_backend.compile(constraint)

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """A text prompt's token ids (thread safe: the server tokenizes off the engine thread). A text
        too long for max_model_len tokens whatever its tokens is refused before it is tokenized."""
        if self.tokenizer is None:
            raise FP8LMError("this model has no tokenizer; pass token ids")
        if len(prompt) > self.max_model_len and len(prompt) > self.max_model_len * self.tokenizer.max_token_chars:
            raise SamplingParamsError("prompt", f"{len(prompt)} characters cannot fit in max_model_len="
                                                f"{self.max_model_len} tokens")
        try:
            return self.tokenizer.encode(prompt, add_special_tokens)
        except (UnicodeError, ValueError, TypeError) as e:
            raise SamplingParamsError("prompt", f"cannot be tokenized ({type(e).__name__})") from None

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise SamplingParamsError("prompt", "is empty")
        vocab = self.host.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise SamplingParamsError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise SamplingParamsError(
                "prompt", f"has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, which must leave "
                          f"room for at least one generated token")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise SamplingParamsError(
                "max_tokens", f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                              f"max_model_len={self.max_model_len}")
        if params.n > self.config.max_num_seqs:
            raise SamplingParamsError("n", f"{params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise SamplingParamsError(name, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        if params.seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=self._rng))
        else:
            seed = (params.seed + index * 0x9E3779B97F4A7C15) % 2**63
        return torch.Generator().manual_seed(seed)

    def abort_request(self, request_id: str) -> None:
        request = self._forget(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)

    def _forget(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.output_processor.release(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        """Requests with a sequence in the running batch (vLLM counts requests, not sequences)."""
        return len(_request_ids(self.scheduler.running))

    @property
    def num_waiting(self) -> int:
        """Unfinished requests none of whose sequences is running."""
        return len(_request_ids(self.scheduler.waiting) - _request_ids(self.scheduler.running))

    def metric_totals(self) -> dict[str, int]:
        cache = self.block_manager.cache
        return {"prompt_tokens": self.stats["prompt_tokens"], "generation_tokens": self.stats["generation_tokens"],
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_queries": cache.queries if cache else 0, "prefix_cache_hits": cache.hits if cache else 0}

    # ---- stepping ---------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead

    def step(self) -> list[RequestOutput]:
        """One model step; returns the current output of every request it advanced."""
        self._check_alive()
        seqs, query_lens = self.scheduler.schedule()
        if not seqs:
            return []
        want_prompt = {s.seq_id for s in seqs if s.index == 0 and s.params.prompt_logprobs is not None
                       and s.num_computed_tokens < s.num_prompt_tokens
                       and self.requests[s.request_id].prompt_logprobs is None}
        now = time.monotonic()
        for s in seqs:
            request = self.requests.get(s.request_id)
            if request is not None and request.first_scheduled_time is None:
                request.first_scheduled_time = now
        out = self._run(seqs, query_lens, want_prompt)
        try:
            return self._postprocess(seqs, query_lens, out)
        except EngineDeadError:
            raise
        except Exception as e:  # a bug here would otherwise leave requests waiting forever
            log.exception("sampling failed")
            self._die(f"sampling or output processing failed: {type(e).__name__}: {e}", "sampling failed")

    def _postprocess(self, seqs: list[Sequence], query_lens: list[int], out) -> list[RequestOutput]:
        """Advances every sequence by its new tokens; those whose tokens are all computed now (a
        decode, or the last chunk of a prompt) sample their next token."""
        sampling = []
        for row, (seq, q) in enumerate(zip(seqs, query_lens)):
            self.stats["prompt_tokens"] += max(0, min(seq.num_computed_tokens + q, seq.num_prompt_tokens)
                                               - seq.num_computed_tokens)
            seq.num_computed_tokens += q
            self.block_manager.mark_computed(seq, seq.num_computed_tokens - q)
            if seq.seq_id in out.prompt_hidden:
                for first, logits in self.runner.prompt_logit_blocks(out.prompt_hidden[seq.seq_id]):
                    self.output_processor.add_prompt_logprobs(seq, logits, seq.num_computed_tokens - q + first)
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(row)
        sampled = [seqs[i] for i in sampling]
        tokens = self.sampler(out.logits[sampling], sampled, self.output_processor.grammars(sampled))
        touched: dict[str, Request] = {}
        for row, token in zip(sampling, tokens):
            seq = seqs[row]
            request = self.requests[seq.request_id]
            if seq.index == 0 and seq.params.prompt_logprobs is not None and request.prompt_logprobs is None:
                request.prompt_logprobs = self.output_processor.prompt_logprobs(seq)
            if self.output_processor.append_token(seq, token, out.logits[row]):
                self.scheduler.finish(seq)
            touched[request.request_id] = request
        self.stats["generation_tokens"] += len(sampling)
        if self.host.measurement is not None:
            self.host.measurement.num_tokens += sum(query_lens)
        results = [self.output_processor.request_output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                self._forget(r.request_id)
        return [r for r in results if r is not None]

    def _run(self, seqs: list[Sequence], query_lens: list[int], want_prompt: set[int]):
        timeout = self.config.iteration_timeout_s or None
        self.last_step_started = time.monotonic()
        try:
            if self._worker is None:
                return self.runner.run(seqs, query_lens, want_prompt)
            return self._worker.call(self.runner.run, seqs, query_lens, want_prompt, timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._die(f"a model step exceeded FP8LM_ENGINE_ITERATION_TIMEOUT_S={timeout:g} s; the engine is "
                      f"stopped (raise the timeout for slow first steps)")
        except Exception as e:
            self._die(f"a model step failed: {type(e).__name__}: {e}", "a model step failed")
        finally:
            self.last_step_started = None

    def _die(self, reason: str, public: str | None = None):
        self.dead = EngineDeadError(reason, public)
        for request in list(self.requests.values()):
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish("abort")
        log.error(reason)
        raise self.dead

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n - 1, vocab] predicting tokens 1..n-1 of one sequence (perplexity, KL, reports).
        Runs one prefill outside the scheduler, so it needs an idle engine."""
        self._check_alive()
        if self.scheduler.has_unfinished():
            raise FP8LMError("score() needs an idle engine (requests are in flight)")
        if not 2 <= len(token_ids) <= self.max_model_len:
            raise FP8LMError(f"score(): {len(token_ids)} tokens; need 2..max_model_len={self.max_model_len}")
        seq = Sequence(-1, "score", 0, list(token_ids), SamplingParams(temperature=0, max_tokens=1), None)
        if not self.block_manager.can_allocate(seq, cached=False):
            raise FP8LMError("score(): the KV cache cannot hold the sequence")
        self.block_manager.allocate(seq, cached=False)      # every position's logits are wanted
        try:
            out = self.runner.run([seq], [seq.num_tokens], {seq.seq_id})
        finally:
            self.block_manager.free(seq)
        hidden = out.prompt_hidden[seq.seq_id]
        return next(self.runner.prompt_logit_blocks(hidden, rows=hidden.shape[0]))[1][:-1]     # all of them, as asked

    def shutdown(self) -> None:
        """Stops the step thread and, with tensor parallelism, every other rank."""
        if getattr(self, "_worker", None) is not None:       # None too when __init__ failed before it
            self._worker.stop()
        everyone_alive = all(p.is_alive() for p in self.workers)
        if getattr(self, "channel", None) is not None and self.dead is None and everyone_alive:
            try:
                self.channel.send(("shutdown",))
            except Exception:  # a rank already gone: the others are stopped below
                pass
        for proc in self.workers:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.workers = []
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception as e:  # a broken group (a rank died) cannot always be torn down cleanly
                log.warning("process group teardown: %s", e)
            torch.set_num_threads(self._threads_before_tp)
        self.channel = None


def _request_ids(seqs) -> set[str]:
    # tuple() copies in one step under the GIL: the server's metrics thread reads queues the engine
    # thread is changing, and iterating a deque that changes meanwhile raises.
    return {s.request_id for s in tuple(seqs)}

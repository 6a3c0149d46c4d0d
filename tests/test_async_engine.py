"""The engine thread and its asyncio side: a client slower than the engine holds one pending output."""
import asyncio
import threading

import pytest

from fp8lm import LLM, SamplingParams
from fp8lm.engine.sampling_params import RequestOutputKind
from fp8lm.engine.config import EngineConfig
from fp8lm.engine.llm_engine import LLMEngine
from fp8lm.entrypoints.openai.async_engine import AsyncEngine


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_a_slow_reader_gets_one_pending_output_not_a_backlog(tiny_model, kind):
    """Cumulative outputs supersede an unread one; deltas join it. Either way the reader's second
    read is the whole rest of the request, equal to what LLM.generate makes of it."""
    first_read = threading.Event()

    class EngineWaitingForTheFirstRead(LLMEngine):
        """Its second step waits until the reader has its first output, so that output holds
        exactly one token however late the reader's loop wakes; later steps run unread."""
        steps = 0

        def step(self):
            if self.steps == 1:
                first_read.wait(30)
            self.steps += 1
            return super().step()

    engine = AsyncEngine(lambda: EngineWaitingForTheFirstRead(
        EngineConfig(model=str(tiny_model), max_model_len=128, skip_warmup=True), step_thread=False), 60.0)
    engine.start()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1, output_kind=kind)

    async def run():
        while not engine.ready:
            await asyncio.sleep(0.05)
        gen = engine.generate("slow", "Hello", params)
        first = await gen.__anext__()
        first_tokens = list(first.outputs[0].token_ids)
        first_read.set()
        while engine.engine.has_unfinished_requests():      # the engine runs on while nobody reads
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)                              # its last outputs reach the loop
        second = await gen.__anext__()
        with pytest.raises(StopAsyncIteration):                # nothing queued behind it
            await gen.__anext__()
        return first, first_tokens, second

    try:
        first, first_tokens, second = asyncio.run(run())
    finally:
        engine.stop()
    expected = LLM(str(tiny_model), max_model_len=128, skip_warmup=True).generate(
        ["Hello"], params, use_tqdm=False)[0].outputs[0]
    assert len(first_tokens) == 1 and second.finished
    if kind is RequestOutputKind.DELTA:
        assert len(second.outputs[0].token_ids) == 39                 # every step in between joined
        first.add(second)
        second = first
    assert second.outputs[0].token_ids == expected.token_ids
    assert second.outputs[0].text == expected.text
    assert second.outputs[0].logprobs == expected.logprobs


def test_a_stream_closed_while_its_outputs_wait_releases_every_request():
    """merge() bounds its queue, so a pump can be blocked putting an output when the client goes:
    closing the stream must still end the pumps and close (abort) every request's generator."""
    from types import SimpleNamespace

    from fp8lm.entrypoints.openai.serving import merge

    closed = []

    async def outputs(name):
        try:
            while True:
                await asyncio.sleep(0)
                yield SimpleNamespace(finished=False)
        finally:
            closed.append(name)

    async def run():
        gens = [outputs("a"), outputs("b")]
        started = [(g, await g.__anext__()) for g in gens]
        stream = merge(started)
        await stream.__anext__()
        await asyncio.sleep(0.05)                        # the pumps fill the queue and block on it
        await asyncio.wait_for(stream.aclose(), timeout=5)

    asyncio.run(run())
    assert sorted(closed) == ["a", "b"]

"""The engine thread and its asyncio side: a client slower than the engine holds one pending output."""
import asyncio

from fp8lm import SamplingParams
from fp8lm.engine.config import EngineConfig
from fp8lm.engine.llm_engine import LLMEngine
from fp8lm.entrypoints.openai.async_engine import AsyncEngine


def test_a_slow_reader_gets_the_newest_output_not_a_backlog(tiny_model):
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model), max_model_len=128,
                                                        skip_warmup=True), step_thread=False), 60.0)
    engine.start()

    async def run():
        while not engine.ready:
            await asyncio.sleep(0.05)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        gen = engine.generate("slow", "Hello", params)
        first = await gen.__anext__()
        while engine.engine.has_unfinished_requests():      # the engine runs on while nobody reads
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)                              # its last outputs reach the loop
        second = await gen.__anext__()
        return first, second

    try:
        first, second = asyncio.run(run())
    finally:
        engine.stop()
    assert len(first.outputs[0].token_ids) == 1
    assert second.finished and len(second.outputs[0].token_ids) == 40     # every step in between superseded

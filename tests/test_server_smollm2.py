"""The server on SmolLM2: 64 concurrent streams equal offline generation; the seed's command line."""
import asyncio

import openai
import pytest

from fp8lm import LLM, SamplingParams
from server_util import running_server

pytestmark = pytest.mark.slow
PROMPTS = [f"Write one sentence about the number {i}." for i in range(64)]


def test_64_concurrent_streams_equal_offline(smollm2):
    offline = LLM(str(smollm2), max_model_len=512, max_num_seqs=64, skip_warmup=True)
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                                                             use_tqdm=False)]
    del offline
    with running_server(str(smollm2), "--max-model-len", "512", "--max-num-seqs", "64",
                        "--served-model-name", "smol") as proc:
        client = openai.AsyncOpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=300)

        async def one(prompt):
            stream = await client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0,
                                                     stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def all_of_them():
            return await asyncio.gather(*(one(p) for p in PROMPTS))

        got = asyncio.run(all_of_them())
    assert got == expected


def test_seed_command_line_with_fp8(smollm2, smollm2_fp8_bfloat16):
    """calibrate (the default recipe, the run's shared `fp8lm calibrate ... --dtype bfloat16`), then the
    seed's serve line with fp8lm as the engine's name, answered by openai: in bfloat16 + FP8 the model
    still knows what float32 knows."""
    env = {"QUANT_CONFIG": str(smollm2_fp8_bfloat16.quant_config)}
    with running_server(str(smollm2), "--dtype", "bfloat16", "--max-model-len", "2048", "--block-size", "128",
                        "--max-num-seqs", "32", "--quantization", "inc", "--kv-cache-dtype", "fp8_inc",
                        env=env, timeout=600) as proc:
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        r = client.chat.completions.create(
            model=str(smollm2), messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content

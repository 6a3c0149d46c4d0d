"""The real server under clients that leave, more traffic than it takes, and an engine that fails."""
import threading
import time

import httpx
import pytest

from conftest import make_tiny_llama
from server_util import running_server
from test_server import metric

MODEL = "tiny-long"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny model with room for 8,000-token generations: seconds of work per request."""
    return make_tiny_llama(tmp_path_factory.mktemp("long") / "llama", max_position_embeddings=8192)


def body(**kw):
    return {"model": MODEL, "prompt": "Keep going", "max_tokens": 8000, "ignore_eos": True, **kw}


def wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnected_client_is_aborted(long_model, stream):
    with running_server(str(long_model), "--max-model-len", "8192", "--served-model-name", MODEL) as proc:
        url = f"{proc.base_url}/v1/completions"
        if stream:
            with httpx.stream("POST", url, json=body(stream=True), timeout=30) as r:
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body(), timeout=1.0)
        assert metric(proc.base_url, "vllm:generation_tokens_total") < 7000     # it was still running
        assert wait_for(lambda: metric(proc.base_url, "vllm:num_requests_running") == 0, 2.0)


def test_waiting_requests_beyond_the_bound_get_503_with_retry_after(long_model):
    with running_server(str(long_model), "--max-model-len", "8192", "--served-model-name", MODEL,
                        "--max-num-seqs", "1", "--max-waiting-requests", "1") as proc:
        url = f"{proc.base_url}/v1/completions"
        # One running, then one waiting: sent together, the second could find the first still waiting
        # and be refused by the bound itself.
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            threading.Thread(target=lambda: httpx.post(url, json=body(), timeout=60), daemon=True).start()
            assert wait_for(lambda: metric(proc.base_url, gauge) == 1, 10)
        r = httpx.post(url, json=body(), timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-waiting-requests=1" in r.json()["error"]["message"]


def test_a_failed_engine_ends_the_process(long_model):
    """A step past FP8LM_ENGINE_ITERATION_TIMEOUT_S: the request gets its 503, then the server exits
    non-zero with the reason logged (for a supervisor to restart it), instead of answering 503 forever."""
    with running_server(str(long_model), "--max-model-len", "8192", "--served-model-name", MODEL,
                        env={"FP8LM_ENGINE_ITERATION_TIMEOUT_S": "0.001"}) as proc:
        r = httpx.post(f"{proc.base_url}/v1/completions", json=body(prompt="x" * 7000, max_tokens=10), timeout=60)
        assert r.status_code == 503
        assert proc.wait(15) != 0
        assert "stopping the server: a model step exceeded FP8LM_ENGINE_ITERATION_TIMEOUT_S" in proc.output()

"""Prometheus metrics of one server (its own registry: two servers in one process never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter("fp8lm:request_success", "Finished requests", labels + ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("fp8lm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("fp8lm:generation_tokens", "Tokens generated", labels, registry=r)
        self.running = Gauge("fp8lm:num_requests_running", "Sequences in the running batch", labels, registry=r)
        self.waiting = Gauge("fp8lm:num_requests_waiting", "Sequences waiting to be scheduled", labels, registry=r)
        self.kv_blocks_used = Gauge("fp8lm:kv_cache_blocks_used", "KV cache blocks in use", labels, registry=r)
        self.kv_blocks_total = Gauge("fp8lm:kv_cache_blocks_total", "KV cache blocks", labels, registry=r)
        self.ttft = Histogram("fp8lm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fp8lm:inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.model_name = model_name
        self._counted = {"prompt_tokens": 0, "generation_tokens": 0}

    def labels(self, metric):
        return metric.labels(model_name=self.model_name)

    def update_engine(self, engine) -> None:
        self.labels(self.running).set(engine.num_running)
        self.labels(self.waiting).set(engine.num_waiting)
        self.labels(self.kv_blocks_used).set(engine.block_manager.num_used_blocks)
        self.labels(self.kv_blocks_total).set(engine.block_manager.num_blocks)
        # The engine keeps totals; counters take the increase since the last update.
        for key, counter in (("prompt_tokens", self.prompt_tokens), ("generation_tokens", self.generation_tokens)):
            self.labels(counter).inc(engine.stats[key] - self._counted[key])
            self._counted[key] = engine.stats[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one server under vLLM's names (`vllm:*`, label `model_name`), so vLLM's
dashboards, autoscalers and gateways read them; its own registry: two servers in one process never
collide."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0)
# Engine totals -> counters (the counter takes the increase since the last update).
_ENGINE_TOTALS = {"prompt_tokens": "Prompt tokens processed", "generation_tokens": "Tokens generated",
                  "num_preemptions": "Preemptions (sequences recomputed later)",
                  "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
                  "prefix_cache_hits": "Prompt tokens found in the prefix cache"}


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"], registry=r)
        self.totals = {key: Counter(f"vllm:{key}", doc, labels, registry=r) for key, doc in _ENGINE_TOTALS.items()}
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent)", labels, registry=r)

        def histogram(name, doc, buckets=_LATENCY_BUCKETS):
            return Histogram(f"vllm:{name}", doc, labels, buckets=buckets, registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish", _REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to first scheduled",
                                    _REQUEST_BUCKETS)
        self.model_name = model_name
        self._counted = dict.fromkeys(_ENGINE_TOTALS, 0)

    def labels(self, metric):
        return metric.labels(model_name=self.model_name)

    def update_engine(self, engine) -> None:
        self.labels(self.running).set(engine.num_running)
        self.labels(self.waiting).set(engine.num_waiting)
        bm = engine.block_manager
        self.labels(self.kv_usage).set(bm.num_used_blocks / bm.num_blocks)
        for key, value in engine.metric_totals().items():
            self.labels(self.totals[key]).inc(value - self._counted[key])
            self._counted[key] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""/metrics in Prometheus text format: the engine's counters, read at scrape time, and the
latencies the server measures per request.

Each app gets its own registry (not prometheus_client's global one), so two servers in one
process, as in the tests, do not collide.
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine_loop import EngineLoop

# Seconds; tiny models on a CPU answer in milliseconds, large ones on a busy GPU in seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, engine_loop: EngineLoop):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_loop))
        self.prompt_tokens = Counter(
            "kvgen_prompt_tokens", "Prompt tokens of the requests added to the engine "
            "(each of n choices counts its prompt)", registry=self.registry)
        self.ttft = Histogram(
            "kvgen_time_to_first_token_seconds", "From the request's arrival to its first "
            "generated token, per choice", buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(
            "kvgen_inter_token_latency_seconds", "Between successive generated tokens of one "
            "choice", buckets=_ITL_BUCKETS, registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads the stats the engine thread last published; never calls into the engine."""

    def __init__(self, engine_loop: EngineLoop):
        self.engine_loop = engine_loop

    def collect(self):
        s = self.engine_loop.stats
        gauges = [("kvgen_requests_running", "Requests holding KV-cache blocks", s.running),
                  ("kvgen_requests_waiting", "Requests waiting for admission", s.waiting),
                  ("kvgen_kv_blocks_used", "KV-cache blocks held by requests", s.used_blocks),
                  ("kvgen_kv_blocks_total", "KV-cache blocks in the pool", s.num_blocks),
                  ("kvgen_prefix_cache_hit_rate", "Fraction of prompt tokens looked up on "
                   "admission that the prefix cache served", s.prefix_cache_hit_rate)]
        counters = [("kvgen_preemptions", "Requests preempted for lack of blocks",
                     s.preemptions),
                    ("kvgen_generation_tokens", "Tokens generated, aborted requests' included",
                     s.generated_tokens),
                    ("kvgen_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                     "prefix cache", s.prefix_cache_queried_tokens),
                    ("kvgen_prefix_cache_hit_tokens", "Prompt tokens the prefix cache served",
                     s.prefix_cache_hit_tokens)]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(name, help_text, value=value)
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)

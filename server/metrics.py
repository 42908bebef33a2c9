"""Prometheus metrics of one server, in its own registry (several servers may share a process).

Pool and queue figures are read from the statistics the engine's process sends after every step
(server.bridge), so a scrape never waits for the engine.
"""

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                   5.12, 10.24, 20.48)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._stats: dict = {}
        self.engine_restarts = 0     # counted by the supervisor (server.bridge)
        self.ttft = Histogram("hybridkv_time_to_first_token_seconds",
                              "Time from arrival to the first output token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("hybridkv_inter_token_latency_seconds",
                             "Time between output tokens of a request (a launch that produces "
                             "several tokens counts each at the launch's time divided by them)",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.step_time = Histogram("hybridkv_engine_launch_seconds",
                                   "Wall time of one engine step (plan, launch, results)",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def tokens(self, gap: float, count: int, first: bool) -> None:
        if first:
            self.ttft.observe(gap)
            count -= 1
        for _ in range(count):
            self.itl.observe(gap / max(count, 1))

    def snapshot(self, stats: dict) -> None:
        self._stats = stats

    # -- scrape -----------------------------------------------------------------------------
    def collect(self):
        yield CounterMetricFamily("hybridkv_engine_restarts",
                                  "Times the engine's process died and was started again",
                                  value=self.engine_restarts)
        s = self._stats
        if not s:
            return
        used = s["pages_total"] - s["pages_free"]
        gauges = {
            "pages_used": ("KV pages held by requests or the prefix cache", used),
            "pages_free": ("KV pages free", s["pages_free"]),
            "pool_pages": ("KV pages in the pool now (an elastic pool grows and shrinks)",
                           s["pages_total"]),
            "pool_max_pages": ("KV pages the pool may grow to", s["pages_max"]),
            "pages_cached": ("KV pages held by the prefix cache", s["pages_cached"]),
            "host_pages_cached": ("KV pages held in the prefix cache's host tier",
                                  s["host_pages_cached"]),
            "host_pool_pages": ("KV pages the host tier may hold (--host-kv-size)",
                                s["host_pages_total"]),
            "host_tier_bytes": ("Host memory held by the host tier (whole transfer blocks: one "
                                "is freed with its last page)", s["host_bytes"]),
            "kv_usage_ratio": ("Fraction of the KV pool (at its current size) held",
                               used / s["pages_total"]),
            "prefix_cache_hit_rate": ("Prompt tokens found in the prefix cache / prompt tokens",
                                      s["hit_tokens"] / max(s["prompt_tokens"], 1)),
            "running_requests": ("Requests holding a cache row", s["running"]),
            "queued_requests": ("Requests waiting for admission", s["waiting"]),
            "compiled_step_shapes": ("Step programs compiled so far (engine.programs)",
                                     s["compiled_shapes"]),
            "step_shapes_pending": ("Step programs queued for the background compile thread",
                                    s["shapes_pending"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"hybridkv_{name}", doc, value=value)
        counters = {
            "preemptions": ("Requests preempted to free pages", s["preemptions"]),
            "xla_compiles": ("XLA compilations in this process (step shapes, page operations; "
                             "persistent-cache hits included)", s["xla_compiles"]),
            "request_path_compiles": ("Step programs a launch waited to compile (none unless "
                                      "--precompile none, or a shape no compiled one covers)",
                                      s["request_path_compiles"]),
            "prompt_tokens": ("Prompt tokens admitted (first admissions)", s["prompt_tokens"]),
            "prefix_cache_hit_tokens": ("Prompt tokens found in the prefix cache",
                                        s["hit_tokens"]),
            "engine_step_seconds": ("Wall time the engine was busy (steps, and gaps between "
                                    "steps while a launch ran)", s["step_seconds"]),
            "engine_device_busy_seconds": ("Device time in model launches (each from the "
                                           "end of its dispatch, or the previous launch's "
                                           "end, to its end); the rest of the busy time is "
                                           "host work the device waited for", s["device_busy_seconds"]),
            "device_steps": ("Model steps run on the device (a launch may run several)",
                             s["device_steps"]),
            "pool_grows": ("Elastic pool growths", s["pool_grows"]),
            "pool_shrinks": ("Elastic pool shrinks", s["pool_shrinks"]),
            "pool_pages_moved": ("Pages moved by elastic pool compaction", s["pages_moved"]),
            "host_pages_offloaded": ("KV pages copied to the host tier", s["host_pages_offloaded"]),
            "host_pages_loaded": ("KV pages copied back from the host tier",
                                  s["host_pages_loaded"]),
            "overlapped_launches": ("Launches queued behind one in flight, planned before the "
                                    "host read its results", s["overlapped_launches"]),
            "engine_recoveries": ("Engine calls that raised (a device error in a launch, say) "
                                  "and were recovered from, in the engine's current process",
                                  s["recoveries"]),
            "failed_requests": ("Requests failed by such errors, in the engine's current "
                                "process", s["failed_requests"]),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"hybridkv_{name}", doc, value=value)
        tiers = CounterMetricFamily("hybridkv_prefix_cache_tier_hit_tokens",
                                    "Prompt tokens found in the prefix cache, by the tier that "
                                    "held them", labels=["tier"])
        tiers.add_metric(["device"], s["hit_tokens"] - s["host_hit_tokens"])
        tiers.add_metric(["host"], s["host_hit_tokens"])
        yield tiers

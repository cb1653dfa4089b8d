"""Prometheus metrics of the server: requests, tokens, latency histograms, KV pool and session gauges.

Contract: one :class:`Metrics` per app with its own registry (several apps in one process never collide); gauges
that mirror engine state are refreshed from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gemma_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gemma_prompt_tokens", "Prompt tokens seen", registry=r)
        self.cached_tokens = Counter("gemma_cached_tokens", "Prompt tokens served from the KV cache", registry=r)
        self.generated_tokens = Counter("gemma_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gemma_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("gemma_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_LATENCY, registry=r)
        self._gauges = {name: Gauge(f"gemma_{name}", help_, registry=r) for name, help_ in (
            ("kv_blocks_used", "KV pages in use"), ("kv_blocks_free", "KV pages free (cached or empty)"),
            ("kv_blocks_cached", "KV pages registered in the prefix cache"),
            ("prefix_hit_rate", "Fraction of prompt tokens found in the KV cache"),
            ("requests_running", "Requests in the running batch"), ("requests_waiting", "Requests queued"),
            ("sessions_resident", "Idle sessions whose KV is in memory"),
            ("sessions_loaded", "Sessions loaded in memory"),
            ("sessions_spilled_total", "Idle sessions' KV dropped or spilled to disk under pressure"),
            ("preemptions_total", "Running requests preempted under memory pressure"),
            ("cache_block_evictions_total", "Cached KV pages evicted"),
            ("prompt_steps_held_for_prefix_total", "Steps a new prompt waited for an earlier one computing their "
                                                   "shared prefix (instead of computing it twice)"),
            ("prompt_tokens_scored_total", "Prompt tokens scored for their own logprobs (echo with logprobs)"),
            ("scoring_jobs", "Prompts being scored or waiting to be"),
            ("store_pending_snapshots", "Spilled KV snapshots waiting in memory for the store's writer"),
            ("store_pending_bytes", "Bytes of those snapshots"),
            ("store_queued_exports", "Sessions whose KV snapshot is queued for writing"),
            ("store_spills_dropped_total", "Spills dropped because too many waited (recomputed when needed)"))}

    def observe_turn(self, prompt: int, cached: int, generated: int, ttft: float) -> None:
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.generated_tokens.inc(generated)
        if ttft > 0:
            self.ttft.observe(ttft)

    def render(self, engine_stats: dict, sessions_loaded: int, store_stats: dict | None = None) -> bytes:
        g = self._gauges
        if store_stats:
            g["store_pending_snapshots"].set(store_stats["pending_snapshots"])
            g["store_pending_bytes"].set(store_stats["pending_bytes"])
            g["store_queued_exports"].set(store_stats["queued_exports"])
            g["store_spills_dropped_total"].set(store_stats["spills_dropped"])
        g["kv_blocks_used"].set(engine_stats["blocks_used"])
        g["kv_blocks_free"].set(engine_stats["blocks_free"])
        g["kv_blocks_cached"].set(engine_stats["blocks_cached"])
        g["prefix_hit_rate"].set(engine_stats["prefix_hit_rate"])
        g["requests_running"].set(engine_stats["running"])
        g["requests_waiting"].set(engine_stats["waiting"])
        g["sessions_resident"].set(engine_stats["parked"])
        g["sessions_loaded"].set(sessions_loaded)
        g["sessions_spilled_total"].set(engine_stats["session_kv_evictions"])
        g["preemptions_total"].set(engine_stats["preemptions"])
        g["cache_block_evictions_total"].set(engine_stats["cache_block_evictions"])
        g["prompt_steps_held_for_prefix_total"].set(engine_stats["prompt_steps_held_for_prefix"])
        g["prompt_tokens_scored_total"].set(engine_stats["scored_tokens"])
        g["scoring_jobs"].set(engine_stats["scoring_jobs"])
        return generate_latest(self.registry)

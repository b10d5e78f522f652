"""The server's Prometheus metrics: vLLM's names under the prefix `llama:`, in a registry of the server's own.

`Metrics.observe` is called from the engine's thread each time the engine reports a sequence (a new token, or its
end); the gauges are read from the engine when Prometheus scrapes. The engine itself knows nothing of this.
"""

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from llama.engine import Engine, Request

PREFIX = "llama:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, so that dashboards' quantiles carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# The engine's finish reasons as vLLM labels them ("cancelled": the client left, or a stop string ended the text).
FINISHED_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}
# Counters the engine keeps itself (EngineStats), by vLLM's name: read when scraped.
ENGINE_COUNTERS = {
    "prefix_cache_queries": ("prefix_queried_tokens", "Prompt tokens looked up among the cached prefixes."),
    "prefix_cache_hits": ("prefix_hit_tokens", "Prompt tokens whose keys and values came from a cached prefix."),
    "spec_decode_num_drafts": ("drafts", "Prompt-lookup drafts verified."),
    "spec_decode_num_draft_tokens": ("draft_tokens", "Tokens proposed by prompt lookup."),
    "spec_decode_num_accepted_tokens": ("accepted_tokens", "Proposed tokens the model confirmed."),
}


@dataclass
class _Progress:
    """What one sequence has been seen to do (engine thread only)."""

    submitted_at: float  # time.monotonic() when its request was submitted
    tokens: int = 0  # generated tokens counted so far
    last_token_at: float = 0.0
    done: bool = False


class Metrics:
    """The metrics of one server (one engine, one model name); `exposition()` is what GET /metrics returns."""

    def __init__(self, engine: "Engine", model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._progress: "weakref.WeakKeyDictionary[Request, _Progress]" = weakref.WeakKeyDictionary()
        label = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, documentation: str, read) -> None:
            Gauge(PREFIX + name, documentation, **label).labels(model_name).set_function(read)

        slots = engine.slots  # the list the engine fills and empties in place
        gauge("num_requests_running", "Sequences in a KV slot (prefilling or decoding).", lambda: len(engine.running))
        gauge("num_requests_waiting", "Sequences queued for a free KV slot.", lambda: len(engine.queue))
        gauge("kv_cache_usage_perc", "Fraction of the KV cache's slots in use (1 = all of them).",
              lambda: sum(s is not None for s in slots) / len(slots))
        self._prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", **label).labels(
            model_name)
        self._generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", **label).labels(
            model_name)
        self._success = Counter(PREFIX + "request_success", "Sequences finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.registry.register(_EngineCounters(engine, model_name))
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From submission to the first token.",
                               buckets=TTFT_BUCKETS, **label).labels(model_name)
        self._itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two tokens of a sequence.",
                              buckets=ITL_BUCKETS, **label).labels(model_name)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From submission to the sequence's end.",
                              buckets=E2E_BUCKETS, **label).labels(model_name)

    def observe(self, sequence: "Request", submitted_at: float) -> None:
        """Count what `sequence` did since it was last seen (called from the engine's thread, on each report)."""
        now = time.monotonic()
        progress = self._progress.get(sequence)
        if progress is None:
            progress = self._progress[sequence] = _Progress(submitted_at)
        if progress.done:  # an engine may report the end more than once
            return
        new = len(sequence.tokens) - progress.tokens
        if new > 0:
            spacing = (now - progress.last_token_at) / new if progress.tokens else 0.0
            gaps = new
            if progress.tokens == 0:  # the prompt was prefilled, and gave the first token
                self._prompt_tokens.inc(len(sequence.prompt_tokens))
                self._ttft.observe(now - submitted_at)
                gaps -= 1  # 0: this engine reports every token as it comes
            for _ in range(gaps):
                self._itl.observe(spacing)
            self._generation_tokens.inc(new)
            progress.tokens, progress.last_token_at = len(sequence.tokens), now
        if sequence.finished:
            progress.done = True
            if progress.tokens == 0 and sequence.finish_reason != "cancelled":  # scored a prompt, generated nothing
                self._prompt_tokens.inc(len(sequence.prompt_tokens))
            reason = FINISHED_REASONS.get(sequence.finish_reason, sequence.finish_reason)
            self._success.labels(self._model_name, reason).inc()
            self._e2e.observe(now - submitted_at)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class _EngineCounters:
    """A collector of the engine's own running totals (`engine.stats`), as Prometheus counters."""

    def __init__(self, engine: "Engine", model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        for name, (field, documentation) in ENGINE_COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            counter.add_metric([self.model_name], getattr(self.engine.stats, field))
            yield counter

"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Time to first token, inter-token latency and end-to-end latency (histograms); requests running and waiting
    (gauges); prompt and generated tokens, draft tokens proposed and accepted (counters). The engine thread calls
    ``token``/``finished``/``drafted``/``counts``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("finetune_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("finetune_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("finetune_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.running = Gauge("finetune_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("finetune_requests_waiting", "Requests queued for a batch row", registry=r)
        self.prompt_tokens = Counter("finetune_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("finetune_generation_tokens", "Tokens generated", registry=r)
        self.draft_proposed = Counter("finetune_draft_tokens_proposed", "Tokens the draft model proposed (--draft)",
                                      registry=r)  # fmt: skip
        self.draft_accepted = Counter("finetune_draft_tokens_accepted", "Draft tokens the target kept (--draft)",
                                      registry=r)  # fmt: skip

    def token(self, request, now: float) -> None:
        (self.ttft if request.last is None else self.itl).observe(now - (request.last or request.arrived))
        self.generation_tokens.inc()

    def finished(self, request, now: float) -> None:
        self.e2e.observe(now - request.arrived)
        self.prompt_tokens.inc(len(request.ids))

    def drafted(self, proposed: int, accepted: int) -> None:
        self.draft_proposed.inc(proposed)
        self.draft_accepted.inc(accepted)

    def counts(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)

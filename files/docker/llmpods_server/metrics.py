"""``GET /metrics``: Prometheus metrics of the server, answered without waiting for the model.

What ``/metrics`` exposes (Prometheus text format, from ``prometheus_client`` with a registry of its own):

- llama-server's names and meanings, so one dashboard reads both backends:
  - ``llamacpp:prompt_tokens_total`` (counter): prompt tokens llama.cpp evaluated; tokens reused from the
    previous request's context are not evaluated again and go to
  - ``llamacpp:prompt_tokens_cached_total`` (counter); the two together rise by ``usage.prompt_tokens``;
  - ``llamacpp:tokens_predicted_total`` (counter): generated tokens, as ``usage.completion_tokens`` counts them
    (but for the BOS token llama-cpp-python adds to the usage of an empty prompt: it is not generated);
  - ``llamacpp:requests_processing`` (gauge): generations running (0 or 1: the model runs one at a time);
  - ``llamacpp:requests_deferred`` (gauge): requests waiting for the model lock, read from the lock itself.
- this backend's own:
  - ``llmpods_requests_total{route,status}`` (counter): answered requests to the model routes, by path and
    HTTP status (a stream that fails after its first chunk still answered 200);
  - ``llmpods_request_duration_seconds{route}`` (histogram): from the request's arrival to the end of its
    response, the whole stream included;
  - ``llmpods_time_to_first_token_seconds`` (histogram): for completions and chat completions, from the
    request's arrival to the first chunk (streaming) or the whole answer (without) being ready.

Token counters cover ``/v1/completions`` and ``/v1/chat/completions`` and rise while a generation runs.
Counters and histograms also carry prometheus_client's ``*_created`` samples (set the environment variable
``PROMETHEUS_DISABLE_CREATED_SERIES=true`` to leave them out). ``/metrics`` is served on the server's own port,
as llama-server serves it, is not in the OpenAPI schema, and asks for the API key only when the server has one
(``API_KEY``), like every other route. Keeping it from the public path is the gateway's part: it must not forward
``/metrics``.
"""

from __future__ import annotations

import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from llama_cpp.server import app as llama_app
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_PATH = "/metrics"
MODEL_ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/extras/tokenize",
        "/extras/tokenize/count",
        "/extras/detokenize",
        "/v1/models",
    }
)
ARRIVAL = "llmpods.arrival"  # scope key: time.monotonic() when the request arrived
# Seconds: a token on a fast GPU up to the longest generation the gateway waits for (300 s by default).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def requests_waiting() -> int:
    """Requests waiting for llama-cpp-python's model lock (its two locks), read without taking either."""
    locks = (llama_app.llama_outer_lock, llama_app.llama_inner_lock)
    return sum(lock.statistics().tasks_waiting for lock in locks)


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.prompt_tokens = Counter(
            "llamacpp:prompt_tokens_total",
            "Number of prompt tokens processed, excluding cached tokens",
            registry=registry,
        )
        self.prompt_tokens_cached = Counter(
            "llamacpp:prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", registry=registry
        )
        self.tokens_predicted = Counter(
            "llamacpp:tokens_predicted_total", "Number of generation tokens processed", registry=registry
        )
        self.requests_processing = Gauge(
            "llamacpp:requests_processing", "Number of requests processing", registry=registry
        )
        self.requests_deferred = Gauge("llamacpp:requests_deferred", "Number of requests deferred", registry=registry)
        self.requests_deferred.set_function(requests_waiting)
        self.requests = Counter(
            "llmpods_requests_total",
            "Requests to the model routes, by route and HTTP status code",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "llmpods_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llmpods_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first chunk (streaming) or its answer being ready",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )

    # TokenSink, for usage.TokenMeter
    def prompt_processed(self, evaluated: int, cached: int) -> None:
        self.prompt_tokens.inc(evaluated)
        self.prompt_tokens_cached.inc(cached)

    def token_generated(self) -> None:
        self.tokens_predicted.inc()

    def first_token(self, request: Request) -> None:
        """The first chunk, or the whole answer, of a generation is ready."""
        arrival = request.scope.get(ARRIVAL)
        if arrival is not None:
            self.time_to_first_token.observe(time.monotonic() - arrival)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def of(request: Request) -> Metrics | None:
    """The metrics of the app serving ``request``; None in an app ``install`` was not called on."""
    return getattr(request.app.state, "llmpods_metrics", None)


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class RequestMetrics:
    """ASGI middleware: stamps each request's arrival; counts and times the answers of the model routes."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL] = time.monotonic()
        route = _route_path(scope)
        if route not in MODEL_ROUTES:
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers when the app fails before starting a response

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.monotonic() - scope[ARRIVAL])


def install(app: FastAPI) -> Metrics:
    """``GET /metrics`` and the middleware that feeds it; call it last, so the middleware is the outermost."""
    metrics = Metrics()
    app.state.llmpods_metrics = metrics

    async def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    app.add_api_route(
        METRICS_PATH,
        get_metrics,
        methods=["GET"],
        include_in_schema=False,
        dependencies=[Depends(llama_app.authenticate)],
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return metrics

# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Waiting until a model answers through its gateway: small pure predicates and one loop.

Private to this collection: the interface may change without notice.

Stages, in order, under one deadline on a monotonic clock:

``readiness``
    ``GET <base_url><readiness_path>`` without a key answers 200 (and, when its JSON names a model, ours).
``models``
    ``GET <base_url>/<model>/v1/models`` with the key lists the model id.
``completion`` (optional)
    ``POST <base_url>/<model>/v1/chat/completions`` with the key answers one real completion.

Connection errors, timeouts, 5xx and a few 4xx that a rollout produces (404, 408, 425, 429) are transient
and retried until the deadline; 401/403 from a keyed stage and other 4xx end the wait at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.llmpods.inference.plugins.module_utils._http import Answer, trim
from ansible_collections.llmpods.inference.plugins.module_utils._names import DNS_LABEL

WAIT_SPEC = dict(
    wait_timeout=dict(type="int", default=300),
    wait_sleep=dict(type="float", default=2.0),
)
"""Argument spec paired 1:1 with the ``llmpods.inference._wait`` doc fragment."""

# A model id a client sends: a DNS label (the rule's home is _names).
MODEL_NAME = DNS_LABEL

STAGES = ("readiness", "models", "completion")

# What one answer means for the wait.
OK = "ok"  # this stage is done
RETRY = "retry"  # transient: try again until the deadline
AUTH = "auth"  # the key was refused: waiting will not help
REJECT = "reject"  # the request itself was refused: waiting will not help

# 4xx answers seen while a model is being rolled out or woken up: an Ingress not yet programmed (404),
# a proxy giving up on a cold start (408), rate limits (425, 429).
TRANSIENT_4XX = frozenset((404, 408, 425, 429))

# Stage outcomes as reported in ``stages``.
NOT_REACHED = "not_reached"
SKIPPED = "skipped"
TIMED_OUT = "timed_out"
FAILED = "failed"


# --- pure predicates -------------------------------------------------------------------------------


def classify(status: int | None) -> str:
    """What an HTTP status means for the wait: OK, RETRY, AUTH or REJECT. None (no answer) is RETRY."""
    if status is None:
        return RETRY
    if 200 <= status < 300:
        return OK
    if status in (401, 403):
        return AUTH
    if status in TRANSIENT_4XX or status >= 500:
        return RETRY
    if 400 <= status < 500:
        return REJECT
    return RETRY


def parse_json(body: str) -> Any:
    """The JSON document in a body, or None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def readiness_ok(status: int | None, body: str, model: str | None = None) -> bool:
    """True for a 200 readiness answer; when its JSON names a model, it must be ``model``."""
    if status != 200:
        return False
    payload = parse_json(body)
    if model and isinstance(payload, dict) and isinstance(payload.get("model"), str):
        return payload["model"] == model
    return True


def listed_ids(payload: Any) -> list[str]:
    """The model ids of an OpenAI-style ``/v1/models`` answer (``{"object": "list", "data": [{"id": ...}]}``)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return []
    return [item["id"] for item in payload["data"] if isinstance(item, dict) and isinstance(item.get("id"), str)]


def models_listed(payload: Any, model: str) -> bool:
    """True when the ``/v1/models`` answer lists ``model``."""
    return model in listed_ids(payload)


def completion_result(payload: Any) -> dict[str, Any] | None:
    """Text, finish reason and usage of a chat completion answer, or None when it is not one."""
    if not isinstance(payload, dict):
        return None
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = message.get("content")
    if not isinstance(text, str):
        text = choice.get("text") if isinstance(choice.get("text"), str) else ""
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return {
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
        "model": payload.get("model"),
    }


def normalize_base_url(base_url: str, model: str) -> str:
    """The gateway root: trailing slashes dropped, and a ``/<model>/v1`` or ``/<model>`` suffix too.

    So an OpenAI client's base URL (``https://llm.example.com/smollm2/v1``) works as well as the root.
    """
    base = base_url.strip().rstrip("/")
    for suffix in (f"/{model}/v1", f"/{model}"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def join_url(base: str, path: str) -> str:
    """``base`` + ``path`` with exactly one slash between them."""
    return "{}/{}".format(base.rstrip("/"), path.lstrip("/"))


def seconds(value: float) -> str:
    """Seconds for a message: one decimal below 10 s, whole seconds above."""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


# --- what went wrong -------------------------------------------------------------------------------


class WaitError(Exception):
    """The wait ended without the model ready. Carries the stage, the last answer and the time spent."""

    def __init__(self, message: str, stage: str, last: Answer | None, elapsed: float) -> None:
        super().__init__(message)
        self.stage = stage
        self.last = last
        self.elapsed = elapsed


class NotReadyError(WaitError):
    """The deadline passed while a stage kept getting transient answers."""


class KeyRejectedError(WaitError):
    """The gateway refused the API key (401/403): reported at once."""


class RequestRejectedError(WaitError):
    """An answer that waiting cannot change (another 4xx, a certificate that does not verify)."""


# --- the wait --------------------------------------------------------------------------------------


@dataclass
class StageReport:
    """How one stage went: ``status`` is ok, skipped, not_reached, timed_out or failed."""

    status: str = NOT_REACHED
    attempts: int = 0
    seconds: float = 0.0
    http_status: int | None = None
    url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
            "http_status": self.http_status,
            "url": self.url,
        }


@dataclass
class Target:
    """What to wait for."""

    base_url: str
    model: str
    api_key: str | None = None
    readiness_path: str | None = "/alive"
    completion: bool = False
    completion_prompt: str = "Say OK."
    completion_max_tokens: int = 1

    @property
    def root(self) -> str:
        return normalize_base_url(self.base_url, self.model)

    @property
    def endpoint(self) -> str:
        """The OpenAI-compatible base URL of the model."""
        return join_url(self.root, f"{self.model}/v1")


@dataclass
class Waiter:
    """Runs the stages against ``fetch`` (``Client.fetch`` or a stand-in) under one deadline."""

    target: Target
    fetch: Callable[..., Answer]
    wait_timeout: float = 300
    wait_sleep: float = 2.0
    request_timeout: float = 30.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    stages: dict[str, StageReport] = field(default_factory=lambda: {name: StageReport() for name in STAGES})
    models: list[str] = field(default_factory=list)
    completion: dict[str, Any] | None = None
    last: Answer | None = None
    attempts: int = 0
    elapsed: float = 0.0

    # -- results

    def result(self) -> dict[str, Any]:
        """What the module returns, whether the wait succeeded or not."""
        result = {
            "ready": all(report.status in (OK, SKIPPED) for report in self.stages.values()),
            "endpoint": self.target.endpoint,
            "stages": {name: report.as_dict() for name, report in self.stages.items()},
            "models": list(self.models),
            "attempts": self.attempts,
            "last_status": self.last.status if self.last else None,
            "last_body": trim(self.last.body) if self.last else "",
            "last_error": self.last.error if self.last else None,
            "elapsed": round(self.elapsed, 3),
        }
        if self.completion is not None:
            result["completion"] = self.completion
        return result

    # -- the loop

    def run(self) -> dict[str, Any]:
        """Wait for every stage in turn; return ``result()`` or raise a ``WaitError``."""
        start = self.clock()
        deadline = start + self.wait_timeout
        try:
            if self.target.readiness_path:
                self._stage(
                    "readiness",
                    "GET",
                    join_url(self.target.root, self.target.readiness_path),
                    self._judge_readiness,
                    start,
                    deadline,
                    keyed=False,
                )
            else:
                self.stages["readiness"].status = SKIPPED
            self._stage("models", "GET", join_url(self.target.endpoint, "models"), self._judge_models, start, deadline)
            if self.target.completion:
                self._stage(
                    "completion",
                    "POST",
                    join_url(self.target.endpoint, "chat/completions"),
                    self._judge_completion,
                    start,
                    deadline,
                    data=self._completion_request(),
                )
            else:
                self.stages["completion"].status = SKIPPED
        finally:
            self.elapsed = self.clock() - start
        return self.result()

    def _stage(
        self,
        name: str,
        method: str,
        url: str,
        judge: Callable[[Answer], str],
        start: float,
        deadline: float,
        data: bytes | None = None,
        keyed: bool = True,
    ) -> None:
        """Ask ``url`` until ``judge`` says OK; every stage gets one attempt even past the deadline."""
        report = self.stages[name]
        report.url = url
        headers = self._headers(keyed, data is not None)
        stage_start = self.clock()
        while True:
            now = self.clock()
            timeout = min(self.request_timeout, max(deadline - now, 1.0))
            answer = self.fetch(method, url, headers=headers, data=data, timeout=timeout)
            self.last = answer
            self.attempts += 1
            report.attempts += 1
            report.http_status = answer.status
            verdict = judge(answer)
            now = self.clock()
            report.seconds = now - stage_start
            if verdict == OK:
                report.status = OK
                return
            if verdict != RETRY or not answer.retryable:
                report.status = FAILED
                self.elapsed = now - start
                raise self._refused(name, method, url, answer, verdict, keyed)
            if now >= deadline:
                report.status = TIMED_OUT
                self.elapsed = now - start
                raise NotReadyError(
                    self._timeout_message(name, method, url, answer, now - start), name, answer, now - start
                )
            self.sleep(max(0.0, min(self.wait_sleep, deadline - now)))

    def _headers(self, keyed: bool, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if keyed and self.target.api_key:
            headers["Authorization"] = f"Bearer {self.target.api_key}"
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    def _completion_request(self) -> bytes:
        request = {
            "model": self.target.model,
            "messages": [{"role": "user", "content": self.target.completion_prompt}],
            "max_tokens": self.target.completion_max_tokens,
            "stream": False,
        }
        return json.dumps(request).encode("utf-8")

    # -- judges: what an answer means for each stage

    def _judge_readiness(self, answer: Answer) -> str:
        verdict = classify(answer.status)
        if verdict == AUTH:
            # The readiness endpoint takes no key; something in front of the gateway wants one.
            return REJECT
        if verdict == OK and not readiness_ok(answer.status, answer.body, self.target.model):
            return RETRY
        return verdict

    def _judge_models(self, answer: Answer) -> str:
        verdict = classify(answer.status)
        if verdict != OK:
            return verdict
        payload = parse_json(answer.body)
        self.models = listed_ids(payload)
        return OK if models_listed(payload, self.target.model) else RETRY

    def _judge_completion(self, answer: Answer) -> str:
        verdict = classify(answer.status)
        if verdict != OK:
            return verdict
        result = completion_result(parse_json(answer.body))
        if result is None:
            return RETRY
        self.completion = result
        return OK

    # -- messages

    def _timeout_message(self, stage: str, method: str, url: str, answer: Answer, elapsed: float) -> str:
        model = self.target.model
        attempts = self.stages[stage].attempts
        where = "{} {}, {} attempt{}".format(method, url, attempts, "" if attempts == 1 else "s")
        if stage == "models" and answer.status == 200:
            listed = ", ".join(self.models) if self.models else "no model ids"
            return f"model {model} not listed after {seconds(elapsed)} s; the models answer lists: {listed} ({where})"
        if answer.status is None:
            seen = f"no {stage} answer ({answer.error})"
        else:
            seen = f"last {stage} answer {answer.describe()}"
        return f"model {model} not ready after {seconds(elapsed)} s; {seen} ({where})"

    def _refused(self, stage: str, method: str, url: str, answer: Answer, verdict: str, keyed: bool) -> WaitError:
        elapsed = self.elapsed
        seen = f"{stage} answered {answer.describe()} to {method} {url}"
        if verdict == AUTH and keyed:
            if self.target.api_key:
                hint = "the gateway rejected the API key; check api_key against the keys the gateway serves"
            else:
                hint = "the gateway demands an API key and none was given; set api_key"
            return KeyRejectedError(f"model {self.target.model}: {hint}: {seen}", stage, answer, elapsed)
        if answer.status is None:
            why = f"{stage} request to {url} failed: {answer.error}; not retried"
            if (answer.error or "").startswith("TLS"):
                why += " (set ca_path to the CA that signed the server certificate)"
        elif stage == "readiness" and verdict == REJECT and classify(answer.status) == AUTH:
            why = f"{seen}; the readiness endpoint takes no key, so something in front of the gateway demands one"
        else:
            why = f"{seen}; not retried"
        return RequestRejectedError(f"model {self.target.model}: {why}", stage, answer, elapsed)

# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""One HTTP exchange, reduced to what the waiter judges: a status, a body, or the reason there was none.

Private to this collection: the interface may change without notice.
Requests go through ``ansible.module_utils.urls`` so modules need no extra libraries on the controller.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
from dataclasses import dataclass

from ansible.module_utils.urls import Request, SSLValidationError

try:
    from ansible.module_utils.urls import make_context
except ImportError:  # older ansible-core: urls builds a TLS context per request
    make_context = None

# The most of a body kept for judging and reporting; readiness, model lists and a short completion fit easily.
MAX_BODY = 256 * 1024
# The most of a body quoted in messages and results.
TRIM = 300

HTTP_CLIENT_SPEC = dict(
    validate_certs=dict(type="bool", default=True),
    ca_path=dict(type="path"),
    request_timeout=dict(type="float", default=30.0),
    host_header=dict(type="str"),
)
"""Argument spec of the HTTP client options, documented in the module that uses them."""


def trim(text: str, limit: int = TRIM) -> str:
    """Shorten a body for a message: whitespace runs folded, at most ``limit`` characters."""
    folded = " ".join(text.split())
    if len(folded) <= limit:
        return folded
    return folded[: limit - 3] + "..."


@dataclass(frozen=True)
class Answer:
    """What one request got back.

    ``status`` is None when no HTTP answer came at all; ``error`` then says why.
    ``retryable`` is False for errors that waiting cannot cure (a certificate that does not verify, a bad URL).
    """

    status: int | None = None
    body: str = ""
    error: str | None = None
    retryable: bool = True

    def describe(self) -> str:
        """One line for a message: ``503 {"status":"loading"}`` or ``no answer (connection refused)``."""
        if self.status is None:
            return "no answer ({})".format(self.error or "unknown error")
        body = trim(self.body)
        return f"{self.status} {body}" if body else str(self.status)


def _reason(exc: BaseException, timeout: float | None = None) -> str:
    """A short, stable reason for a failed connection."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class Client:
    """Sends requests with fixed TLS settings and headers; never raises for HTTP or network trouble."""

    def __init__(
        self,
        validate_certs: bool = True,
        ca_path: str | None = None,
        host_header: str | None = None,
        http_agent: str = "llmpods.inference",
    ) -> None:
        headers = {"Host": host_header} if host_header else {}
        # One TLS context for every request: loading the CA certificates takes long enough to matter
        # when a stage is asked every second.
        context = make_context(cafile=ca_path, validate_certs=validate_certs) if make_context else None
        self._request = Request(
            headers=headers,
            validate_certs=validate_certs,
            ca_path=ca_path,
            http_agent=http_agent,
            # A redirect to another host must not carry the API key along.
            unredirected_headers=["Authorization"],
            use_netrc=False,
            context=context,
        )

    def fetch(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        timeout: float = 30.0,
    ) -> Answer:
        """Send one request and describe what came back."""
        try:
            response = self._request.open(method, url, data=data, headers=headers or {}, timeout=timeout)
            try:
                return Answer(status=response.status, body=_decode(response.read(MAX_BODY)))
            finally:
                response.close()
        except urllib.error.HTTPError as exc:
            # An HTTP answer with an error status: keep its body, it says what is wrong.
            try:
                body = _decode(exc.read(MAX_BODY)) if exc.fp is not None else ""
            except (OSError, http.client.HTTPException):
                body = ""
            return Answer(status=exc.code, body=body)
        except (SSLValidationError, ssl.SSLCertVerificationError) as exc:
            return Answer(error=f"TLS verification failed: {_reason(exc)}", retryable=False)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                return Answer(error=f"TLS verification failed: {_reason(exc)}", retryable=False)
            return Answer(error=_reason(exc, timeout))
        except (OSError, http.client.HTTPException) as exc:
            # Timeouts, a connection reset, the remote end closing without an answer (a pod killed
            # mid-request): all transient.
            return Answer(error=_reason(exc, timeout))
        except ValueError as exc:
            return Answer(error=f"bad request URL {url}: {exc}", retryable=False)

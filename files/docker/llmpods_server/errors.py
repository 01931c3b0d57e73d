"""OpenAI-style errors for every request the server refuses or fails on, and a connection that stays usable.

llama-cpp-python's own route class (``llama_cpp.server.errors.RouteErrorHandler``) re-reads the request body
outside its error handling, so a body that is not JSON turns a 422 into a 500, and it answers every other
failure with the exception text, a traceback folded into it. Here:

- ``OpenAIRoute`` is the route class of every route: what a route raises becomes
  ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status when the request caused it
  (``CLIENT_EXCEPTIONS``, ``RequestError``) and a 500 that names only the exception type otherwise;
- ``install`` adds the same shape for what happens outside a route (unknown path, wrong method), and
  ``CloseOnError``, a middleware that answers an exception no handler caught with a JSON 500 and
  ``Connection: close``: the gateway never keeps a connection the server is about to drop.

Nothing here logs an exception message: messages can quote the request body. The log gets the exception
type and the stack instead.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from llama_cpp.server.errors import ErrorResponseFormatters
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("uvicorn.error")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# Exceptions a request's own content raises inside llama-cpp-python: a value it cannot use (ValueError,
# UnicodeError, OverflowError, a number too large for the C library: ctypes.ArgumentError), a field of the wrong
# shape (TypeError, KeyError, IndexError), a chat template that rejects the messages (jinja2's TemplateError),
# input nested too deeply (RecursionError).
CLIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ctypes.ArgumentError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
)
try:  # jinja2 comes with llama-cpp-python (chat templates); the check stays correct without it
    from jinja2 import TemplateError

    CLIENT_EXCEPTIONS += (TemplateError,)
except ImportError:  # pragma: no cover
    pass

CONTEXT_LENGTH = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
NO_EMBEDDINGS = re.compile(r"must be created with embedding=True")
MESSAGE_LIMIT = 300
VALIDATION_ERRORS_SHOWN = 5


class RequestError(ValueError):
    """A request the server refuses, with the status, code and parameter to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(message: str, *, type_: str = INVALID_REQUEST, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 3] + "..."


def _loc(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts)


def validation_error(exc: RequestValidationError, content_type: str) -> tuple[int, dict]:
    """400 for a body that is not JSON, 422 for JSON of the wrong shape, naming the fields."""
    errors = list(exc.errors())
    invalid_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid_json is not None:
        detail = (invalid_json.get("ctx") or {}).get("error", "")
        position = invalid_json.get("loc", ("body", ""))[-1]
        message = f"The request body is not valid JSON ({detail} at position {position})."
        return 400, error_body(message, code="invalid_json")
    whole_body = all(len(e.get("loc", ())) <= 1 for e in errors)
    if whole_body and "json" not in content_type.lower():
        message = "Send the request body as JSON, with the header Content-Type: application/json."
        return 400, error_body(message, code="invalid_content_type")
    shown = "; ".join(
        f"{_loc(e.get('loc', ())) or 'body'}: {e.get('msg', '')}" for e in errors[:VALIDATION_ERRORS_SHOWN]
    )
    more = f" (and {len(errors) - VALIDATION_ERRORS_SHOWN} more)" if len(errors) > VALIDATION_ERRORS_SHOWN else ""
    first = errors[0] if errors else {}
    kind = str(first.get("type", ""))
    if kind == "missing":
        code = "missing_required_parameter"
    elif kind.endswith(("_type", "_parsing")):
        code = "invalid_type"
    else:
        code = "invalid_value"
    param = _loc(first.get("loc", ())) or None
    return 422, error_body(f"Invalid request body: {shown}{more}.", code=code, param=param)


def _parsed_body(raw: bytes) -> CreateChatCompletionRequest | CreateCompletionRequest | None:
    """The request as llama-cpp-python's error formatters want it, or None; never raises."""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "messages" in data:
            return CreateChatCompletionRequest(**data)
        if isinstance(data, dict) and "prompt" in data:
            return CreateCompletionRequest(**data)
    except Exception:  # only a better message is lost
        return None
    return None


def exception_error(exc: BaseException, raw_body: bytes = b"") -> tuple[int, dict]:
    """Status and OpenAI error for an exception a route raised while serving a request."""
    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), code=exc.code, param=exc.param)
    text = str(exc)
    match = CONTEXT_LENGTH.search(text)
    if match is not None:
        body = _parsed_body(raw_body)
        if body is not None:
            status, error = ErrorResponseFormatters.context_length_exceeded(body, match)
            return status, {"error": dict(error)}
        return 400, error_body(_first_line(text), code="context_length_exceeded", param="messages")
    if NO_EMBEDDINGS.search(text):
        return 400, error_body("This model does not serve embeddings.", code="embeddings_not_supported")
    if isinstance(exc, CLIENT_EXCEPTIONS):
        detail = f"{type(exc).__name__} {text}" if isinstance(exc, KeyError) else _first_line(text)
        detail = detail or type(exc).__name__
        return 400, error_body(f"Invalid request: {detail}", code="invalid_request")
    return 500, error_body(
        f"The inference server failed on this request ({type(exc).__name__}).", type_=SERVER_ERROR, code=None
    )


HTTP_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "unknown_url",
    405: "method_not_allowed",
    503: "model_not_ready",
}


def http_error(status: int, detail: Any, headers: dict[str, str] | None) -> JSONResponse:
    message = detail if isinstance(detail, str) and detail else "Request refused."
    type_ = SERVER_ERROR if status >= 500 else INVALID_REQUEST
    return error_response(status, error_body(message, type_=type_, code=HTTP_ERROR_CODES.get(status)), headers)


def log_failure(exc: BaseException, where: str) -> None:
    """The exception type and its stack, without its message (which can quote the request)."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s while serving %s (message withheld: it can quote the request)\n%s", type(exc).__name__, where, stack)


async def failure_response(request: Request, exc: Exception) -> JSONResponse:
    """What a route answers for ``exc``; logs it when the server, not the request, failed."""
    if isinstance(exc, RequestValidationError):
        status, body = validation_error(exc, request.headers.get("content-type", ""))
        return error_response(status, body)
    if isinstance(exc, StarletteHTTPException):
        return http_error(exc.status_code, exc.detail, getattr(exc, "headers", None))
    try:
        raw = await request.body()
    except Exception:  # the body may be gone after a disconnect
        raw = b""
    status, body = exception_error(exc, raw)
    if status >= 500:
        log_failure(exc, f"{request.method} {request.url.path}")
    return error_response(status, body)


class OpenAIRoute(APIRoute):
    """A route whose failures answer as OpenAI errors; nothing it raises reaches the server's error handling."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every failure gets an answer
                return await failure_response(request, exc)

        return openai_errors


class CloseOnError:
    """ASGI middleware: an exception no handler caught gets a JSON 500 with ``Connection: close``.

    Without it the server would send a 500 and then drop the connection without saying so, and a proxy that
    keeps connections alive could hand that dead connection to the next request. A failure after the response
    started cannot be answered any more; the connection is closed and the response is cut short.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log_failure(exc, f"{scope.get('method', '')} {scope.get('path', '')}")
            if started:
                raise
            payload = json.dumps(
                error_body("The inference server failed on this request.", type_=SERVER_ERROR, code=None)
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": payload})


def install(app: FastAPI) -> None:
    """OpenAI errors for what happens outside a route, and the middleware for what escapes everything."""

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return http_error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        status, body = validation_error(exc, request.headers.get("content-type", ""))
        return error_response(status, body)

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_middleware(CloseOnError)

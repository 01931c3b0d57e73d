"""llama-cpp-python's own server app, with answers that never fail the server and never leak its insides.

Every route is llama-cpp-python's, built by ``llama_cpp.server.app.create_app`` from the same command-line
flags and environment variables (MODEL, MODEL_ALIAS, N_CTX, ...) that ``python3 -m llama_cpp.server`` reads,
with these changes:

- every route answers its failures as OpenAI errors, 4xx when the request caused them (``errors``);
- ``/v1/completions`` and ``/v1/chat/completions`` stream so that a failure before the first token gets the
  same answer as without streaming (``generate``); a grammar llama.cpp cannot parse is refused, not fatal;
- ``/extras/detokenize`` refuses token ids the model does not have (llama.cpp would abort on them);
- ``/extras/tokenize/count`` takes either ``{"input": "..."}`` (the length of ``/extras/tokenize``) or a whole
  chat completion request, whose count is the ``usage.prompt_tokens`` the same request gets from
  ``/v1/chat/completions``;
- a streamed ``/v1/completions`` or ``/v1/chat/completions`` with ``stream_options: {"include_usage": true}``
  ends with a usage chunk, as OpenAI and llama-server send it (``generate``, ``usage``).

Added: ``GET /metrics``, Prometheus metrics answered without the model lock, so they answer during a generation
(``metrics``):

- ``llamacpp:prompt_tokens_total``, ``llamacpp:prompt_tokens_cached_total``, ``llamacpp:tokens_predicted_total``,
  ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``, with llama-server's names and meanings;
- ``llmpods_requests_total{route,status}``, ``llmpods_request_duration_seconds{route}`` (the model routes) and
  ``llmpods_time_to_first_token_seconds`` (completions and chat completions).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import llama_cpp
import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from llama_cpp.server import app as llama_server_app
from llama_cpp.server.app import create_app, get_llama_proxy
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings
from llama_cpp.server.types import (
    CreateChatCompletionRequest,
    DetokenizeInputRequest,
    DetokenizeInputResponse,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
)
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from llmpods_server import errors, generate, metrics
from llmpods_server.count import chat_prompt_tokens
from llmpods_server.errors import RequestError

COUNT_PATH = "/extras/tokenize/count"

# The request fields the chat route leaves out before calling create_chat_completion.
CHAT_EXCLUDE = generate.CHAT_EXCLUDE


def count_chat_request(llama: llama_cpp.Llama, body: CreateChatCompletionRequest) -> int:
    """Prompt tokens of a chat request, through the model's own chat handler."""
    kwargs = body.model_dump(exclude=CHAT_EXCLUDE)
    kwargs["stream"] = False
    return chat_prompt_tokens(llama, kwargs)


def count_input(llama: llama_cpp.Llama, text: str) -> int:
    """Tokens of a plain string, as ``/extras/tokenize`` returns them."""
    return len(llama.tokenize(text.encode("utf-8"), special=True))


class CountChatRequest(CreateChatCompletionRequest):
    """A chat completion request as ``/v1/chat/completions`` takes it; ``messages`` is required here."""

    messages: list[llama_cpp.ChatCompletionRequestMessage] = Field(
        description="The messages to count the prompt tokens of, as in a chat completion request."
    )


async def count_tokens(
    body: TokenizeInputRequest | CountChatRequest,
    llama_proxy: Annotated[LlamaProxy, Depends(get_llama_proxy)],
) -> TokenizeInputCountResponse:
    llama = llama_proxy(body.model)
    if isinstance(body, TokenizeInputRequest):
        return TokenizeInputCountResponse(count=count_input(llama, body.input))
    return TokenizeInputCountResponse(count=await run_in_threadpool(count_chat_request, llama, body))


async def detokenize(
    body: DetokenizeInputRequest,
    llama_proxy: Annotated[LlamaProxy, Depends(get_llama_proxy)],
) -> DetokenizeInputResponse:
    llama = llama_proxy(body.model)
    n_vocab = llama.n_vocab()
    for token in body.tokens:
        if not 0 <= token < n_vocab:
            raise RequestError(
                f"tokens: {token} is not a token id of this model (0 to {n_vocab - 1}).",
                param="tokens",
                code="invalid_value",
            )
    return DetokenizeInputResponse(text=llama.detokenize(body.tokens).decode("utf-8", errors="replace"))


COUNT_DESCRIPTION = (
    'Count tokens of `{"input": "..."}`, or the prompt tokens of a whole chat completion request '
    "(formatted with the model's chat template, equal to its `usage.prompt_tokens`)."
)
# Our endpoints for llama-cpp-python's routes, by (path, method); the count route also gets its own description.
ENDPOINTS: dict[tuple[str, str], Callable[..., Any]] = {
    ("/v1/completions", "POST"): generate.create_completion,
    ("/v1/chat/completions", "POST"): generate.create_chat_completion,
    ("/extras/detokenize", "POST"): detokenize,
    (COUNT_PATH, "POST"): count_tokens,
}
# Route settings copied from llama-cpp-python's routes (those this FastAPI's add_api_route takes).
ROUTE_SETTINGS = (
    "response_model",
    "status_code",
    "tags",
    "dependencies",
    "summary",
    "description",
    "response_description",
    "responses",
    "deprecated",
    "methods",
    "operation_id",
    "include_in_schema",
    "response_class",
    "name",
    "callbacks",
    "openapi_extra",
    "generate_unique_id_function",
)
_upstream_routes: list[APIRoute] = []


def _route_settings(route: APIRoute) -> dict[str, Any]:
    accepted = inspect.signature(APIRouter.add_api_route).parameters
    return {name: getattr(route, name) for name in ROUTE_SETTINGS if name in accepted and hasattr(route, name)}


def build_router(routes: list[APIRoute]) -> APIRouter:
    """llama-cpp-python's routes with ours swapped in, every one answering its failures as OpenAI errors."""
    router = APIRouter(route_class=errors.OpenAIRoute)
    for route in routes:
        settings = _route_settings(route)
        methods = sorted(route.methods or ())
        endpoint = next((ENDPOINTS[route.path, m] for m in methods if (route.path, m) in ENDPOINTS), route.endpoint)
        if endpoint is count_tokens:
            settings["description"] = COUNT_DESCRIPTION
        router.add_api_route(route.path, endpoint, **settings)
    return router


def build_app(server_settings: ServerSettings, model_settings: list[ModelSettings]) -> FastAPI:
    """llama-cpp-python's app with its routes replaced by ours (see the module docstring).

    Its routes are taken out of its router before ``create_app`` includes it (whether FastAPI copies an
    included router's routes or keeps a reference to the router), then ours are added.
    """
    upstream = llama_server_app.router
    if not _upstream_routes:
        _upstream_routes.extend(route for route in upstream.routes if isinstance(route, APIRoute))
    upstream.routes[:] = [route for route in upstream.routes if not isinstance(route, APIRoute)]
    generate.guard_grammars()
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    app.include_router(build_router(_upstream_routes))
    errors.install(app)
    metrics.install(app)  # last: its middleware sees every answer, the 500s of errors.CloseOnError too
    return app


def _load_settings(args: argparse.Namespace) -> tuple[ServerSettings, list[ModelSettings]]:
    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if not config_file:
        return parse_model_from_args(ServerSettings, args), [parse_model_from_args(ModelSettings, args)]
    if not os.path.exists(config_file):
        raise ValueError(f"config file {config_file} not found")
    with open(config_file, "rb") as handle:
        if config_file.endswith((".yaml", ".yml")):
            import yaml

            config: Any = ConfigFileSettings.model_validate(yaml.safe_load(handle))
        else:
            config = ConfigFileSettings.model_validate_json(handle.read())
    return ServerSettings.model_validate(config), config.models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m llmpods_server",
        description="llama-cpp-python's OpenAI-compatible server with a chat-aware token count.",
    )
    add_args_from_model(parser, Settings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load.")
    args = parser.parse_args(argv)
    try:
        server_settings, model_settings = _load_settings(args)
    except Exception as exc:
        print(exc, file=sys.stderr)
        parser.print_help()
        sys.exit(1)
    app = build_app(server_settings, model_settings)
    uvicorn.run(
        app,
        host=os.getenv("HOST", server_settings.host),
        port=int(os.getenv("PORT", server_settings.port)),
        ssl_keyfile=server_settings.ssl_keyfile,
        ssl_certfile=server_settings.ssl_certfile,
    )

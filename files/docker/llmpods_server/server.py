"""llama-cpp-python's own server app, with ``POST /extras/tokenize/count`` replaced.

Every route except the token count is llama-cpp-python's, built by ``llama_cpp.server.app.create_app``
from the same command-line flags and environment variables (MODEL, MODEL_ALIAS, N_CTX, ...) that
``python3 -m llama_cpp.server`` reads. The replacement route takes either ``{"input": "..."}`` (the
length of ``/extras/tokenize``) or a whole chat completion request, whose count is the
``usage.prompt_tokens`` the same request gets from ``/v1/chat/completions``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Annotated, Any

import llama_cpp
import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from llama_cpp.server import app as llama_server_app
from llama_cpp.server.app import authenticate, create_app, get_llama_proxy
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings
from llama_cpp.server.types import (
    CreateChatCompletionRequest,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
)
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from llmpods_server.count import chat_prompt_tokens

COUNT_PATH = "/extras/tokenize/count"

# The request fields the chat route leaves out before calling create_chat_completion.
CHAT_EXCLUDE = {"n", "logit_bias_type", "user", "min_tokens"}


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


count_router = APIRouter(route_class=RouteErrorHandler)


@count_router.post(
    COUNT_PATH,
    summary="Tokenize Count",
    description=(
        'Count tokens of `{"input": "..."}`, or the prompt tokens of a whole chat completion request '
        "(formatted with the model's chat template, equal to its `usage.prompt_tokens`)."
    ),
    dependencies=[Depends(authenticate)],
    tags=["Extras"],
)
async def count_tokens(
    body: TokenizeInputRequest | CountChatRequest,
    llama_proxy: Annotated[LlamaProxy, Depends(get_llama_proxy)],
) -> TokenizeInputCountResponse:
    llama = llama_proxy(body.model)
    if isinstance(body, TokenizeInputRequest):
        return TokenizeInputCountResponse(count=count_input(llama, body.input))
    return TokenizeInputCountResponse(count=await run_in_threadpool(count_chat_request, llama, body))


def _is_count_route(route: object) -> bool:
    return isinstance(route, APIRoute) and route.path == COUNT_PATH and "POST" in route.methods


def build_app(server_settings: ServerSettings, model_settings: list[ModelSettings]) -> FastAPI:
    """llama-cpp-python's app with its count route swapped for ours.

    The route is dropped from llama-cpp-python's router before ``create_app`` includes it (whether
    FastAPI copies an included router's routes or keeps a reference to the router), then ours is added.
    """
    upstream = llama_server_app.router
    upstream.routes[:] = [route for route in upstream.routes if not _is_count_route(route)]
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    app.include_router(count_router)
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

"""The FastAPI application: routes, and the engine client that lives as long as the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdlab.entrypoints.openai.engine_client import EngineClient
from pdlab.entrypoints.openai.errors import APIError, install_error_handlers
from pdlab.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pdlab.entrypoints.openai.serving import EngineInfo
from pdlab.entrypoints.openai.serving_chat import ServingChat
from pdlab.entrypoints.openai.serving_completion import ServingCompletion
from pdlab.models.tokenizer import TokenizerLike

HEALTH_PING_TIMEOUT_S = 3.0  # a long prefill step can keep the instance from answering for a while
WATCH_INTERVAL_S = 0.5


@dataclass
class ServerConfig:
    info: EngineInfo
    tokenizer: TokenizerLike
    endpoint: str  # the instance's engine-worker-queue port, as a zmq address
    # Why the instance process is gone (its exit code), or None while it runs; polled.
    engine_gone: Callable[[], str | None] | None = None
    on_engine_gone: Callable[[str], None] | None = None  # e.g. stop the HTTP server
    token: bytes | None = None  # the cluster token (None: $PDLAB_CLUSTER_TOKEN, if set)


def build_app(config: ServerConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client = EngineClient(config.endpoint, config.token)
        client.start()
        app.state.client = client
        app.state.completion = ServingCompletion(config.info, config.tokenizer, client)
        app.state.chat = ServingChat(config.info, config.tokenizer, client)
        watcher = asyncio.create_task(_watch(config, client)) if config.engine_gone else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await client.close()

    app = FastAPI(title="pdlab OpenAI-compatible API", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health(request: Request) -> Response:
        client: EngineClient = request.app.state.client
        pong = await client.ping(HEALTH_PING_TIMEOUT_S)
        if pong is None:
            why = client.unavailable or f"no answer within {HEALTH_PING_TIMEOUT_S:.0f} s"
            raise APIError(503, f"the engine instance is not answering: {why}", code="engine_unavailable")
        return JSONResponse({"status": "ok", "role": pong.role, "num_running": pong.num_running,
                             "num_waiting": pong.num_waiting, "num_free_blocks": pong.num_free_blocks,
                             "num_blocks": pong.num_blocks})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.info.model_name, max_model_len=config.info.max_model_len)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await request.app.state.completion.serve(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await request.app.state.chat.serve(body, request)

    return app


async def _watch(config: ServerConfig, client: EngineClient) -> None:
    """Fail every open request, and tell the server, once the instance process is gone."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        why = config.engine_gone()
        if why:
            client.fail_all(why)
            if config.on_engine_gone is not None:
                config.on_engine_gone(why)
            return

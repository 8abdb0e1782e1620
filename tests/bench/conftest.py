"""A fake OpenAI-compatible server on loopback, with known delays, for the benchmark client's tests.

`FakeServer` runs a FastAPI app under uvicorn in a thread of the test process,
so its clock (`time.perf_counter`) is the client's. Each completion streams
`max_tokens` tokens: after `ttft_s` the first chunk, then one chunk every
`itl_s`, each carrying `tokens_per_chunk` tokens; then a usage chunk and
`data: [DONE]`. Every `fail_every`-th request gets HTTP 400, every
`hang_every`-th sends its headers and then nothing. It records when each
request arrived, its body, and the most requests it ever had in flight.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"
CHAT_TEMPLATE_TOKENS = 5  # what the fake's "chat template" adds to a prompt's count


@dataclass
class Received:
    time_s: float  # perf_counter
    path: str
    body: dict


@dataclass
class FakeServer:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    fail_every: int = 0
    hang_every: int = 0
    send_usage: bool = True
    model: str = MODEL
    chat_template_tokens: int = CHAT_TEMPLATE_TOKENS
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.app = self._make_app()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._complete(request, chat=True)

        return app

    async def _complete(self, request: Request, chat: bool):
        body = await request.json()
        with self._lock:
            self.received.append(Received(time.perf_counter(), request.url.path, body))
            number = len(self.received)  # 1-based
        if body.get("model") != self.model:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found"}}, status_code=404)
        if self.fail_every and number % self.fail_every == 0:
            return JSONResponse({"error": {"message": f"fake rejects request {number}", "code": 400}},
                                status_code=400)
        self._enter()
        if chat:
            prompt_tokens = len(body["messages"][0]["content"].split()) + self.chat_template_tokens
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        hang = bool(self.hang_every and number % self.hang_every == 0)
        continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        return StreamingResponse(self._stream(body["max_tokens"], prompt_tokens, chat, hang, continuous),
                                 media_type="text/event-stream")

    async def _stream(self, max_tokens: int, prompt_tokens: int, chat: bool, hang: bool, continuous: bool):
        def event(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:  # chat servers open with a role-only chunk: not a token
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            yield ": keep-alive comment\n\n"
            if hang:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.ttft_s)
            sent = 0
            while sent < max_tokens:
                if sent:
                    await asyncio.sleep(self.itl_s)
                k = min(self.tokens_per_chunk, max_tokens - sent)
                sent += k
                text = "tok " * k
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                choice["finish_reason"] = "length" if sent == max_tokens else None
                chunk = {"choices": [choice]}
                if continuous:
                    chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sent}
                yield event(chunk)
            if self.send_usage:
                yield event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                                                      "total_tokens": prompt_tokens + sent}})
            yield "data: [DONE]\n\n"
        finally:
            self._leave()


@pytest.fixture
def fake_server():
    """Start a `FakeServer` with the given settings: `server = fake_server(ttft_s=0.1)`; all stop at teardown."""
    servers: list[FakeServer] = []

    def start(**settings) -> FakeServer:
        server = FakeServer(**settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

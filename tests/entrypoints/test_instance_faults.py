"""What the API server makes of what its instance reports, against a stand-in instance.

The stand-in is a zmq socket of the test on loopback, where the server's engine
client connects as it would to `python -m pdlab.cluster.instance`; it answers
each `GenerateRequest` with the updates a test scripts, and keeps what it was
sent. Checked: a failure after the stream began ends the stream with an error
event and then `[DONE]`; the request faults an instance reports are HTTP 400s,
its other failures 503s; the `max_tokens` the server asks for when the client
gives none.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from fastapi.testclient import TestClient

from pdlab.cluster.messages import QUEUE_FULL, GenerateRequest, Ping, Pong, RequestUpdate, decode, encode
from pdlab.entrypoints.openai.app import ServerConfig, build_app
from pdlab.entrypoints.openai.serving import EngineInfo
from pdlab.errors import InvalidRequestError
from pdlab.models.presets import PRESETS
from pdlab.models.source import resolve_model
from pdlab.models.tokenizer import encode_chat
from pdlab.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
TOKENIZER = resolve_model("tiny").load_tokenizer()
HELLO = TOKENIZER.encode("Hello", add_special_tokens=False)
CHAT = [{"role": "user", "content": "Name a colour."}]


class FakeInstance:
    """An engine instance as the API server sees it: answers pings, answers each request with `answer(request)`'s
    updates, keeps the requests; `gone` is what the server's watcher reads as the process's exit."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.answer: Callable[[GenerateRequest], list[RequestUpdate]] = finish_at_once
        self.requests: list[GenerateRequest] = []
        self.gone: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            message = decode(frames[-1])
            if isinstance(message, Ping):
                pong = Pong("mixed:fake", "mixed", "tiny", 64, 64, 0, 0, 0, "fake-1")
                self.sock.send_multipart([identity, encode(pong)])
            elif isinstance(message, GenerateRequest):
                self.requests.append(message)
                for update in self.answer(message):
                    self.sock.send_multipart([identity, encode(update)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ctx.destroy(linger=0)


def finish_at_once(request: GenerateRequest) -> list[RequestUpdate]:
    return [RequestUpdate(request.request_id, HELLO, True, "length", None, len(request.prompt_token_ids), "Hello")]


def fail_with(error: str) -> Callable[[GenerateRequest], list[RequestUpdate]]:
    return lambda request: [RequestUpdate(request.request_id, [], True, "error", error)]


@pytest.fixture
def instance() -> Iterator[FakeInstance]:
    fake = FakeInstance()
    yield fake
    fake.close()


@pytest.fixture
def server(instance: FakeInstance) -> Iterator[TestClient]:
    info = EngineInfo("tiny", "mixed", MAX_MODEL_LEN, PRESETS["tiny"].vocab_size)
    app = build_app(ServerConfig(info, TOKENIZER, instance.endpoint, engine_gone=lambda: instance.gone))
    with TestClient(app) as client:  # runs the lifespan: the engine client connects to the stand-in
        yield client


def events(server: TestClient, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, in order."""
    with server.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


BODIES = {
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 8},
    "/v1/chat/completions": {"model": "tiny", "messages": CHAT, "max_tokens": 8},
}


# --- a failure after the stream began -----------------------------------------------------------


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("how", ["the instance fails the request", "the instance process exits"])
def test_a_failure_after_the_stream_began_sends_an_error_event_then_done(instance, server, path: str, how: str):
    def answer(request: GenerateRequest) -> list[RequestUpdate]:
        first = RequestUpdate(request.request_id, HELLO, num_prompt_tokens=len(request.prompt_token_ids))
        if how == "the instance process exits":
            instance.gone = "the engine instance exited with code -9"  # the server's watcher sees it
            return [first]
        return [first, RequestUpdate(request.request_id, [], True, "error", "prefill:8182 stopped answering")]

    instance.answer = answer
    got = events(server, path, BODIES[path])
    texts = [choice.get("text") or choice.get("delta", {}).get("content") or ""
             for event in got[:-2] for choice in json.loads(event)["choices"]]
    assert "".join(texts) == "Hello", got  # the stream had begun: the first tokens went out
    assert got[-1] == "[DONE]", got
    error = json.loads(got[-2])["error"]
    if how == "the instance process exits":
        assert error["code"] == "engine_unavailable" and "exited with code -9" in error["message"], error
    else:
        assert error["code"] == "engine_error" and "prefill:8182 stopped answering" in error["message"], error
    assert error["type"] == "server_error"


# --- what the instance reports, as HTTP statuses -------------------------------------------------------


def sampling_fault() -> str:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(top_k=-5)
    return str(info.value)  # "invalid sampling parameter top_k=-5: ..."


INSTANCE_ERRORS = [
    # (the instance's error, as `LLMEngine.make_request` and `SamplingParams` word it; status, code, param)
    (sampling_fault(), 400, None, "top_k"),
    ("the prompt is empty", 400, None, None),
    (f"the prompt has 300 tokens; this model's context (max_model_len) is {MAX_MODEL_LEN}", 400, None, None),
    ("prompt token ids must be integers in [0, 512)", 400, None, None),
    ("request id 'cmpl-1' is already in use", 400, None, None),
    (f"{QUEUE_FULL}: 8 requests are waiting on mixed:fake (--max-waiting-requests)", 503, "queue_full", None),
    ("KV transfer incomplete: layers [1] of the prompt's blocks never arrived", 503, "engine_error", None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error, status, code, param", INSTANCE_ERRORS, ids=[e[0][:30] for e in INSTANCE_ERRORS])
def test_the_request_faults_an_instance_reports_are_400s_and_its_own_failures_503s(
        instance, server, error: str, status: int, code: str | None, param: str | None, stream: bool):
    instance.answer = fail_with(error)
    response = server.post("/v1/completions", json={**BODIES["/v1/completions"], "stream": stream})
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"].endswith(error) and body["code"] == code and body["param"] == param, body
    assert body["type"] == ("invalid_request_error" if status == 400 else "server_error")
    assert ("retry-after" in response.headers) == (code == "queue_full")


# --- max_tokens when the client gives none -----------------------------------------------------------


def test_max_tokens_the_server_asks_for_when_the_client_gives_none(instance, server):
    def max_tokens_sent(path: str, body: dict) -> int:
        response = server.post(path, json={"model": "tiny", **body})
        assert response.status_code == 200, response.text
        return instance.requests[-1].sampling.max_tokens

    short, long_ = "hi", "x" * 250  # 3 and 251 prompt tokens (BOS and bytes)
    # Completions: OpenAI's default of 16, as far as the context allows; null asks for the whole context.
    assert max_tokens_sent("/v1/completions", {"prompt": short}) == 16
    assert max_tokens_sent("/v1/completions", {"prompt": long_}) == MAX_MODEL_LEN - 251
    assert max_tokens_sent("/v1/completions", {"prompt": short, "max_tokens": None}) == MAX_MODEL_LEN - 3
    # Chat: as long as the context allows (OpenAI's), unless max_completion_tokens or max_tokens says otherwise.
    chat_tokens = len(encode_chat(TOKENIZER, CHAT))
    assert max_tokens_sent("/v1/chat/completions", {"messages": CHAT}) == MAX_MODEL_LEN - chat_tokens
    assert max_tokens_sent("/v1/chat/completions", {"messages": CHAT, "max_tokens": 9}) == 9
    assert max_tokens_sent("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 7}) == 7

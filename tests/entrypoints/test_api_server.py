"""The OpenAI-compatible API server, through the official `openai` client, against the offline API.

Two deployments, each started as FastDeploy's commands start them (one
`api_server` per instance): a colocated (mixed) server, and a prefill server
plus the decode server that clients talk to (`--innode-prefill-ports`, KV over
`ipc`, the default). Both must answer exactly what `pdlab.LLM` answers with
the same engine settings (greedy, or sampling with a seed): the same text and
the same log-probability for every token (the text alone would not do: with
the byte tokenizer of `tiny` most ids decode to the same text as another
id); both must free
every KV block of a request whose client went away; bad requests get OpenAI
error bodies and leave the server serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from pdlab import LLM, SamplingParams

MAX_MODEL_LEN = 512
# The engine settings the servers and the offline LLM they are compared with share.
ENGINE_ARGS = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN)]
LLM_KWARGS = {"device": "cpu", "max_model_len": MAX_MODEL_LEN}
PROMPT = "The lighthouse keeper climbed the stairs"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@dataclass
class Deployment:
    """The server clients talk to, and every server whose instance holds KV blocks for its requests."""

    name: str
    entry: object  # conftest.ApiServer
    instances: list

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.entry.url}/v1", api_key="unused", max_retries=0, timeout=60.0)

    def wait_idle(self) -> None:
        for server in self.instances:
            server.wait_idle()

    def logs(self) -> str:
        return "\n".join(server.logs() for server in self.instances)


@pytest.fixture(scope="module")
def deployments(module_servers) -> dict[str, Deployment]:
    # All three load at once; the decode server waits for its prefill server's instance itself.
    mixed = module_servers.start("mixed", "tiny", ENGINE_ARGS)
    prefill = module_servers.start("prefill", "tiny", ENGINE_ARGS)
    decode = module_servers.start("decode", "tiny", [
        *ENGINE_ARGS, "--innode-prefill-ports", str(prefill.engine_worker_queue_port)])
    for server in (mixed, prefill, decode):
        server.wait_ready()
    return {"mixed": Deployment("mixed", mixed, [mixed]),
            "pd": Deployment("pd", decode, [prefill, decode])}


@pytest.fixture(scope="module", params=["mixed", "pd"])
def deployment(request, deployments: dict[str, Deployment]) -> Iterator[Deployment]:
    d = deployments[request.param]
    yield d
    d.wait_idle()  # no test may leave a request running or a block taken


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", **LLM_KWARGS)


# Two runs of the same engine settings agree to the last bits; 1e-4 leaves room for batching's reduction order.
LOGPROB_TOLERANCE = 1e-4


def offline(llm: LLM, prompt, **params):
    """`LLM.generate` (a str or token ids) or `LLM.chat` (a list of messages)."""
    sp = SamplingParams(**params)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return llm.chat(prompt, sp)[0]
    return llm.generate(prompt, sp)[0]


def token_logprobs(out) -> list[float]:
    """The log-probability of each token `LLM.generate` or `LLM.chat` returned."""
    return [entry[token_id] for entry, token_id in zip(out.logprobs, out.token_ids)]


def api_logprobs(choices) -> list[float]:
    """The log-probability of each token of a completion or chat completion: its choices, or a stream's."""
    values = []
    for choice in choices:
        if choice.logprobs is None:
            continue
        if hasattr(choice.logprobs, "token_logprobs"):
            values += choice.logprobs.token_logprobs
        else:
            values += [c.logprob for c in choice.logprobs.content]
    return values


def assert_same_tokens(got: list[float], want, what: str = "") -> None:
    """The server's per-token log-probabilities are the offline run's: the same tokens, not only the same text."""
    assert len(got) == len(want.token_ids), what
    assert got == pytest.approx(token_logprobs(want), abs=LOGPROB_TOLERANCE), what


def stream_text(chunks) -> tuple[str, str | None, object]:
    """Concatenated text, the finish reason and the usage of a streamed completion or chat completion."""
    text, finish, usage = "", None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


# --- outputs ---------------------------------------------------------------------------------


def test_completion_equals_offline(deployment: Deployment, llm: LLM):
    want = offline(llm, PROMPT, max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    got = deployment.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                                 logprobs=0, extra_body={"ignore_eos": True})
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == "tiny" and got.created
    assert got.choices[0].text == want.text
    assert_same_tokens(api_logprobs(got.choices), want)
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        len(want.prompt_token_ids), len(want.token_ids), len(want.prompt_token_ids) + len(want.token_ids))


def test_token_id_prompt_and_seeded_sampling_equal_offline(deployment: Deployment, llm: LLM):
    ids = llm.tokenizer.encode(PROMPT)
    want = offline(llm, ids, max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True,
                   logprobs=0)
    got = deployment.client().completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0.9, top_p=0.9,
                                                 seed=1234, logprobs=0, extra_body={"top_k": 50, "ignore_eos": True})
    assert got.choices[0].text == want.text
    assert_same_tokens(api_logprobs(got.choices), want)
    assert got.usage.completion_tokens == len(want.token_ids)


def test_streamed_completion_equals_offline(deployment: Deployment, llm: LLM):
    want = offline(llm, PROMPT, max_tokens=32, temperature=0, ignore_eos=True, logprobs=0)
    chunks = list(deployment.client().completions.create(
        model="tiny", prompt=[PROMPT], max_tokens=32, temperature=0, stream=True, logprobs=0,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text, finish, usage = stream_text(chunks)
    assert text == want.text
    assert_same_tokens(api_logprobs(c for chunk in chunks for c in chunk.choices), want)
    assert finish == "length"
    assert usage.completion_tokens == 32 and usage.prompt_tokens == len(want.prompt_token_ids)
    assert chunks[-1].choices == []  # the usage chunk comes last, on its own


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline(deployment: Deployment, llm: LLM, stream: bool):
    want = offline(llm, CHAT, max_tokens=20, temperature=0.7, seed=7, ignore_eos=True, logprobs=0)
    got = deployment.client().chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=20, temperature=0.7, seed=7, stream=stream, logprobs=True,
        extra_body={"ignore_eos": True}, **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        chunks = list(got)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
        text, finish, usage = stream_text(chunks)
        logprobs = api_logprobs(c for chunk in chunks for c in chunk.choices)
    else:
        assert got.id.startswith("chatcmpl-") and got.object == "chat.completion"
        assert got.choices[0].message.role == "assistant"
        text, finish, usage = got.choices[0].message.content, got.choices[0].finish_reason, got.usage
        logprobs = api_logprobs(got.choices)
    assert text == want.text
    assert_same_tokens(logprobs, want)
    assert finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 20)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_cut_the_text_as_offline(deployment: Deployment, llm: LLM, stream: bool):
    free = offline(llm, PROMPT, max_tokens=40, temperature=0, ignore_eos=True).text
    start = next(i for i in range(4, len(free)) if free[i].isalnum())
    stop = [free[start:start + 2], "never-generated"]  # two characters the text reaches after a few tokens
    want = offline(llm, PROMPT, max_tokens=40, temperature=0, ignore_eos=True, stop=stop, logprobs=0)
    assert want.finish_reason == "stop" and want.text == free[:free.index(stop[0])]
    got = deployment.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                                 stop=stop, stream=stream, logprobs=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(got)
        text, finish, _ = stream_text(chunks)
        logprobs = api_logprobs(c for chunk in chunks for c in chunk.choices)
    else:
        text, finish = got.choices[0].text, got.choices[0].finish_reason
        logprobs = api_logprobs(got.choices)
    assert (text, finish) == (want.text, "stop")
    assert_same_tokens(logprobs, want)  # the tokens up to the one that completed the stop string


def test_max_tokens_and_logprobs(deployment: Deployment, llm: LLM):
    want = offline(llm, PROMPT, max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    got = deployment.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                                 logprobs=2, extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.finish_reason == "length" and got.usage.completion_tokens == 5
    assert len(choice.logprobs.tokens) == 5 and all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    expected = [entry[t] for entry, t in zip(want.logprobs, want.token_ids)]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)

    chat = deployment.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0,
                                                      logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


# --- failures ----------------------------------------------------------------------------------


BAD_REQUESTS = [
    # (what, path, raw body, status, the field the error names)
    ("malformed JSON", "/v1/completions", '{"model": "tiny", "prompt": "hi"', 400, None),
    ("a JSON array", "/v1/completions", "[1, 2]", 400, None),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("wrong type", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("prompt of the wrong type", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("a misspelt field", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_token": 5}, 400, "max_token"),
    ("max_tokens too large", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, 400,
     "max_tokens"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    ("chat too long", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]}, 400, "messages"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("token id out of the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [1, 10**6]}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ("negative temperature", "/v1/chat/completions",
     {"model": "tiny", "messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top_p above 1", "/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top_p of 0", "/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("max_tokens of 0", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("n=2", "/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ("n=2, streamed", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 2, "stream": True}, 400, "n"),
    ("unknown role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(deployment: Deployment, what, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(deployment.entry.url + path, content=content, headers={"Content-Type": "application/json"},
                          timeout=30.0)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if what == "unknown model":
        assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]
    if what == "max_tokens too large":  # the numbers that decide it
        assert "10000" in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    assert "Traceback" not in deployment.entry.output()


def test_the_openai_client_sees_errors_and_the_server_keeps_serving(deployment: Deployment):
    client = deployment.client()
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="hi", top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=MAX_MODEL_LEN, stream=True)
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


ABORTED = "the client went away; aborted it on the instance"


def wait_for_abort_logged(deployment: Deployment, num_before: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while deployment.entry.output().count(ABORTED) <= num_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deployment.entry.output().count(ABORTED) > num_before, deployment.logs()


def test_a_client_that_disconnects_mid_stream_frees_every_block(deployment: Deployment):
    num_before = deployment.entry.output().count(ABORTED)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 450, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", deployment.entry.url + "/v1/completions", json=body, timeout=30.0) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(3))]
    assert all(line.startswith("data: ") or not line for line in received)
    wait_for_abort_logged(deployment, num_before)  # it was still running: the server aborted it
    deployment.wait_idle()  # and every block is free again, on both instances of a pair


def test_a_client_that_gives_up_on_a_whole_response_frees_every_block(deployment: Deployment):
    num_before = deployment.entry.output().count(ABORTED)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(deployment.entry.url + "/v1/completions", json=body, timeout=httpx.Timeout(30.0, read=0.2))
    wait_for_abort_logged(deployment, num_before)
    deployment.wait_idle()


def test_concurrent_streams_are_in_flight_together(deployment: Deployment):
    """8 streams at once: every one has its first token before any has its last (continuous batching)."""
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[float, float, int]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=200, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = None
        usage = None
        async for chunk in stream:
            first = first or time.monotonic()
            usage = chunk.usage or usage
        return first, time.monotonic(), usage.completion_tokens

    async def run() -> list[tuple[float, float, int]]:
        client = openai.AsyncOpenAI(base_url=f"{deployment.entry.url}/v1", api_key="unused", max_retries=0,
                                    timeout=60.0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(8)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [n for _, _, n in results] == [200] * 8
    last_first_token = max(first for first, _, _ in results)
    first_finish = min(end for _, end, _ in results)
    assert last_first_token < first_finish, "the streams were served one after another"


def test_health_and_models(deployment: Deployment):
    health = httpx.get(deployment.entry.url + "/health", timeout=10.0)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = deployment.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_a_prefill_server_answers_health_and_models_and_refuses_completions(deployments: dict[str, Deployment]):
    prefill = deployments["pd"].instances[0]
    assert prefill.role == "prefill"
    assert httpx.get(prefill.url + "/health", timeout=10.0).status_code == 200
    assert httpx.get(prefill.url + "/v1/models", timeout=10.0).json()["data"][0]["id"] == "tiny"
    client = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="decode instance"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="decode instance"):
        client.chat.completions.create(model="tiny", messages=CHAT, stream=True)

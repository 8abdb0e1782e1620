"""Bad input: whatever arrives on the HTTP API or the control-plane ports, the instance stays up.

- The HTTP API, fuzzed from its own OpenAPI schema (schemathesis strategies run by Hypothesis, derandomized:
  the same cases every run): valid and schema-violating bodies for /v1/completions and
  /v1/chat/completions, at least 2,000 in all. Never a 5xx; every 4xx has OpenAI's error body; the server and
  its instance keep serving, and nothing is left running.
- Hand-written HTTP cases the fuzzer is unlikely to hit: invalid UTF-8, lone surrogates, huge and negative
  numbers, NaN, huge bodies.
- Malformed, truncated, oversized and deeply nested messages on every control-plane port of a pair
  (engine-worker-queue, cache-queue, pd-comm): dropped and logged, the pair keeps serving.
"""

from __future__ import annotations

import collections
import json
import pickle
import random
import time

import httpx
import msgspec
import pytest
import requests
import schemathesis
import zmq
from hypothesis import HealthCheck, Phase, given, settings

from pdlab import SamplingParams
from pdlab.cluster.launch import free_port
from pdlab.cluster.messages import GenerateRequest, KVLayer, decode, encode, sampling_to_msg

from .conftest import short_request

MAX_LEN = 64  # every valid request ends within 63 tokens: the fuzz stays fast
FUZZ = [  # (path, generation mode, cases)
    ("/v1/completions", schemathesis.GenerationMode.POSITIVE, 550),
    ("/v1/completions", schemathesis.GenerationMode.NEGATIVE, 500),
    ("/v1/chat/completions", schemathesis.GenerationMode.POSITIVE, 550),
    ("/v1/chat/completions", schemathesis.GenerationMode.NEGATIVE, 500),
]


@pytest.fixture(scope="module")
def fuzz_server(module_servers):
    return module_servers.start("mixed", "tiny", ["--device", "cpu", "--max-model-len", str(MAX_LEN)]).wait_ready()


def check_error_body(response: requests.Response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], error


def test_the_http_api_fuzzed_from_its_openapi_schema_never_answers_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    session = requests.Session()
    statuses: collections.Counter = collections.Counter()
    start_s = time.monotonic()
    for path, mode, num_cases in FUZZ:
        @settings(max_examples=num_cases, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(schema[path]["POST"].as_strategy(generation_mode=mode))
        def one(case) -> None:
            response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
            if response.status_code >= 400:
                check_error_body(response)

        one()
    took_s = time.monotonic() - start_s
    num_cases = sum(statuses.values())
    print(f"\nfuzz: {num_cases} cases in {took_s:.0f} s: {dict(statuses)}")
    assert num_cases >= 2000
    assert statuses[200] >= 50, "some fuzzed requests should be valid and served"
    assert fuzz_server.proc.poll() is None and httpx.get(fuzz_server.url + "/health", timeout=10).status_code == 200
    assert "Traceback" not in fuzz_server.output(), fuzz_server.logs()
    fuzz_server.wait_idle()


def raw(text: str) -> bytes:
    return text.encode()


NASTY = [
    # (what, path, raw body)
    ("invalid UTF-8 in the body", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe\xc3("}'),
    ("invalid UTF-8 as the whole body", "/v1/completions", b"\xff" * 64),
    ("a lone surrogate in the prompt", "/v1/completions", raw('{"prompt": "abc \\ud800 def", "max_tokens": 2}')),
    ("a lone surrogate in a chat message", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}')),
    ("a lone surrogate in a stop string", "/v1/completions",
     raw('{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}')),
    ("a lone surrogate as the model", "/v1/completions", raw('{"model": "\\udc80", "prompt": "hi"}')),
    ("a lone surrogate as a field name", "/v1/completions", raw('{"prompt": "hi", "\\ud800": 1}')),
    ("a lone surrogate as the user", "/v1/completions", raw('{"prompt": "hi", "user": "\\ud800", "max_tokens": 2}')),
    ("an empty prompt", "/v1/completions", raw('{"prompt": ""}')),
    ("an empty token list", "/v1/completions", raw('{"prompt": []}')),
    ("an empty chat", "/v1/chat/completions", raw('{"messages": []}')),
    ("an empty body", "/v1/completions", b""),
    ("JSON null", "/v1/completions", b"null"),
    ("a huge max_tokens", "/v1/completions", raw('{"prompt": "hi", "max_tokens": 1000000000000000000000000000000}')),
    ("max_tokens at int64", "/v1/completions", raw('{"prompt": "hi", "max_tokens": 9223372036854775807}')),
    ("a negative max_tokens", "/v1/completions", raw('{"prompt": "hi", "max_tokens": -5}')),
    ("a negative max_completion_tokens", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}')),
    ("a negative seed", "/v1/completions", raw('{"prompt": "hi", "seed": -1, "max_tokens": 2}')),
    ("a seed past 64 bits", "/v1/completions", raw('{"prompt": "hi", "seed": 36893488147419103232, "max_tokens": 2}')),
    ("a negative top_k", "/v1/completions", raw('{"prompt": "hi", "top_k": -7, "max_tokens": 2}')),
    ("a huge top_k", "/v1/completions", raw('{"prompt": "hi", "top_k": 99999999999999999999, "max_tokens": 2}')),
    ("a negative logprobs", "/v1/completions", raw('{"prompt": "hi", "logprobs": -1, "max_tokens": 2}')),
    ("a huge logprobs", "/v1/completions", raw('{"prompt": "hi", "logprobs": 100000, "max_tokens": 2}')),
    ("a huge top_logprobs", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 1000000, '
         '"max_tokens": 2}')),
    ("NaN temperature", "/v1/completions", raw('{"prompt": "hi", "temperature": NaN, "max_tokens": 2}')),
    ("infinite temperature", "/v1/completions", raw('{"prompt": "hi", "temperature": Infinity, "max_tokens": 2}')),
    ("-infinite top_p", "/v1/completions", raw('{"prompt": "hi", "top_p": -Infinity, "max_tokens": 2}')),
    ("a temperature of 1e308", "/v1/completions", raw('{"prompt": "hi", "temperature": 1e308, "max_tokens": 2}')),
    ("a negative token id", "/v1/completions", raw('{"prompt": [1, -3, 5], "max_tokens": 2}')),
    ("a token id past int64", "/v1/completions", raw('{"prompt": [1, 99999999999999999999999], "max_tokens": 2}')),
    ("a negative stop token id", "/v1/completions", raw('{"prompt": "hi", "stop_token_ids": [-1], "max_tokens": 2}')),
    ("a stop token id past int64", "/v1/completions",
     raw('{"prompt": "hi", "stop_token_ids": [99999999999999999999999], "max_tokens": 2}')),
    ("10,000 stop strings", "/v1/completions",
     raw(json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(10000)], "max_tokens": 2}))),
    ("a 4 MB prompt", "/v1/completions", raw(json.dumps({"prompt": "x" * (4 << 20)}))),
    ("20,000 chat messages", "/v1/chat/completions",
     raw(json.dumps({"messages": [{"role": "user", "content": "x"}] * 20000}))),
    ("JSON nested 100,000 deep", "/v1/completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("a string where an object goes", "/v1/chat/completions", raw('{"messages": ["hello"]}')),
    ("content parts of the wrong kind", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}')),
    ("stream as a string", "/v1/completions", raw('{"prompt": "hi", "stream": "yes"}')),
    ("stream_options without stream", "/v1/completions",
     raw('{"prompt": "hi", "stream_options": {"include_usage": true}, "max_tokens": 2}')),
]


@pytest.mark.parametrize("what,path,body", NASTY, ids=[case[0] for case in NASTY])
def test_nasty_http_input_gets_a_4xx_or_an_answer_never_a_5xx(fuzz_server, what: str, path: str, body: bytes):
    logged_before = len(fuzz_server.output())
    response = httpx.post(fuzz_server.url + path, content=body, headers={"Content-Type": "application/json"},
                          timeout=60.0)
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert fuzz_server.proc.poll() is None
    assert "Traceback" not in fuzz_server.output()[logged_before:], fuzz_server.logs()


# --- the control-plane ports ---------------------------------------------------------------------------


def control_garbage() -> dict[str, list[list[bytes]]]:
    """What arrives on a port, by what it is (each entry a list of frames)."""
    request = encode(GenerateRequest("g0", [5, 6, 7], sampling_to_msg(SamplingParams(max_tokens=4))))
    sampling = msgspec.msgpack.encode({"max_tokens": -3})
    return {
        "empty": [[b""]],
        "not msgpack": [[b"\x00\xffgarbage\xfe"], [bytes(random.Random(1).randrange(256) for _ in range(4096))]],
        "truncated": [[request[: len(request) // 2]], [request[:1]]],
        "deeply nested": [[b"\x91" * 200_000 + b"\xc0"]],
        "a huge array header": [[b"\xdd\xff\xff\xff\xff"]],  # claims 4 billion items, holds none
        "invalid UTF-8 in an id": [[b"\x83\xa4type\xafGenerateRequest\xaarequest_id\xa2\xff\xfe"
                                    b"\xb0prompt_token_ids\x91\x05"]],
        "ints past 64 bits": [[b"\x81\xa4type\xa4Ping\xcf" + b"\xff" * 8]],
        "negative max_tokens": [[msgspec.msgpack.encode({"type": "GenerateRequest", "request_id": "neg",
                                                         "prompt_token_ids": [5], "sampling": {"max_tokens": -3}})]],
        "negative token ids": [[encode(GenerateRequest("negtok", [-1, 5], sampling_to_msg(SamplingParams())))]],
        "a pickle": [[pickle.dumps({"type": "Ping"})]],
        "1 MiB of zeros": [[b"\x00" * (1 << 20)]],
        "10 million token ids": [[encode(GenerateRequest("big", [5] * 10_000_000, sampling_to_msg(SamplingParams())))]],
        "KV of a request nobody sent": [[encode(KVLayer("nobody", 0, [0], "float32", (2, 1, 16, 2, 16))),
                                         b"\0" * 8192]],
        "unused sampling": [[sampling]],
    }


def test_malformed_truncated_and_oversized_control_messages_are_dropped_logged_and_survived(cluster):
    pd_ports = {"prefill": free_port(), "decode": free_port()}
    pair = cluster.pair("tiny", "tcp", max_model_len=128, prefill_args=["--pd-comm-port", str(pd_ports["prefill"])],
                        decode_args=["--pd-comm-port", str(pd_ports["decode"])]).wait_ready()
    ports = {
        "engine-worker-queue": [pair.prefill.engine_worker_queue_port, pair.decode.engine_worker_queue_port],
        "cache-queue": [pair.prefill.cache_queue_port, pair.decode.cache_queue_port],
        "pd-comm": [pd_ports["prefill"], pd_ports["decode"]],
    }
    ctx = zmq.Context()
    try:
        replies = []
        for name, numbers in ports.items():
            for port in numbers:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 2000)
                sock.connect(f"tcp://127.0.0.1:{port}")
                for messages in control_garbage().values():
                    for frames in messages:
                        sock.send_multipart(frames)
                replies.append(sock)
                # A frame past what any message or KV layer of this cache can be: zmq drops the connection.
                big = ctx.socket(zmq.DEALER)
                big.setsockopt(zmq.LINGER, 2000)
                big.connect(f"tcp://127.0.0.1:{port}")
                big.send(b"\x00" * (200 << 20))
                big.close()
        for proc in (pair.prefill, pair.decode):
            for name in ports:
                wait_for_log(proc, f"on the {name} port")
        assert pair.prefill.proc.poll() is None and pair.decode.proc.poll() is None, pair.logs()
        # Requests among the garbage that parse are answered like any others: with an error that says why.
        errors = {}
        for sock in replies:
            while sock.poll(200):
                update = decode(sock.recv())
                errors[update.request_id] = update.error
        assert set(errors) == {"neg", "negtok", "big"}, errors  # each of the 6 ports' first answers, by id
        assert "max_tokens" in errors["neg"] and "prompt token ids" in errors["negtok"], errors
        assert errors["big"].startswith("the prompt has 10000000 tokens"), errors
        for sock in replies:
            sock.close()
    finally:
        ctx.destroy(linger=0)
    after = short_request(pair.decode.endpoint, "after")
    assert after.error is None and len(after.token_ids) == 4, (after.error, pair.logs())
    assert "Traceback" not in pair.prefill.log_tail(10_000) + pair.decode.log_tail(10_000)
    pair.wait_idle()


def wait_for_log(proc, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in proc.log_tail(10_000):
        assert time.monotonic() < deadline, f"{proc.role} never logged {text!r}:\n{proc.log_tail(30)}"
        time.sleep(0.05)

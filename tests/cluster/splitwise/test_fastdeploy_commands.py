"""FastDeploy's multi-machine commands (docs/fastdeploy.md), as written but for the model name, the
free ports of a test and `--device cpu` (the four ranks of each instance are gloo processes on the CPU).

A prefill and a decode api_server register with the splitwise scheduler; requests sent to either one's
OpenAI API (any instance's) get the colocated engine's tokens. On this machine there is no RDMA device,
so `rdma,ipc` runs over ipc (both are on one host) and says so in the instance's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pdlab import LLM, SamplingParams
from pdlab.cluster.launch import free_port

from .conftest import new_topic, wait_nodes

MODEL = "tiny-qwen3"  # a shape that shards 4 ways and whose shards wint4 can group
PROMPTS = ["The lighthouse keeper climbed the stairs", "Ships no longer needed the light", "In winter the storms"]


def fastdeploy_command(role: str, redis_port: int, topic: str) -> tuple[list[str], int]:
    port = free_port()
    rdma_ports = ",".join(str(free_port()) for _ in range(4))
    argv = [sys.executable, "-m", "pdlab.entrypoints.openai.api_server",
            "--model", MODEL,
            "--port", str(port), "--metrics-port", str(free_port()),
            "--engine-worker-queue-port", str(free_port()),
            "--cache-queue-port", str(free_port()),
            "--tensor-parallel-size", "4",
            "--quantization", "wint4",
            "--cache-transfer-protocol", "rdma,ipc",
            "--rdma-comm-ports", rdma_ports,
            "--pd-comm-port", str(free_port()),
            "--splitwise-role", role,
            "--scheduler-name", "splitwise",
            "--scheduler-host", "127.0.0.1",
            "--scheduler-port", str(redis_port),
            "--scheduler-ttl", "9000",
            # not FastDeploy's: a CPU machine, this test's own topic, a quick heartbeat
            "--device", "cpu", "--max-model-len", "256", "--scheduler-topic", topic, "--scheduler-heartbeat-s", "0.1"]
    return argv, port


@pytest.fixture
def fastdeploy_pair(redis_server, tmp_path: Path):
    topic = new_topic()
    started = []
    try:
        for role, gpus in (("prefill", "0,1,2,3"), ("decode", "4,5,6,7")):
            argv, port = fastdeploy_command(role, redis_server.port, topic)
            log_dir = tmp_path / f"log_{role}"
            env = {**os.environ, "FD_LOG_DIR": str(log_dir), "CUDA_VISIBLE_DEVICES": gpus,
                   "KVCACHE_RDMA_NICS": "mlx5_2,mlx5_3,mlx5_4,mlx5_5", "OMP_NUM_THREADS": "1"}
            out = open(tmp_path / f"{role}.out", "w")
            started.append((role, port, log_dir, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                                  stdin=subprocess.DEVNULL, env=env)))
        for role, port, log_dir, proc in started:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"{role} exited: {(tmp_path / f'{role}.out').read_text()}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{role} never became healthy"
                time.sleep(0.1)
        wait_nodes(redis_server, topic, 2)
        yield {role: (port, log_dir) for role, port, log_dir, _ in started}
    finally:
        for *_, proc in started:
            proc.send_signal(signal.SIGTERM)
        for *_, proc in started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_fastdeploys_multi_machine_commands_serve_from_either_instance(fastdeploy_pair):
    # The offline engine with the deployment's settings: the same quantized shards, so the same tokens, whose
    # log-probabilities agree to 1e-4. (TP=4 wint4 against TP=1: tests/engine/test_tensor_parallel.py.)
    with LLM(MODEL, device="cpu", max_model_len=256, quantization="wint4", tensor_parallel_size=4) as offline:
        outs = offline.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, logprobs=0))
    want = [(o.text, [entry[t] for entry, t in zip(o.logprobs, o.token_ids)]) for o in outs]
    for role in ("prefill", "decode"):  # any instance's API takes requests
        port, _ = fastdeploy_pair[role]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for p, (text, logprobs) in zip(PROMPTS, want):
            choice = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                               logprobs=0).choices[0]
            assert choice.text == text, role
            assert choice.logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4), role
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                logprobs=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want[0][0]
        streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
        assert streamed == pytest.approx(want[0][1], abs=1e-4)
    for role in ("prefill", "decode"):
        _, log_dir = fastdeploy_pair[role]
        log = "".join(p.read_text() for p in log_dir.glob("*.log"))
        assert "rdma is not usable here" in log and "using ipc" in log, log[-2000:]
        assert "scheduler=splitwise" in log

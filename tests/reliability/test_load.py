"""Load: far more requests than a pair can serve, and nothing lost, nothing hung, nothing leaked.

A burst of 2,000 requests at ten times the capacity of a prefill + decode pair
(measured first, in the same test): every request ends, either with its
tokens (the colocated engine's, for a sample) or with a "queue full" refusal
(`--max-waiting-requests`); afterwards both instances have every block they
started with. Through the API server, the refusal is a 503 with OpenAI's error
body and a Retry-After header.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.messages import QUEUE_FULL
from pdlab.engine.outputs import RequestOutput

from .conftest import percentile, report, rss_mib

MAX_LEN = 256
MAX_TOKENS = 32
NUM_BURST = 2000
MAX_WAITING = 64
MAX_SEQS = 8


def burst_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(8, 64))] for _ in range(n)]


class RssSampler:
    """The peak resident memory of some processes, sampled on a thread while the test runs."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.1) -> None:
        self.pids = pids
        self.every_s = every_s
        self.peak_mib = {name: rss_mib(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for name, pid in self.pids.items():
                self.peak_mib[name] = max(self.peak_mib[name], rss_mib(pid))


def test_a_burst_of_2000_requests_at_10x_capacity_ends_every_request_and_leaks_no_block(cluster):
    pair = cluster.pair("tiny", "tcp", max_model_len=MAX_LEN,
                        prefill_args=["--num-gpu-blocks", "256", "--max-num-batched-tokens", "256"],
                        decode_args=["--num-gpu-blocks", "128", "--max-num-seqs", str(MAX_SEQS),
                                     "--max-waiting-requests", str(MAX_WAITING)]).wait_ready()
    at_start = pair.wait_idle()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine = RemoteEngine(pair.decode.endpoint, poll_s=0.001)
    try:
        # Capacity: as many requests as may wait, served back to back.
        calibration = burst_prompts(MAX_WAITING, seed=1)
        start_s = time.monotonic()
        for i, prompt in enumerate(calibration):
            engine.add_request(prompt, params, f"c{i}")
        calibrated = engine.drain(60.0)
        capacity_rps = len(calibration) / (time.monotonic() - start_s)
        assert all(o.error is None for o in calibrated.values()) and len(calibrated) == len(calibration)

        rate_rps = 10 * capacity_rps
        prompts = burst_prompts(NUM_BURST, seed=2)
        outs: dict[str, RequestOutput] = {}
        with RssSampler({"prefill": pair.prefill.proc.pid, "decode": pair.decode.proc.pid}) as rss:
            start_s = time.monotonic()
            for i, prompt in enumerate(prompts):
                while time.monotonic() < start_s + i / rate_rps:
                    outs.update((o.request_id, o) for o in engine.step() if o.finished)
                engine.add_request(prompt, params, f"b{i}")
            sent_s = time.monotonic()
            deadline_s = sent_s + 120.0
            while engine.has_unfinished() and time.monotonic() < deadline_s:
                outs.update((o.request_id, o) for o in engine.step() if o.finished)
            drained_s = time.monotonic()
        assert not engine.has_unfinished(), f"{len(engine.pending)} requests never ended\n{pair.logs()}"
    finally:
        engine.close()

    completed = [o for o in outs.values() if o.error is None]
    refused = [o for o in outs.values() if o.error is not None and o.error.startswith(QUEUE_FULL)]
    others = {o.request_id: o.error for o in outs.values()
              if o.error is not None and not o.error.startswith(QUEUE_FULL)}
    assert not others, f"errors other than a full queue: {dict(list(others.items())[:5])}\n{pair.logs()}"
    assert len(completed) + len(refused) == NUM_BURST
    assert refused and "--max-waiting-requests" in refused[0].error
    assert len(completed) >= MAX_WAITING + MAX_SEQS, "at least the queue's worth should have been served"
    assert all(len(o.token_ids) == MAX_TOKENS and o.finish_reason == "length" for o in completed)
    # The tokens of a sample are the colocated engine's: nothing was mixed up under load.
    sample = sorted(completed, key=lambda o: int(o.request_id[1:]))[:: max(1, len(completed) // 40)]
    want = LLM("tiny", device="cpu", max_model_len=MAX_LEN).generate([o.prompt_token_ids for o in sample], params)
    assert [o.token_ids for o in sample] == [w.token_ids for w in want]

    at_end = pair.wait_idle()
    assert [p.num_free_blocks for p in at_end] == [p.num_free_blocks for p in at_start]
    latency = lambda group: [o.finish_time_s - o.arrival_time_s for o in group]  # noqa: E731
    report("burst", {
        "requests": NUM_BURST, "capacity_rps": round(capacity_rps, 1), "offered_rps": round(rate_rps, 1),
        "completed": len(completed), "refused_queue_full": len(refused), "other_errors": len(others),
        "completed_p50_s": round(percentile(latency(completed), 50), 3),
        "completed_p99_s": round(percentile(latency(completed), 99), 3),
        "refused_p50_s": round(percentile(latency(refused), 50), 4),
        "refused_p99_s": round(percentile(latency(refused), 99), 4),
        "send_s": round(sent_s - start_s, 2), "drain_s": round(drained_s - sent_s, 2),
        "peak_rss_mib": {k: round(v) for k, v in rss.peak_mib.items()},
        "free_blocks_start_end": [[p.num_free_blocks for p in at_start], [p.num_free_blocks for p in at_end]],
    })


def test_a_slow_client_loses_no_update(cluster):
    """An instance queues every update for a client that stops reading (a ROUTER drops past its
    high-water mark, and the requests whose last update is dropped never end)."""
    pair = cluster.pair("tiny", "tcp", max_model_len=MAX_LEN, decode_args=["--max-num-seqs", "32"]).wait_ready()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine = RemoteEngine(pair.decode.endpoint)
    try:
        for i, prompt in enumerate(burst_prompts(300, seed=3)):
            engine.add_request(prompt, params, f"s{i}")
        # Not reading while the pair serves them all: ~300 x 32 updates queue up for this client.
        deadline = time.monotonic() + 60
        while (pong := ping(pair.decode.endpoint)) is not None and (pong.num_running or pong.num_waiting):
            assert time.monotonic() < deadline, pair.logs()
            time.sleep(0.1)
        outs = engine.drain(30.0)
    finally:
        engine.close()
    assert len(outs) == 300 and all(o.error is None and len(o.token_ids) == MAX_TOKENS for o in outs.values())


def test_the_api_server_answers_a_full_queue_with_503_an_openai_error_and_retry_after(servers):
    server = servers.start("mixed", "tiny", ["--device", "cpu", "--max-model-len", str(MAX_LEN),
                                             "--max-num-seqs", "2", "--max-waiting-requests", "4"]).wait_ready()

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": i % 2 == 0}
        return await client.post("/v1/completions", json=body)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(60)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    # At least the 4 that may wait are served (2 more when the burst finds them running already).
    assert refused and statuses.count(200) >= 4, statuses
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error" and "queue full" in error["message"]
        assert r.headers["Retry-After"] == "1"
    for r in responses:
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    assert "Traceback" not in server.output()
    server.wait_idle()
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    timeout=30.0)
    assert ok.status_code == 200

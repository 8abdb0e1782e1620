"""Prometheus metrics of instance processes, scraped over loopback and checked against what was sent.

Counters must equal exact sums (prompt and output tokens, KV bytes on both
sides of a transfer), histograms must hold one observation per request, gauges
must show an idle cache once the requests are done, and a metrics port in use
must stop the instance at start-up with a message that names it.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import InstanceProcess, free_port, start_instance
from pdlab.cluster.prometheus import FINISH_REASONS, TRANSFER_FAILURES, InstanceMetrics
from pdlab.engine.outputs import RequestOutput
from pdlab.models.presets import PRESETS
from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

ENV = {"OMP_NUM_THREADS": "1"}
MAX_MODEL_LEN = 256
PROMPT_LENGTHS = [1, 5, 16, 17, 40, 3]
MAX_TOKENS = [1, 2, 7, 4, 9, 12]  # ignore_eos: exactly these many each


# --- scraping ------------------------------------------------------------------------------------------


class Scrape:
    """One scrape of /metrics: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def get(self, name: str, **labels: str) -> float:
        """The one sample called `name` whose labels include `labels`."""
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) == 1, f"{len(found)} samples {name}{labels}: {[s for s in self.samples if s.name == name]}"
        return found[0]

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def scrape(port: int) -> Scrape:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    response.raise_for_status()
    return Scrape(response.text)


def kv_bytes_per_block(proc: InstanceProcess, model: str = "tiny") -> tuple[int, int]:
    """(block size, bytes of one block) of a running instance, from its Pong and the model's shape."""
    pong = ping(proc.endpoint)
    element_size = torch.tensor([], dtype=getattr(torch, pong.dtype)).element_size()
    return pong.block_size, PRESETS[model].kv_bytes_per_token(element_size) * pong.block_size


def run_requests(endpoint: str, prompts: list[list[int]], params: list[SamplingParams],
                 timeout_s: float = 120.0) -> dict[str, RequestOutput]:
    engine = RemoteEngine(endpoint)
    outs: dict[str, RequestOutput] = {}
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, p, f"r{i}")
        deadline = time.monotonic() + timeout_s
        while engine.has_unfinished() and time.monotonic() < deadline:
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
    finally:
        engine.close()
    assert len(outs) == len(prompts), f"only {len(outs)} of {len(prompts)} requests finished"
    return outs


def abort_after_first_token(endpoint: str, prompt: list[int], timeout_s: float = 60.0) -> RequestOutput:
    engine = RemoteEngine(endpoint)
    try:
        max_tokens = MAX_MODEL_LEN - len(prompt) - 1  # time enough to abort it
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), "aborted")
        deadline = time.monotonic() + timeout_s
        aborted = False
        while time.monotonic() < deadline:
            for out in engine.step():
                if out.finished:
                    return out
                if out.token_ids and not aborted:
                    engine.abort("aborted")
                    aborted = True
        pytest.fail("the aborted request never finished")
    finally:
        engine.close()


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[3 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    return prompts, params


# --- InstanceMetrics without processes ---------------------------------------------------------------------


def instance_args(transfer_timeout_s: float, extra: list[str], protocol: str = "tcp") -> list[str]:
    return ["--device", "cpu", "--cache-transfer-protocol", protocol, "--max-model-len", str(MAX_MODEL_LEN),
            "--transfer-timeout-s", str(transfer_timeout_s), *extra]


def _request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, list(range(3, 3 + num_prompt_tokens)), SamplingParams(max_tokens=4))


def _output(num_prompt_tokens: int, token_times_s: list[float], finish_time_s: float | None = None,
            reason: str | None = None, arrival_s: float = 0.0) -> RequestOutput:
    first = token_times_s[0] if token_times_s else None
    return RequestOutput("x", [5] * num_prompt_tokens, [7] * len(token_times_s), "", reason is not None, reason,
                         arrival_s, first, list(token_times_s), finish_time_s)


def test_instance_metrics_count_outputs_and_read_the_scheduler_at_scrape_time():
    scheduler = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(num_blocks=10, block_size=4))
    metrics = InstanceMetrics("decode", "d0")
    metrics.watch(scheduler, kv_bytes_per_block=1000)
    labels = {"role": "decode", "instance_id": "d0"}

    s = Scrape(generate_latest(metrics.registry).decode())
    assert s.get("pdlab:kv_cache_num_blocks", **labels) == 10
    assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == 10
    assert s.get("pdlab:kv_cache_usage_perc", **labels) == 0
    for reason in FINISH_REASONS:  # every label value exists from the start, at 0
        assert s.get("pdlab:requests_finished_total", finish_reason=reason, **labels) == 0
    for reason in TRANSFER_FAILURES:
        assert s.get("pdlab:kv_transfers_failed_total", reason=reason, **labels) == 0

    # Queues and blocks, read when scraped: a remote request reserved (transferring), one queued behind it,
    # a held request on the side.
    a, b, held = _request("a", 9), _request("b", 5), _request("h", 2)
    scheduler.add_remote(a)
    scheduler.reserve()
    scheduler.add_remote(b)
    scheduler.block_manager.allocate(held, 2)
    scheduler.held["h"] = held
    s = Scrape(generate_latest(metrics.registry).decode())
    assert s.get("pdlab:num_requests_waiting", **labels) == 2  # one transferring, one waiting for blocks
    assert s.get("pdlab:num_requests_running", **labels) == 0
    assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == 10 - 3 - 1
    assert s.get("pdlab:kv_cache_num_held_blocks", **labels) == 1
    assert s.get("pdlab:kv_cache_usage_perc", **labels) == pytest.approx(0.4)

    # A request streamed in three updates, then one that errs before its first token.
    metrics.on_output(_output(9, [1.0]), 1)
    metrics.on_output(_output(9, [1.0, 1.5]), 1)
    metrics.on_output(_output(9, [1.0, 1.5, 2.5], finish_time_s=2.5, reason="length"), 1)
    metrics.on_output(_output(3, [], finish_time_s=0.5, reason="error"), 0)
    metrics.on_kv_received(9, latency_s=0.02)
    metrics.on_transfer_failed("prefill_lost")
    s = Scrape(generate_latest(metrics.registry).decode())
    assert s.get("pdlab:prompt_tokens_total", **labels) == 9  # the erred one never computed its prompt
    assert s.get("pdlab:generation_tokens_total", **labels) == 3
    assert s.get("pdlab:requests_finished_total", finish_reason="length", **labels) == 1
    assert s.get("pdlab:requests_finished_total", finish_reason="error", **labels) == 1
    assert s.get("pdlab:time_to_first_token_seconds_count", **labels) == 1
    assert s.get("pdlab:time_to_first_token_seconds_sum", **labels) == 1.0
    assert s.get("pdlab:time_per_output_token_seconds_sum", **labels) == 0.75
    assert s.get("pdlab:e2e_request_latency_seconds_count", **labels) == 2
    assert s.get("pdlab:e2e_request_latency_seconds_sum", **labels) == 3.0
    assert s.get("pdlab:kv_transfer_received_bytes_total", **labels) == 3 * 1000  # 9 tokens: 3 blocks of 4
    assert s.get("pdlab:kv_transfers_completed_total", **labels) == 1
    assert s.get("pdlab:kv_transfer_latency_seconds_count", **labels) == 1
    assert s.get("pdlab:kv_transfers_failed_total", reason="prefill_lost", **labels) == 1

    # Its own registry: a second instance's metrics in the same process neither collide nor leak globally.
    other = InstanceMetrics("prefill", "p0")
    other.on_prefill_done(_output(8, [0.5], finish_time_s=0.5, reason="length", arrival_s=0.25), now_s=0.75)
    s = Scrape(generate_latest(other.registry).decode())
    assert s.get("pdlab:prefill_time_seconds_sum", role="prefill", instance_id="p0") == 0.5
    assert s.get("pdlab:kv_transfers_completed_total", role="prefill", instance_id="p0") == 1
    assert REGISTRY.get_sample_value("pdlab:prompt_tokens_total", labels) is None


# --- a mixed instance --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(module_cluster) -> tuple[InstanceProcess, int]:
    port = free_port()
    proc = module_cluster.start("mixed", "tiny", instance_args(3.0, ["--metrics-port", str(port), "--instance-id", "m0"]))
    proc.wait_ready()
    return proc, port


def test_mixed_counters_and_histograms_match_the_requests(mixed):
    proc, port = mixed
    labels = {"role": "mixed", "instance_id": "m0"}
    before = scrape(port)
    prompts, params = workload()
    outs = run_requests(proc.endpoint, prompts, params)
    assert [len(outs[f"r{i}"].token_ids) for i in range(len(prompts))] == MAX_TOKENS

    s = scrape(port)

    def delta(name: str, **extra: str) -> float:
        return s.get(name, **labels, **extra) - before.get(name, **labels, **extra)

    n = len(prompts)
    assert delta("pdlab:prompt_tokens_total") == sum(PROMPT_LENGTHS)
    assert delta("pdlab:generation_tokens_total") == sum(MAX_TOKENS)
    assert delta("pdlab:requests_finished_total", finish_reason="length") == n
    assert delta("pdlab:requests_finished_total", finish_reason="error") == 0
    assert delta("pdlab:time_to_first_token_seconds_count") == n
    assert delta("pdlab:e2e_request_latency_seconds_count") == n
    assert delta("pdlab:time_per_output_token_seconds_count") == sum(m >= 2 for m in MAX_TOKENS)
    assert delta("pdlab:time_to_first_token_seconds_bucket", le="+Inf") == n
    # Measured in the instance: never longer than what the client saw.
    assert delta("pdlab:e2e_request_latency_seconds_sum") <= sum(o.e2e_s for o in outs.values())
    assert s.get("pdlab:kv_transfers_completed_total", **labels) == 0

    # Idle: every block free, no request anywhere.
    assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == s.get("pdlab:kv_cache_num_blocks", **labels) > 0
    assert s.get("pdlab:kv_cache_usage_perc", **labels) == 0
    assert s.get("pdlab:kv_cache_num_held_blocks", **labels) == 0
    assert s.get("pdlab:num_requests_running", **labels) == 0
    assert s.get("pdlab:num_requests_waiting", **labels) == 0


def test_mixed_abort_counts_under_abort(mixed):
    proc, port = mixed
    labels = {"role": "mixed", "instance_id": "m0"}
    before = scrape(port).get("pdlab:requests_finished_total", finish_reason="abort", **labels)
    out = abort_after_first_token(proc.endpoint, list(range(3, 40)))
    assert out.finish_reason == "abort"
    s = scrape(port)
    assert s.get("pdlab:requests_finished_total", finish_reason="abort", **labels) == before + 1
    assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == s.get("pdlab:kv_cache_num_blocks", **labels)


# --- a disaggregated pair ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "ipc"])  # ipc moves no frame: the bytes are counted all the same
def test_pair_counts_the_same_kv_bytes_on_both_sides(cluster, protocol: str):
    prefill_port, decode_port = free_port(), free_port()
    pair = cluster.pair("tiny", protocol, max_model_len=MAX_MODEL_LEN,
                        prefill_args=["--metrics-port", str(prefill_port), "--max-num-batched-tokens", "16"],
                        decode_args=["--metrics-port", str(decode_port)]).wait_ready()
    prompts, params = workload()
    outs = run_requests(pair.decode.endpoint, prompts, params)
    assert not [o.error for o in outs.values() if o.error], pair.logs()
    aborted = abort_after_first_token(pair.decode.endpoint, list(range(3, 30)))
    assert aborted.finish_reason == "abort"
    pair.wait_idle()

    block_size, bytes_per_block = kv_bytes_per_block(pair.decode)
    all_lengths = [*PROMPT_LENGTHS, 27]
    want_bytes = sum(-(-n // block_size) * bytes_per_block for n in all_lengths)
    n = len(all_lengths)
    p, d = scrape(prefill_port), scrape(decode_port)
    prefill = {"role": "prefill", "instance_id": f"prefill:{pair.prefill.engine_worker_queue_port}"}
    decode = {"role": "decode", "instance_id": f"decode:{pair.decode.engine_worker_queue_port}"}
    assert {"role": "prefill"}.items() <= p.labels("pdlab:prompt_tokens_total")[0].items()
    assert {"role": "decode"}.items() <= d.labels("pdlab:prompt_tokens_total")[0].items()

    assert d.get("pdlab:kv_transfer_received_bytes_total", **decode) == want_bytes
    assert p.get("pdlab:kv_transfer_sent_bytes_total", **prefill) == want_bytes
    assert d.get("pdlab:kv_transfers_completed_total", **decode) == n
    assert p.get("pdlab:kv_transfers_completed_total", **prefill) == n
    assert d.get("pdlab:kv_transfer_latency_seconds_count", **decode) == n
    assert p.get("pdlab:prefill_time_seconds_count", **prefill) == n
    assert p.get("pdlab:prompt_tokens_total", **prefill) == sum(all_lengths)
    for reason in TRANSFER_FAILURES:
        assert d.get("pdlab:kv_transfers_failed_total", reason=reason, **decode) == 0

    # The decode side serves the clients: their tokens, finish reasons and latencies.
    assert d.get("pdlab:prompt_tokens_total", **decode) == sum(all_lengths)
    assert d.get("pdlab:generation_tokens_total", **decode) == sum(MAX_TOKENS) + len(aborted.token_ids)
    assert d.get("pdlab:requests_finished_total", finish_reason="length", **decode) == len(PROMPT_LENGTHS)
    assert d.get("pdlab:requests_finished_total", finish_reason="abort", **decode) == 1
    assert d.get("pdlab:time_to_first_token_seconds_count", **decode) == n
    assert d.get("pdlab:e2e_request_latency_seconds_count", **decode) == n
    assert p.get("pdlab:generation_tokens_total", **prefill) == 0
    for s, labels in ((p, prefill), (d, decode)):
        assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == s.get("pdlab:kv_cache_num_blocks", **labels)


def test_decode_without_a_reachable_prefill_counts_a_timeout(cluster):
    metrics_port = free_port()
    decode = cluster.start("decode", "tiny", instance_args(
        0.5, ["--innode-prefill-ports", str(free_port()), "--metrics-port", str(metrics_port)]))
    decode.wait_ready()
    outs = run_requests(decode.endpoint, [[5, 6, 7]], [SamplingParams(max_tokens=4)], timeout_s=30.0)
    assert outs["r0"].finish_reason == "error" and "no prefill instance accepted" in outs["r0"].error
    labels = {"role": "decode", "instance_id": f"decode:{decode.engine_worker_queue_port}"}
    s = scrape(metrics_port)
    assert s.get("pdlab:kv_transfers_failed_total", reason="timeout", **labels) == 1
    assert s.get("pdlab:kv_transfers_completed_total", **labels) == 0
    assert s.get("pdlab:requests_finished_total", finish_reason="error", **labels) == 1
    assert s.get("pdlab:kv_cache_num_free_blocks", **labels) == s.get("pdlab:kv_cache_num_blocks", **labels)


# --- start-up ----------------------------------------------------------------------------------------------


def test_a_metrics_port_in_use_stops_the_instance_with_an_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_instance("mixed", "tiny", tmp_path, extra_args=["--device", "cpu", "--metrics-port", str(port)],
                              env=ENV)
        try:
            assert proc.proc.wait(60) == 2, proc.log_tail()
        finally:
            proc.kill()
    log = proc.log_tail()
    assert f"--metrics-port {port}" in log and "Traceback" not in log, log

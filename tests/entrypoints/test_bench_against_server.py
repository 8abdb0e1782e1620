"""`pdlab.bench` against a real pdlab api_server: its numbers agree with the server's own counters."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdlab.bench import BenchConfig, run_benchmark


def scrape(port: int) -> dict[str, float]:
    """Sample name (with labels flattened away) -> summed value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items())
                                        if k == "finish_reason")
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_bench_records_match_the_server_counters(servers):
    server = servers.start("mixed", "tiny", ["--device", "cpu", "--max-model-len", "512"]).wait_ready()
    before = scrape(server.metrics_port)
    config = BenchConfig(base_url=server.url, num_prompts=12, input_len="uniform:8:64", output_len="uniform:4:24",
                         request_rate_rps=20.0, seed=3, prompt_token_ids=True, tokenizer="tiny", progress=False)
    records, summary = run_benchmark(config)
    server.wait_idle()
    after = scrape(server.metrics_port)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    assert len(records) == 12 and all(r.ok for r in records), [r.error for r in records if r.error]
    assert summary["num_completed"] == 12
    assert delta["pdlab:prompt_tokens_total"] == sum(r.num_prompt_tokens for r in records)
    assert delta["pdlab:generation_tokens_total"] == sum(r.num_output_tokens for r in records)
    assert delta["pdlab:requests_finished_total|finish_reason=length"] == 12
    assert delta["pdlab:time_to_first_token_seconds_count"] == 12
    assert delta["pdlab:e2e_request_latency_seconds_count"] == 12
    # The client's latencies include the HTTP hop, so they are at least the server's.
    server_e2e_s = delta["pdlab:e2e_request_latency_seconds_sum"]
    assert sum(r.e2e_s for r in records) >= server_e2e_s * 0.95

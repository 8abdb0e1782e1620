"""The benchmark's flag syntax and configuration checks."""

from __future__ import annotations

import math

import pytest

from pdlab.bench.cli import build_parser, config_from_args
from pdlab.bench.config import BenchConfig, parse_length
from pdlab.errors import ConfigError
from pdlab.workload.arrivals import BurstArrivals, ConstantArrivals, GammaArrivals, PoissonArrivals
from pdlab.workload.lengths import FixedLength, LognormalLength, UniformLength


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", FixedLength(512)),
        (64, FixedLength(64)),
        ("fixed:7", FixedLength(7)),
        ("uniform:128:1024", UniformLength(128, 1024)),
        ("lognormal:median=512,sigma=0.8,max=4096", LognormalLength(512, 0.8, 1, 4096)),
        ("lognormal:median=100,sigma=0.5,min=10", LognormalLength(100, 0.5, 10, None)),
        ("lognormal:mean=300,sigma=1", LognormalLength.from_mean(300, 1.0)),
        ("lognormal:median=100,p90=400", LognormalLength.from_p90(100, 400)),
    ],
)
def test_length_syntax(text, expected):
    assert parse_length(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zipf:3", "expected N, fixed:N"),
        ("uniform:10", "not enough values"),
        ("uniform:10:5", "must be >="),
        ("0", "must be >= 1"),
        ("lognormal:median=5", "sigma= and p90="),
        ("lognormal:median=5,mean=4,sigma=1", "median= and mean="),
        ("lognormal:median=5,sigma=1,tail=3", "unknown lognormal parameter"),
        ("fixed:many", "invalid literal"),
    ],
)
def test_bad_lengths_name_the_flag(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_length(text, "input-len")
    assert "--input-len" in str(info.value)


def test_config_turns_flag_strings_into_distributions():
    config = BenchConfig(input_len="uniform:1:9", output_len=4, base_url="http://h:1/")
    assert config.input_len == UniformLength(1, 9) and config.output_len == FixedLength(4)
    assert config.url == "http://h:1/v1/completions"


@pytest.mark.parametrize(
    ("settings", "process"),
    [
        ({}, BurstArrivals()),
        ({"request_rate_rps": 4.0}, PoissonArrivals(4.0)),
        ({"request_rate_rps": 4.0, "arrival": "constant"}, ConstantArrivals(4.0)),
        ({"request_rate_rps": 4.0, "arrival": "gamma", "cv": 3.0}, GammaArrivals(4.0, 3.0)),
    ],
)
def test_arrival_process_follows_rate_and_kind(settings, process):
    assert BenchConfig(**settings).arrival_process() == process


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint must be one of"),
        ({"base_url": "localhost:8000"}, "http://"),
        ({"num_prompts": 0}, "num_prompts"),
        ({"request_rate_rps": 0.0}, "request_rate"),
        ({"cv": 2.0}, "gamma"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"trace_arrivals": True}, "needs a trace"),
        ({"prompt_token_ids": True, "endpoint": "/v1/chat/completions"}, "/v1/completions"),
        ({"prompt_token_ids": True, "tokenizer": "none"}, "tokenizer"),
        ({"slo_ttft_ms": -1.0}, "slo_ttft_ms"),
    ],
)
def test_bad_configs_are_rejected(settings, message):
    with pytest.raises(ConfigError, match=message):
        BenchConfig(**settings)


def parse(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_cli_flags_map_to_the_config():
    config = parse("--port", "9001", "--endpoint", "/v1/chat/completions", "--num-prompts", "7", "--input-len",
                   "uniform:2:8", "--request-rate", "3", "--max-concurrency", "2", "--no-ignore-eos",
                   "--temperature", "0", "--slo-ttft-ms", "250", "--slo-tpot-ms", "100", "--label", "vllm",
                   "--extra-body", '{"top_k": 5}')
    assert config.url == "http://127.0.0.1:9001/v1/chat/completions"
    assert config.num_prompts == 7 and config.input_len == UniformLength(2, 8) and config.output_len is None
    assert config.arrival_process() == PoissonArrivals(3.0) and config.max_concurrency == 2
    assert not config.ignore_eos and config.temperature == 0.0 and config.extra_body == {"top_k": 5}
    assert config.slo_ttft_s == 0.25 and config.slo_tpot_s == 0.1 and config.label == "vllm"
    assert math.isinf(parse().request_rate_rps) and parse("--base-url", "http://x:1").base_url == "http://x:1"


def test_cv_and_vllm_burstiness_both_mean_gamma():
    assert parse("--request-rate", "2", "--cv", "2").arrival_process() == GammaArrivals(2.0, 2.0)
    # vLLM's burstiness is the gamma shape: 0.25 is cv 2, burstier than Poisson.
    assert parse("--request-rate", "2", "--burstiness", "0.25").arrival_process() == GammaArrivals(2.0, 2.0)
    with pytest.raises(SystemExit):
        parse("--cv", "2", "--burstiness", "1")
    with pytest.raises(ConfigError, match="gamma"):
        parse("--arrival", "poisson", "--cv", "2")

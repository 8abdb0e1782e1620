import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pdlab.errors import ConfigError
from pdlab.experiment import Experiment, load_experiment, parse_experiment
from pdlab.workload import LognormalLength, make_workload
from tests.workload.synthetic_trace import write_trace

REPO = Path(__file__).parents[1]
TRACES = REPO / ".." / "shared" / "data" / "traces"

BASE = """\
name: t
workload:
  num_requests: 4
  arrival: {kind: poisson, rate_rps: 1}
  prompt_len: {kind: fixed, tokens: 8}
  output_len: {kind: fixed, tokens: 8}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    return message.removeprefix(str(path))


def test_quickstart_loads_and_builds_its_workload():
    experiment = load_experiment(REPO / "experiments" / "quickstart.yaml")
    assert experiment.name == "quickstart" and experiment.seed == 0
    assert experiment.model.name == "smollm2"
    assert experiment.engine.enable_chunked_prefill
    assert [run.mode for run in experiment.runs] == ["colocated", "disaggregated"]
    assert experiment.slo.ttft_s == 1.0 and experiment.slo.tpot_s == 0.2
    assert experiment.workload.text_prompts[0] == "What is the capital of France?"
    requests = make_workload(experiment.workload.to_spec(), 49_152, experiment.seed)
    assert len(requests) == 32
    assert all(r.num_prompt_tokens <= 256 and 16 <= r.max_tokens <= 48 for r in requests)


def test_defaults_and_shorthands(tmp_path):
    experiment = load_experiment(write(tmp_path, BASE + "model: smollm2\n"))
    assert experiment.model.name == "smollm2" and experiment.model.dtype == "auto"
    assert [run.name for run in experiment.runs] == ["colocated"]
    assert experiment.output_dir == Path("results")
    assert experiment.slo.ttft_s is None
    params = experiment.sampling.to_params(max_tokens=12, seed=3)
    assert (params.max_tokens, params.seed, params.temperature) == (12, 3, 1.0)


def test_engine_kwargs_match_the_engine_config():
    from pdlab.engine.config import EngineConfig

    kwargs = load_experiment(REPO / "experiments" / "quickstart.yaml").engine_kwargs()
    assert set(kwargs) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert EngineConfig(**kwargs).max_num_batched_tokens == 512


def test_lognormal_can_be_given_three_ways(tmp_path):
    def prompt_len(spec: str) -> LognormalLength:
        text = BASE.replace("prompt_len: {kind: fixed, tokens: 8}", f"prompt_len: {{kind: lognormal, {spec}}}")
        return load_experiment(write(tmp_path, text)).workload.to_spec().prompt_len

    assert prompt_len("median_tokens: 64, sigma: 0.5") == LognormalLength(64, 0.5)
    assert prompt_len("mean_tokens: 64, sigma: 0.5").mean_tokens == pytest.approx(64)
    by_p90 = prompt_len("median_tokens: 64, p90_tokens: 128, max_tokens: 512")
    assert by_p90.median_tokens == 64 and by_p90.max_tokens == 512
    assert np.percentile(by_p90.sample(100_000, np.random.default_rng(0)), 90) == pytest.approx(128, rel=0.03)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("engine:\n  blok_size: 16\n", ":8: engine.blok_size: unknown key (did you mean block_size?)"),
        ("nmae: x\n", ":7: nmae: unknown key (did you mean name?)"),
        ("engine:\n  block_size: sixteen\n", ":8: engine.block_size: Input should be a valid integer"),
        ("seed: 1.5\n", ":7: seed: Input should be a valid integer, got a number with a fractional part (got 1.5)"),
        ("model: {dtype: fp8}\n", ":7: model.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ("runs:\n  - {name: a}\n  - {name: b, mode: sideways}\n", ":9: runs[1].mode: Input should be 'colocated'"),
        ("runs:\n  - {name: a}\n  - {name: a}\n", ":7: runs: run names must be unique"),
        ("sampling: {top_p: 0}\n", ":7: sampling.top_p: Input should be greater than 0 (got 0)"),
        ("engine: {max_model_len: 10}\n", ":2: workload: requests can need up to 16 prompt + output tokens, more than"),
        ("  trace: nowhere.csv\n", ":7: workload.trace: no such file: nowhere.csv"),
    ],
)
def test_mistakes_name_the_line_and_the_field(tmp_path, extra, expected):
    message = error_of(tmp_path, BASE + extra)
    assert message.startswith(expected), message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("rate_rps: 1", "rate_rps: 0", ":4: workload.arrival.rate_rps: Input should be greater than 0"),
        ("poisson", "poison", ":4: workload.arrival.kind: unknown kind 'poison'; expected one of poisson, gamma,"),
        ("kind: poisson, ", "", ":4: workload.arrival.kind: missing; expected one of poisson, gamma, constant, burst"),
        (
            "tokens: 8}\n  output",
            "tokens: 8, foo: 1}\n  output",
            ":5: workload.prompt_len.foo: unknown key; known keys: kind, tokens",
        ),
        (
            "{kind: fixed, tokens: 8}\n  output",
            "{kind: lognormal, median_tokens: 8}\n  output",
            ":5: workload.prompt_len: give exactly one of sigma and p90_tokens",
        ),
        (
            "output_len: {kind: fixed, tokens: 8}",
            "output_len: {kind: uniform, min_tokens: 9, max_tokens: 3}",
            ":6: workload.output_len: max_tokens (3) must be >= min_tokens (9)",
        ),
        ("  num_requests: 4\n", "", ":2: workload.num_requests: missing required key"),
        (
            "kind: poisson, rate_rps: 1",
            "kind: trace",
            ":2: workload: arrival has kind 'trace' but no trace file is given",
        ),
    ],
)
def test_workload_mistakes_name_the_field(tmp_path, old, new, expected):
    message = error_of(tmp_path, BASE.replace(old, new))
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [1, 2\n", ":2:1: malformed YAML: expected ',' or ']'"),
        ("name: a\n  seed: 1\n", ":2:7: malformed YAML: mapping values are not allowed here"),
        (BASE + "name: y\n", ":7:1: malformed YAML: duplicate key 'name'"),
        ("", ": expected a mapping of settings (name, workload, ...) at the top level, got an empty document"),
        ("- a\n- b\n", ": expected a mapping of settings (name, workload, ...) at the top level, got a list"),
    ],
)
def test_malformed_yaml_gives_its_position(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert message.startswith(expected), message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")


def test_several_mistakes_are_reported_together(tmp_path):
    message = error_of(tmp_path, BASE + "seed: -1\nengine: {block_size: 0}\n")
    assert message.count("\n") == 1 and "seed: Input should be greater than or equal to 0" in message
    assert "engine.block_size: Input should be greater than 0" in message


def test_parse_experiment_without_a_file():
    experiment = parse_experiment(
        {
            "name": "n",
            "workload": {
                "num_requests": 1,
                "arrival": {"kind": "burst"},
                "prompt_len": {"kind": "fixed", "tokens": 1},
                "output_len": {"kind": "fixed", "tokens": 1},
            },
        }
    )
    assert isinstance(experiment, Experiment)
    with pytest.raises(ConfigError, match=r"^<experiment>: workload: missing required key$"):
        parse_experiment({"name": "n"})


def test_experiments_are_frozen(tmp_path):
    experiment = load_experiment(write(tmp_path, BASE))
    with pytest.raises(Exception, match="frozen"):
        experiment.seed = 3


@pytest.mark.parametrize("which", ["synthetic", pytest.param("azure_conv_2023", marks=pytest.mark.skipif(
    not TRACES.is_dir(), reason=f"no shared traces at {TRACES}"))])
def test_trace_replay_experiment(tmp_path, which: str):
    if which == "synthetic":  # the layout of the shared traces, which must not be copied here
        written = write_trace(tmp_path / "synthetic_conv.csv", num_requests=400)
        trace, first_rows = written.path, (written.num_prompt_tokens[:4], written.num_output_tokens[:4])
    else:
        trace, first_rows = (TRACES / f"{which}.csv").resolve(), ([374, 396, 879, 91], [44, 109, 55, 16])
    text = f"""\
    name: replay
    workload:
      num_requests: 100
      trace: {trace}
      arrival: {{kind: trace, rate_rps: 2.0}}
      prompt_len: {{kind: trace, replay: true, max_tokens: 2048}}
      output_len: {{kind: trace, replay: true}}
    """
    requests = make_workload(load_experiment(write(tmp_path, text)).workload.to_spec(), 49_152, 0)
    assert 99 / requests[-1].arrival_s == pytest.approx(2.0)
    # The trace's first rows (prompts capped at 2048 tokens).
    assert [r.num_prompt_tokens for r in requests[:4]] == [min(int(n), 2048) for n in first_rows[0]]
    assert [r.max_tokens for r in requests[:4]] == [int(n) for n in first_rows[1]]


def test_workload_metrics_experiment_and_plots_are_torch_free():
    modules = ["pdlab.workload", "pdlab.metrics", "pdlab.experiment", "pdlab.plots"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["workload.num_request=8"], "--set workload.num_request=8: unknown key (did you mean num_requests?)"),
        (["workload.num_requests=-3"], "--set workload.num_requests=-3: Input should be greater than 0 (got -3)"),
        (["worklod.num_requests=8"], "--set worklod.num_requests=8: worklod: unknown key (did you mean workload?)"),
        (["workload.prompt_len={kind: fixed, tokens: 8, tokns: 2}"],
         "--set workload.prompt_len={kind: fixed, tokens: 8, tokns: 2}: workload.prompt_len.tokns: unknown key"),
        # a check across sections: the override it names
        (["engine.max_model_len=10"],
         "--set engine.max_model_len=10: workload: requests can need up to 16 prompt + output tokens"),
        (["seed=1", "workload.trace=nowhere.csv"], "--set workload.trace=nowhere.csv: no such file: nowhere.csv"),
        (["workload.num_requests"], "--set workload.num_requests: expected dotted.key=value"),
        (["runs.3.name=x"], "--set runs.3.name=x: 3 is not an index of a list of 1"),
    ],
)
def test_a_mistake_in_an_override_names_the_override_not_the_file(tmp_path, overrides, expected):
    path = write(tmp_path, BASE + "runs: [{name: a}]\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    assert str(info.value).startswith(expected), str(info.value)
    assert str(path) not in str(info.value)


def test_a_mistake_in_the_file_still_names_the_file_beside_overrides(tmp_path):
    path = write(tmp_path, BASE + "sampling: {top_p: 0}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:7: sampling\.top_p: Input should be greater than 0") as info:
        load_experiment(path, ["workload.num_requests=8", "seed=3"])
    assert "--set" not in str(info.value)

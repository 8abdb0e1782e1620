"""ProfileCost: interpolation of a measured step-time table, and the profile CLI feeding it."""

import pytest

from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest, SchedulerConfig
from pdlab.sampling_params import SamplingParams
from pdlab.sim import InstanceSpec, Layout, simulate
from pdlab.sim.profile_cost import ProfileCost
from pdlab.workload.workload import RequestSpec

ROWS = [
    {"phase": "prefill", "num_seqs": 1, "num_tokens": 100, "context_tokens": 100, "step_ms": 10},
    {"phase": "prefill", "num_seqs": 1, "num_tokens": 200, "context_tokens": 200, "step_ms": 20},
    {"phase": "decode", "num_seqs": 1, "num_tokens": 1, "context_tokens": 100, "step_ms": 5},
    {"phase": "decode", "num_seqs": 9, "num_tokens": 9, "context_tokens": 100, "step_ms": 7},
    {"phase": "decode", "num_seqs": 1, "num_tokens": 1, "context_tokens": 300, "step_ms": 6},
    {"phase": "decode", "num_seqs": 9, "num_tokens": 9, "context_tokens": 300, "step_ms": 10},
]


def batch(*items):
    """items: (start, num_tokens) with the request's tokens ending at start + num_tokens."""
    return ScheduledBatch([ScheduledRequest(Request(f"r{i}", [5] * (s + n), SamplingParams()), s, n, True)
                           for i, (s, n) in enumerate(items)])


def test_interpolates_and_extrapolates():
    cost = ProfileCost.from_rows(ROWS)
    assert cost.step_time_s(batch((0, 150))) == pytest.approx(0.015)
    assert cost.step_time_s(batch((0, 400))) == pytest.approx(0.040)  # linear past the end
    assert cost.step_time_s(batch((0, 10))) == pytest.approx(0.010)  # never below the smallest row
    assert cost.step_time_s(batch(*[(99, 1)] * 5)) == pytest.approx(0.006)  # context 100, 5 seqs
    assert cost.step_time_s(batch(*[(199, 1)] * 5)) == pytest.approx(0.007)  # between contexts 100 and 300
    mixed = cost.step_time_s(batch((0, 150), (99, 1)))
    assert mixed == pytest.approx(max(0.0151, 0.005))


def test_a_mixed_step_adds_the_decodes_attention_over_their_context_to_one_pass_over_all_tokens():
    cost = ProfileCost.from_rows(ROWS)
    # A 100-token chunk beside 9 decodes at context 300: one pass over 109 tokens (10.9 ms) plus what
    # context 300 adds to 9 decodes over the shortest profiled context (10 - 7 ms).
    assert cost.step_time_s(batch((0, 100), *[(299, 1)] * 9)) == pytest.approx(0.0109 + 0.003)
    # Never less than the decodes alone: 9 decodes at context 300 next to a 1-token chunk.
    tiny = ProfileCost.from_rows([{**r, "step_ms": 1} if r["phase"] == "prefill" else r for r in ROWS])
    assert tiny.step_time_s(batch((0, 2), *[(299, 1)] * 9)) == pytest.approx(0.010)


def test_a_chunk_after_cached_tokens_adds_their_attention_from_the_prefill_rows_quadratic_part():
    a, b = 1e-4, 1e-8  # seconds per token, per token pair
    rows = [{"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n, "step_ms": (a * n + b * n * n) * 1e3}
            for n in (256, 1024, 2048)] + ROWS[2:]
    cost = ProfileCost.from_rows(rows)
    assert cost.attention_s_per_token_pair == pytest.approx(b)
    whole = cost.step_time_s(batch((0, 2048)))
    assert cost.step_time_s(batch((1024, 1024))) == pytest.approx(cost.prefill_s(1024) + 2 * b * 1024 * 1024)
    # A prompt in two chunks costs what it costs in one step (here exactly: the rows are a * n + b * n^2).
    assert cost.step_time_s(batch((0, 1024))) + cost.step_time_s(batch((1024, 1024))) == pytest.approx(whole)
    assert ProfileCost.from_rows(ROWS).attention_s_per_token_pair == 0.0  # linear rows: no such term


def test_profile_cli_table_drives_the_simulator(tmp_path):
    from pdlab.profiler import main

    out = tmp_path / "tiny.csv"
    assert main(["--model", "tiny", "--device", "cpu", "--prefill-tokens", "8,32", "--decode-batches", "1,4",
                 "--decode-contexts", "16,32", "--repeats", "1", "--recheck", "0", "--out", str(out)]) == 0
    cost = ProfileCost.from_csv(out)
    assert len(cost.prefill) == 2 and len(cost.decode) == 2
    layout = Layout(InstanceSpec(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128), 64))
    records = simulate([RequestSpec(f"r{i}", 0.0, (100,) * 20, 8) for i in range(4)], layout, cost)
    assert all(r.ok and r.ttft_s > 0 for r in records)


def test_decode_rows_time_the_whole_batch_even_when_its_prefill_takes_many_steps(monkeypatch):
    # 8 prompts of 96 tokens at 32 batched tokens a step: the first prompts decode for ~24 steps beside the
    # others' chunks before timing starts. Every timed step must still decode all 8.
    from pdlab.engine.engine import LLMEngine
    from pdlab.profiler import profile_engine

    seen = []
    real_step = LLMEngine.step

    def step(self, push_plan=None):
        out = real_step(self, push_plan)
        seen.append(sum(1 for o in out if len(o.token_ids) > 1))  # decodes of this step
        return out

    monkeypatch.setattr(LLMEngine, "step", step)
    rows = profile_engine("tiny", "cpu", "float32", prefill_tokens=[32], decode_batches=[8], decode_contexts=[96],
                          repeats=3)
    decode = [r for r in rows if r["phase"] == "decode"]
    assert len(decode) == 1 and decode[0]["num_seqs"] == 8
    assert seen[-4:] == [8, 8, 8, 8]  # the timed steps (one untimed + three timed), all eight decoding


def test_profiler_refuses_a_bad_mps_load_in_one_line(capsys):
    from pdlab import profiler

    for bad in ("matmul", "matmul:0", "matmul:101", "spin:50", "copy:x"):
        with pytest.raises(SystemExit) as exit_:
            profiler.main(["--beside", bad])
        assert exit_.value.code == 2
        assert "--beside takes KIND:PERCENT" in capsys.readouterr().err
    assert profiler.parse_beside("copy:40") == ("copy", 40)
    with pytest.raises(SystemExit):
        profiler.main(["--sm-percentage", "0"])
    assert "--sm-percentage must be in 1..100" in capsys.readouterr().err
    for bad in (["--beside", "matmul:60"], ["--sm-percentage", "40"]):  # time-sliced: no SM limits to set
        with pytest.raises(SystemExit):
            profiler.main(["--sharing", "time", *bad])
        assert "--sharing time has no SM limits" in capsys.readouterr().err


def test_profiler_under_mps_without_the_daemon_says_why(monkeypatch, capsys):
    from pdlab import profiler
    from pdlab.cluster import mps

    monkeypatch.setattr(mps.shutil, "which", lambda name: None)  # no nvidia-cuda-mps-control on PATH
    assert profiler.main(["--sm-percentage", "40", "--beside", "matmul:60"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA MPS needs nvidia-cuda-mps-control") and "Traceback" not in err


def test_a_profile_retimes_rows_across_the_table_and_fails_when_they_disagree(tmp_path, monkeypatch, capsys):
    from pdlab import profiler

    rows = [{"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n, "step_ms": 10.0 * n}
            for n in (8, 32)]
    rows += [{"phase": "decode", "num_seqs": b, "num_tokens": b, "context_tokens": c, "step_ms": 5.0 + b}
             for c in (16, 32) for b in (1, 4)]
    picked = profiler.recheck_rows(rows, 3)
    assert [(r["phase"], r["num_seqs"], r["context_tokens"]) for r in picked] == [
        ("prefill", 1, 32), ("decode", 1, 16), ("decode", 4, 32)]
    assert all("step_ms" not in r for r in picked)
    close = [{**r, "again_ms": 1.04 * next(x["step_ms"] for x in rows if x["phase"] == r["phase"]
                                            and x["num_tokens"] == r["num_tokens"]
                                            and x["context_tokens"] == r["context_tokens"])} for r in picked]
    assert profiler.disagreements(rows, close) == []
    far = [dict(close[0], again_ms=close[0]["again_ms"] * 1.1)] + close[1:]
    assert profiler.disagreements(rows, far) == ["prefill of 1 x 32 tokens: 320.00 ms in the table, "
                                                  "366.08 ms again (+14%)"]

    # Through the command: the tiny model on CPU, with the second timing of each row made 10% slower.
    real_profile = profiler.profile_engine

    def slow_again(*args, checks=None, **kwargs):
        rows = real_profile(*args, checks=checks, **kwargs)
        for c in checks:
            c["again_ms"] = 1.1 * next(r["step_ms"] for r in rows if r["phase"] == c["phase"]
                                       and r["num_tokens"] == c["num_tokens"]
                                       and r["context_tokens"] == c["context_tokens"])
        return rows

    monkeypatch.setattr(profiler, "profile_engine", slow_again)
    out = tmp_path / "tiny.csv"
    assert profiler.main(["--model", "tiny", "--device", "cpu", "--prefill-tokens", "8", "--decode-batches", "1",
                          "--decode-contexts", "16", "--repeats", "1", "--out", str(out)]) == 1
    assert out.exists() and "2 of 2 rows timed again differ by more than 5%" in capsys.readouterr().err


def test_an_engine_load_keeps_its_batch_serving():
    from pdlab.profiler import engine_load

    step = engine_load("tiny", "float32", batch=3, prompt=40, max_tokens=5, device="cpu")
    for _ in range(12):  # 3 prompts in one step, 4 decode steps, then 3 new ones: never fewer than 3 requests
        step()
    engine = step.engine
    assert len(engine.scheduler.requests) == 3
    assert engine.scheduler.num_running == 3

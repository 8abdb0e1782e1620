"""The placement search: candidates stay within the budget, results rank by per-GPU goodput."""

import pytest

from pdlab.models.presets import PRESETS
from pdlab.sim.search import Candidate, PlacementProblem, candidates, goodput, search_placement
from pdlab.workload import FixedLength, LognormalLength, PoissonArrivals, WorkloadSpec, make_workload


def test_candidates_fit_the_budget():
    cs = candidates(4, tps=(1, 2, 4))
    assert all(1 <= c.num_gpus <= 4 for c in cs)
    names = {c.name for c in cs}
    assert {"4x mixed TP1", "1x mixed TP4", "2P(TP1)+2D(TP1)", "1P(TP2)+2D(TP1)", "3P(TP1)+1D(TP1)"} <= names
    assert "1P(TP4)+1D(TP1)" not in names  # 5 GPUs


@pytest.fixture(scope="module")
def problem():
    model = PRESETS["llama3-8b"]
    spec = WorkloadSpec(120, PoissonArrivals(1.0), LognormalLength(512, 0.5, 16, 2048), FixedLength(32))
    return PlacementProblem(model, make_workload(spec, model.vocab_size, seed=0), slo_ttft_s=0.1, slo_tpot_s=0.02)


def test_goodput_meets_the_target_and_a_faster_rate_does_not(problem):
    c = Candidate("colocated", num_instances=1, tp=1)
    result = goodput(problem, c)
    assert result.goodput_rps > 0 and result.attainment >= 0.9
    assert problem.attainment(c, result.goodput_rps * 1.5) < 0.9


def test_search_ranks_by_goodput_per_gpu(problem):
    results = search_placement(problem, 2, tps=(1, 2))
    assert len(results) == len(candidates(2, (1, 2)))
    per_gpu = [r.per_gpu_goodput_rps for r in results]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    best, runner_up = results[:2]
    assert best.candidate != runner_up.candidate


def test_a_layout_that_cannot_meet_the_slo_gets_zero_quickly(problem):
    from dataclasses import replace

    # No rate meets a 1 ms TTFT (one 512-token prefill takes longer): halving stops at min_rate_rps.
    impossible = replace(problem, slo_ttft_s=1e-3)
    result = goodput(impossible, Candidate("colocated", num_instances=1, tp=1))
    assert result.goodput_rps == 0 and result.attainment < 0.9 and result.infeasible is None


def test_a_layout_whose_weights_fill_the_gpu_is_infeasible_without_simulating(problem):
    from dataclasses import replace

    big = replace(problem, model=PRESETS["llama3-70b"])  # 141 GB of bf16 weights: no KV room on one H100
    result = goodput(big, Candidate("colocated", num_instances=1, tp=1))
    assert result.goodput_rps == 0 and "KV tokens per GPU" in result.infeasible
    assert big.infeasible(Candidate("colocated", num_instances=1, tp=4)) is None


def test_candidates_per_phase_tp():
    cs = candidates(4, tps=(1, 2), colocated=False, prefill_tps=(2,), decode_tps=(1,))
    assert {c.name for c in cs} == {"1P(TP2)+1D(TP1)", "1P(TP2)+2D(TP1)"}


def test_one_gpu_pairs_are_searched_beside_the_colocated_instance(problem):
    from pdlab.sim.search import shared_gpu_pairs

    pairs = shared_gpu_pairs(["time", "mps:100/100", "mps:60/40"])
    assert [c.name for c in pairs] == ["1P+1D on 1 GPU, time-sliced", "1P+1D on 1 GPU, MPS 100/100",
                                       "1P+1D on 1 GPU, MPS 60/40"]
    assert all(c.num_gpus == 1 for c in pairs)
    layout = problem.layout(pairs[2])
    assert layout.gpu_of == (0, 0) and layout.gpu_sharing == "mps" and layout.sm_share == (0.6, 0.4)
    # The decode maps the prefill's weights: its share of the card is all KV cache, the prefill's is not.
    assert layout.decode_instance.num_blocks > layout.instance.num_blocks
    results = search_placement(problem, 1, tps=(1,), disaggregated=False, one_gpu_pairs=["time", "mps:100/100"])
    assert {r.candidate.name for r in results} == {"1x mixed TP1", *(c.name for c in pairs[:2])}
    assert all(r.goodput_rps > 0 for r in results)
    for bad in ("mps", "mps:0/100", "mps:60-40", "spatial"):
        with pytest.raises(ValueError, match="one-GPU pair"):
            shared_gpu_pairs([bad])


def test_an_experiment_run_is_named_as_the_search_names_its_layout():
    from pdlab.experiment import RunSection
    from pdlab.sim.search import candidate_of_run

    def name(**run) -> str:
        return candidate_of_run(RunSection(name="x", **run), num_gpus=1).name

    assert name(mode="colocated") == "1x mixed TP1"
    assert name(mode="disaggregated", gpu_sharing="time") == "1P+1D on 1 GPU, time-sliced"
    assert name(mode="disaggregated", gpu_sharing="mps", sm_percentage={"prefill": 70}) == "1P+1D on 1 GPU, MPS 70/100"
    assert candidate_of_run(RunSection(name="x", mode="disaggregated"), num_gpus=2).name == "1P(TP1)+1D(TP1)"

"""One sizing rule for the engine, the simulated runs and the placement search."""

from pdlab.engine.config import EngineConfig
from pdlab.engine.engine import scheduler_config
from pdlab.policy import sizing


def test_the_defaults():
    assert sizing.max_model_len(131072) == 8192 and sizing.max_model_len(2048) == 2048
    assert sizing.max_model_len(131072, configured=4096) == 4096
    chunked = sizing.scheduler_config(64, None, True, 8192)
    whole = sizing.scheduler_config(64, None, False, 8192)
    assert chunked.max_num_batched_tokens == 2048 and whole.max_num_batched_tokens == 8192
    assert sizing.WEIGHT_BITS == {None: 16, "wint8": 8, "wint4": 4}


def test_the_engine_and_a_simulated_run_size_an_instance_alike(monkeypatch):
    """The scheduler limits the engine would take and those run_sim gives its simulated instance agree."""
    import pdlab.sim.simulation as sim_run
    from pdlab.experiment import parse_experiment
    from pdlab.models.source import resolve_model
    from pdlab.run import run_sim

    seen = []

    class Spy(sim_run.SimCluster):
        def __init__(self, env, layout, cost, seed=0):
            seen.append(layout.instance.scheduler)
            super().__init__(env, layout, cost, seed)

    monkeypatch.setattr(sim_run, "SimCluster", Spy)
    context = resolve_model("tiny").config.max_position_embeddings
    for chunked in (True, False):
        exp = parse_experiment({"name": "s", "model": "tiny", "engine": {"enable_chunked_prefill": chunked},
                                "workload": {"num_requests": 1, "arrival": {"kind": "burst"},
                                             "prompt_len": {"kind": "fixed", "tokens": 8},
                                             "output_len": {"kind": "fixed", "tokens": 2}},
                                "runs": [{"name": "r", "backend": "sim"}]})
        seen.clear()
        run_sim(exp, exp.runs[0], progress=False)
        engine = scheduler_config(EngineConfig(**exp.engine_kwargs()), sizing.max_model_len(context))
        assert seen == [engine]

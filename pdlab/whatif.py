"""What-if questions for the simulator: one call, one scenario, both layouts on the same requests.

    result = whatif(rate_rps=12, num_prefill=1, num_decode=2, prompt_median_tokens=2048, link_gbps=25)
    result.table          # TTFT/TPOT percentiles, goodput, SLO attainment of each layout

A disaggregated xPyD layout against as many colocated instances (the same
GPUs), each instance on one GPU of the roofline cost model, with the KV link
at `link_gbps`. The notebooks' widgets call this; so can a script.
"""

from __future__ import annotations

from pdlab.experiment import parse_experiment
from pdlab.run import ExperimentResult, run_experiment


def whatif(rate_rps: float = 8.0, num_prefill: int = 1, num_decode: int = 1, prompt_median_tokens: int = 1024,
           output_median_tokens: int = 128, link_gbps: float = 370.0, model: str = "llama3-8b",
           num_requests: int = 400, ttft_ms: float = 500.0, tpot_ms: float = 50.0, seed: int = 0,
           sweep_rates_rps: tuple[float, ...] = ()) -> ExperimentResult:
    """Simulate the scenario (lognormal lengths around the medians, Poisson arrivals); nothing is written."""
    gpus = num_prefill + num_decode
    max_prompt = min(8 * prompt_median_tokens, 12288)
    max_output = min(8 * output_median_tokens, 4096)
    data = {
        "name": "whatif", "seed": seed, "model": {"name": model},
        "engine": {"max_num_seqs": 128, "max_num_batched_tokens": 4096, "max_model_len": max_prompt + max_output},
        "workload": {
            "num_requests": num_requests, "arrival": {"kind": "poisson", "rate_rps": rate_rps},
            "prompt_len": {"kind": "lognormal", "median_tokens": prompt_median_tokens, "sigma": 0.8,
                           "max_tokens": max_prompt},
            "output_len": {"kind": "lognormal", "median_tokens": output_median_tokens, "sigma": 0.8,
                           "max_tokens": max_output},
        },
        "runs": [
            {"name": f"{num_prefill}P{num_decode}D", "mode": "disaggregated", "num_prefill": num_prefill,
             "num_decode": num_decode, "backend": "sim", "link_bandwidth_gbps": link_gbps},
            {"name": f"{gpus}x-colocated", "mode": "colocated", "num_instances": gpus, "backend": "sim"},
        ],
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
    }
    if sweep_rates_rps:
        data["sweep"] = {"rates_rps": list(sweep_rates_rps)}
    return run_experiment(parse_experiment(data, "whatif"), progress=False, write=False)

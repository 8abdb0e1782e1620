"""FastDeploy's offline disaggregated example, in pdlab: one prefill and one decode instance, then a check.

    python examples/offline_disaggregated_demo.py [--model smollm2] [--protocol ipc|tcp]

Starts a prefill instance and a decode instance (GPU 0 and GPU 1 when there
are two GPUs, else the CPU), sends a handful of chat prompts to the decode
instance (the entry point), prints the answers, and checks them against the
same prompts served by one colocated instance. Exits 1 if any answer differs.
"""

from __future__ import annotations

import argparse
import sys

from pdlab.cluster.client import RemoteEngine
from pdlab.cluster.deployment import Deployment
from pdlab.errors import PdlabError
from pdlab.models.source import resolve_model
from pdlab.models.tokenizer import encode_chat
from pdlab.sampling_params import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me one tip for writing clear code.",
]


def generate(deployment: Deployment, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    with deployment:
        engine = RemoteEngine(deployment.endpoint)
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, f"demo-{i}")
        done = engine.drain(timeout_s=600)
        engine.close()
    errors = [o.error for o in done.values() if o.error]
    if errors or len(done) != len(prompts):
        raise PdlabError(f"{len(prompts) - len(done)} requests unanswered; errors: {errors}")
    return [done[f"demo-{i}"].text for i in range(len(prompts))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--protocol", default="ipc", choices=["ipc", "tcp"])
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    try:
        tokenizer = resolve_model(args.model).load_tokenizer()
        prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        flags = ["--max-model-len", "2048"]
        disaggregated = generate(Deployment(args.model, "disaggregated", flags, protocol=args.protocol), prompts, params)
        for prompt, text in zip(PROMPTS, disaggregated):
            print(f"{prompt}\n  -> {text}\n")
        colocated = generate(Deployment(args.model, "colocated", flags), prompts, params)
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    same = sum(a == b for a, b in zip(disaggregated, colocated))
    print(f"{same} of {len(PROMPTS)} answers identical to the colocated run")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m pdlab.bench`: flags -> `BenchConfig` -> run -> table (and files with --output-dir)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pdlab.bench.config import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, ENDPOINTS, BenchConfig
from pdlab.errors import ConfigError, PdlabError

EPILOG = """\
lengths: N | fixed:N | uniform:MIN:MAX | lognormal:median=M,sigma=S[,min=A][,max=B]
         (lognormal also takes mean= instead of median=, p90= instead of sigma=)
examples:
  python -m pdlab.bench --num-prompts 200 --request-rate 4 --input-len 512 --output-len 128
  python -m pdlab.bench --max-concurrency 8 --input-len uniform:128:1024 --slo-ttft-ms 250 --slo-tpot-ms 100
  python -m pdlab.bench --trace azure_conv_2023.csv --trace-arrivals --request-rate 2 --output-dir results/bench
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pdlab.bench",
        description="Serving benchmark against any OpenAI-compatible endpoint (pdlab's, vLLM's, ...).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_argument_group("endpoint")
    where.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000 (default: from --host/--port)")
    where.add_argument("--host", default="127.0.0.1")
    where.add_argument("--port", type=int, default=8000)
    where.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    where.add_argument("--model", help="model name to send (default: the first one GET /v1/models lists)")
    where.add_argument("--timeout-s", type=float, default=600.0, help="per-request limit, send to [DONE] (default 600)")
    where.add_argument("--ready-timeout-s", type=float, default=0.0,
                       help="wait this long for the server to answer GET /v1/models (default 0: ask once)")

    what = p.add_argument_group("workload")
    what.add_argument("--num-prompts", type=int, default=100)
    what.add_argument("--input-len", help=f"prompt length distribution (default {DEFAULT_INPUT_LEN}, or the trace's)")
    what.add_argument("--output-len", help=f"output length distribution (default {DEFAULT_OUTPUT_LEN}, or the trace's)")
    what.add_argument("--trace", type=Path, help="an Azure LLM trace CSV: lengths from its first rows, in order")
    what.add_argument("--trace-arrivals", action="store_true",
                      help="also replay the trace's arrival times (scaled to --request-rate when it is given)")
    what.add_argument("--trace-max-input-len", type=int, help="clip the trace's prompt lengths")
    what.add_argument("--trace-max-output-len", type=int, help="clip the trace's output lengths")
    what.add_argument("--seed", type=int, default=0)
    what.add_argument("--tokenizer",
                      help="pdlab model name or path whose tokenizer makes prompts of exact token lengths "
                           "(default: the served model if pdlab resolves it; 'none': random words, approximate)")
    what.add_argument("--token-ids", action="store_true",
                      help="send prompts as token id lists (/v1/completions; the same ids pdlab.run uses)")

    when = p.add_argument_group("arrivals")
    when.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    when.add_argument("--arrival", choices=("poisson", "gamma", "constant"),
                      help="inter-arrival process (default poisson; gamma when --cv or --burstiness is given)")
    burst = when.add_mutually_exclusive_group()
    burst.add_argument("--cv", type=float, help="gamma: coefficient of variation of the gaps (1 = Poisson; "
                                                "DistServe's and Vidur's cv)")
    burst.add_argument("--burstiness", type=float,
                       help="gamma: vLLM's burstiness, the shape (1 = Poisson, < 1 burstier); cv = 1/sqrt(burstiness)")
    when.add_argument("--max-concurrency", type=int, help="cap on requests in flight (closed loop with rate inf)")

    how = p.add_argument_group("sampling")
    how.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="send ignore_eos so each request generates its full output length (default on)")
    how.add_argument("--temperature", type=float, help="default: not sent (the server's default)")
    how.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body")
    how.add_argument("--continuous-usage", action="store_true",
                     help="ask for usage in every chunk (vLLM's continuous_usage_stats): exact tokens per chunk")

    out = p.add_argument_group("results")
    out.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO for goodput and attainment (DistServe)")
    out.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO for goodput and attainment")
    out.add_argument("--label", default="bench", help="the records' mode column (default bench)")
    out.add_argument("--output-dir", type=Path, help="write records.csv and summary.json here")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    arrival = args.arrival or ("gamma" if args.cv is not None or args.burstiness is not None else "poisson")
    if args.burstiness is not None:
        if not args.burstiness > 0:
            raise ConfigError(f"--burstiness must be > 0, got {args.burstiness}")
        cv = 1.0 / math.sqrt(args.burstiness)
    else:
        cv = 1.0 if args.cv is None else args.cv
    if not isinstance(args.extra_body, dict):
        raise ConfigError("--extra-body must be a JSON object")
    return BenchConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        endpoint=args.endpoint,
        model=args.model,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        trace=args.trace,
        trace_max_input_len=args.trace_max_input_len,
        trace_max_output_len=args.trace_max_output_len,
        seed=args.seed,
        tokenizer=args.tokenizer,
        prompt_token_ids=args.token_ids,
        request_rate_rps=args.request_rate,
        arrival=arrival,
        cv=cv,
        trace_arrivals=args.trace_arrivals,
        max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=args.extra_body,
        continuous_usage=args.continuous_usage,
        timeout_s=args.timeout_s,
        ready_timeout_s=args.ready_timeout_s,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        label=args.label,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    from pdlab.bench.report import format_report, write_outputs
    from pdlab.bench.runner import run_benchmark

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        records, summary = run_benchmark(config)
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(config, records, summary))
    if args.output_dir is not None:
        paths = write_outputs(config, records, summary, args.output_dir)
        print(f"results written to {', '.join(str(p) for p in paths)}")
    return 0 if summary["num_completed"] else 1  # nothing served is a failed run, for scripts

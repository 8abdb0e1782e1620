"""A serving benchmark client for any OpenAI-compatible endpoint: `python -m pdlab.bench --help`.

It sends a workload (pdlab's arrival processes and length distributions, or an
Azure trace) to `/v1/completions` or `/v1/chat/completions` with streaming on,
times every request at the client, and writes the same `RequestRecord`s as
`python -m pdlab.run`, so one summary and one set of plots serve pdlab's
engine, its HTTP server, the simulator and other engines such as vLLM.

- `config.py`: `BenchConfig` and the length flag syntax;
- `prompts.py`: the workload's requests and their prompts (exact token lengths with a tokenizer);
- `client.py`: one streamed request, timed (SSE parsing, usage, errors);
- `runner.py`: `run_benchmark(config) -> (records, summary)`, arrivals and concurrency;
- `report.py`: the printed table, `records.csv` and `summary.json`;
- `cli.py`: the flags.
"""

from pdlab.bench.config import BenchConfig, parse_length
from pdlab.bench.runner import async_run_benchmark, run_benchmark, token_times

__all__ = ["BenchConfig", "async_run_benchmark", "parse_length", "run_benchmark", "token_times"]

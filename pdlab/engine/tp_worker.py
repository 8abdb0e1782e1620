"""A tensor-parallel rank > 0: `python -m pdlab.engine.tp_worker --rank R --size N --init-method tcp://...`.

Started by rank 0 (`pdlab.models.parallel.start`), which writes the engine
configuration to its stdin as JSON. It loads its shard of the model and of the
KV cache (`build_executor`, as rank 0 does) and computes the steps rank 0
broadcasts until it is told to stop; it ends with rank 0 (`pdlab.lifetime`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from pdlab.models import parallel
from pdlab.engine.config import EngineConfig
from pdlab.engine.engine import build_executor
from pdlab.errors import PdlabError
from pdlab.lifetime import follow_parent
from pdlab.models.load import resolve_dtype
from pdlab.models.source import resolve_model

log = logging.getLogger("pdlab.engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdlab.engine.tp_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--kv-cache-shm-path", default=None, help="this rank's shared-memory KV cache (CPU ipc)")
    args = parser.parse_args(argv)
    follow_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{args.rank}: %(message)s")
    config = EngineConfig(**json.loads(sys.stdin.read()))
    try:
        tp = parallel.join(args.rank, args.size, args.init_method, torch.device(args.device))
        source = resolve_model(config.model)
        _, kv_cache, runner, _ = build_executor(config, source, tp.device, resolve_dtype(config.dtype, tp.device), tp,
                                                args.kv_cache_shm_path)
    except PdlabError as e:
        print(f"error: tensor-parallel rank {args.rank}: {e}", file=sys.stderr)
        return 2
    try:
        runner.serve_worker()
    finally:
        kv_cache.close()
        tp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

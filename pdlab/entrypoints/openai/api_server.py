"""FastDeploy's OpenAI-compatible API server, in front of one engine instance.

    export FD_LOG_DIR=log_decode CUDA_VISIBLE_DEVICES=1
    python -m pdlab.entrypoints.openai.api_server --model smollm2 \\
        --port 8184 --metrics-port 8185 --engine-worker-queue-port 8186 --cache-queue-port 8187 \\
        --innode-prefill-ports 8182 --splitwise-role decode

Starts the engine instance (`python -m pdlab.cluster.instance` with the same
flags) as a child process that logs to $FD_LOG_DIR ($PDLAB_LOG_DIR, default
log/), waits until it answers a ping, checks that a decode instance's prefill
instances answer too, prints a banner, then serves HTTP on --host:--port. The
child stops with the server (SIGINT, SIGTERM), and the server stops, with exit
code 1, if the child dies. A start-up failure prints one line (and the tail
of the instance's log) and exits with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pdlab.cluster.args import add_instance_args, parse_ports
from pdlab.cluster.auth import TOKEN_ENV, cluster_token
from pdlab.cluster.client import ping
from pdlab.cluster.launch import InstanceProcess
from pdlab.cluster.messages import Pong
from pdlab.errors import PdlabError
from pdlab.lifetime import child_env

log = logging.getLogger("pdlab.api_server")

DEFAULT_PORT = 8000  # FastDeploy's
# The cluster token goes to the instance in its environment, never on its command line (which others can read).
NOT_FOR_THE_INSTANCE = {"help", "port", "instance_start_timeout_s", "prefill_wait_timeout_s", "cluster_token"}


class StartupError(PdlabError):
    """The server cannot start; the message says why."""


class _Stop(BaseException):
    """SIGTERM before uvicorn has its own handlers: unwind, stopping the child on the way."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pdlab.entrypoints.openai.api_server",
                                     description=__doc__.split("\n")[0])
    add_instance_args(parser)
    parser.add_argument("--instance-start-timeout-s", type=float, default=600.0,
                        help="how long to wait for the engine instance to load its model and answer")
    parser.add_argument("--prefill-wait-timeout-s", type=float, default=60.0,
                        help="decode only: how long to wait for each --innode-prefill-ports instance to answer")
    return parser


def log_dir() -> Path:
    return Path(os.environ.get("FD_LOG_DIR") or os.environ.get("PDLAB_LOG_DIR") or "log")


def instance_argv(args: argparse.Namespace) -> list[str]:
    """The instance's flags, as given to this server (every instance flag but --port)."""
    argv = []
    for action in add_instance_args(argparse.ArgumentParser(add_help=False))._actions:
        value = getattr(args, action.dest, None)
        if action.dest in NOT_FOR_THE_INSTANCE or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def bind_http(host: str, port: int) -> socket.socket:
    """Take the HTTP port now, before minutes of model loading, so that a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise StartupError(f"cannot use --host {host}: {e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not an active listener's port, only TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot bind the HTTP port {host}:{port} (--port): {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


def start_instance(args: argparse.Namespace, directory: Path) -> InstanceProcess:
    """`python -m pdlab.cluster.instance` as a child: its own session (Ctrl-C reaches only this server,
    which stops it), ending with this process however it ends (`pdlab.lifetime`), its output in `directory`."""
    argv = [sys.executable, "-m", "pdlab.cluster.instance", *instance_argv(args)]
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{args.splitwise_role}-{args.engine_worker_queue_port}.log"
    with open(log_path, "w") as out:
        token = cluster_token(args.cluster_token)
        env = child_env({**os.environ, **({TOKEN_ENV: token.decode()} if token else {})})
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return InstanceProcess(args.splitwise_role, args.engine_worker_queue_port, args.cache_queue_port, proc,
                           log_path, args.host, argv)


def wait_ready(instance: InstanceProcess, timeout_s: float, token: bytes | None = None) -> Pong:
    """The instance's first Pong; `StartupError` with its log's tail if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while True:
        if instance.proc.poll() is not None:
            raise StartupError(f"the {instance.role} engine instance exited with code {instance.proc.returncode} "
                               f"while starting; the end of {instance.log_path}:\n{_indent(instance.log_tail())}")
        pong = ping(instance.endpoint, timeout_s=0.5, token=token)
        if pong is not None:
            return pong
        if time.monotonic() > deadline:
            raise StartupError(f"the {instance.role} engine instance did not answer within {timeout_s:.0f} s "
                               f"(--instance-start-timeout-s); the end of {instance.log_path}:\n"
                               f"{_indent(instance.log_tail())}")


def wait_prefills(args: argparse.Namespace, instance: InstanceProcess) -> list[Pong]:
    """A decode instance's prefill instances must answer before it takes requests."""
    pongs = []
    for port in parse_ports(args.innode_prefill_ports):
        deadline = time.monotonic() + args.prefill_wait_timeout_s
        token = cluster_token(args.cluster_token)
        while (pong := ping(f"tcp://{args.host}:{port}", timeout_s=0.5, token=token)) is None:
            if instance.proc.poll() is not None:
                raise StartupError(f"the decode engine instance exited with code {instance.proc.returncode}; "
                                   f"the end of {instance.log_path}:\n{_indent(instance.log_tail())}")
            if time.monotonic() > deadline:
                raise StartupError(f"no prefill instance answers at {args.host}:{port} (--innode-prefill-ports) "
                                   f"within {args.prefill_wait_timeout_s:.0f} s; start the prefill instance first")
        if pong.role != "prefill":
            raise StartupError(f"{args.host}:{port} (--innode-prefill-ports) is a {pong.role} instance, not a prefill one")
        pongs.append(pong)
    return pongs


def banner(args: argparse.Namespace, pong: Pong, instance: InstanceProcess, http_port: int) -> str:
    lines = [
        (f"pdlab api_server: model {args.model} ({pong.model}), role {pong.role}, {pong.dtype} on {pong.device}, "
         f"KV cache {pong.num_blocks} blocks x {pong.block_size} tokens, max_model_len {pong.max_model_len}"),
        (f"  HTTP http://{args.host}:{http_port}/v1  metrics {args.metrics_port or '-'}  "
         f"engine-worker-queue {args.engine_worker_queue_port}  cache-queue {args.cache_queue_port}"
         + (f"  prefill {args.innode_prefill_ports}" if pong.role == "decode" and args.innode_prefill_ports else "")
         + (f"  scheduler splitwise@{args.scheduler_host}:{args.scheduler_port} (topic {args.scheduler_topic})"
            if pong.scheduler == "splitwise" else "")),
        f"  instance log {instance.log_path} (pid {instance.proc.pid})",
    ]
    return "\n".join(lines)


def serve(args: argparse.Namespace, sock: socket.socket, instance: InstanceProcess, pong: Pong, tokenizer) -> int:
    """Serve HTTP until a signal (0) or until the instance dies (1)."""
    import uvicorn

    from pdlab.entrypoints.openai.app import ServerConfig, build_app
    from pdlab.entrypoints.openai.serving import EngineInfo

    server: uvicorn.Server | None = None
    gone: list[str] = []

    def engine_gone() -> str | None:
        code = instance.proc.poll()
        return None if code is None else f"the engine instance exited with code {code}"

    def on_engine_gone(why: str) -> None:
        gone.append(why)
        server.should_exit = True

    info = EngineInfo(args.model, pong.role, pong.max_model_len, pong.vocab_size, routed=pong.scheduler == "splitwise")
    app = build_app(ServerConfig(info, tokenizer, instance.endpoint, engine_gone, on_engine_gone,
                                 token=cluster_token(args.cluster_token)))
    config = uvicorn.Config(app, host=args.host, port=sock.getsockname()[1], log_level="info",
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    asyncio.run(server.serve(sockets=[sock]))
    if gone:
        print(f"error: {gone[0]}; the end of {instance.log_path}:\n{_indent(instance.log_tail())}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_stop)
    instance: InstanceProcess | None = None
    try:
        sock = bind_http(args.host, DEFAULT_PORT if args.port is None else args.port)
        port = sock.getsockname()[1]  # the one taken, should --port be 0
        from pdlab.models.source import resolve_model

        source = resolve_model(args.model)
        instance = start_instance(args, log_dir())
        tokenizer = source.load_tokenizer()  # while the instance loads the weights
        pong = wait_ready(instance, args.instance_start_timeout_s, cluster_token(args.cluster_token))
        if pong.role == "decode":
            wait_prefills(args, instance)
        print(banner(args, pong, instance, port), flush=True)
        return serve(args, sock, instance, pong, tokenizer)
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        if instance is not None:
            instance.stop()


def _raise_stop(*_) -> None:
    raise _Stop()


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines()) or "  (empty)"


if __name__ == "__main__":
    sys.exit(main())

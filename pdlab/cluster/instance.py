"""One engine instance as its own OS process, with a role (FastDeploy's `--splitwise-role`).

    python -m pdlab.cluster.instance --splitwise-role decode --model smollm2 \
        --engine-worker-queue-port 8186 --cache-queue-port 8187 --innode-prefill-ports 8182

The process binds two zmq ROUTER sockets: the engine-worker-queue port (tasks:
client requests, prefill tasks, acks, pings) and the cache-queue port (KV
transfer coordination and, over tcp, the KV itself). One thread runs the loop:
drain both sockets, let the role do its periodic work, step the engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import zmq

from pdlab.cluster.args import add_instance_args, engine_config, parse_protocols
from pdlab.cluster.messages import MessageError, Ping, Pong, decode, encode
from pdlab.cluster.metrics import InstanceMetrics
from pdlab.engine.engine import LLMEngine
from pdlab.errors import ConfigError, PdlabError

log = logging.getLogger("pdlab.instance")


class Instance:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.role = args.splitwise_role
        self.host = args.host
        self.instance_id = args.instance_id or f"{self.role}:{args.engine_worker_queue_port}"
        if args.tensor_parallel_size != 1:
            raise ConfigError("--tensor-parallel-size > 1 is not supported yet by this engine")
        try:
            protocols = parse_protocols(args.cache_transfer_protocol)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        usable = [p for p in protocols if p in ("ipc", "tcp")]
        if not usable:
            raise ConfigError("rdma is not available in this build; add tcp to --cache-transfer-protocol")
        self.protocol = usable[0]
        self.metrics = InstanceMetrics(self.role, self.instance_id)
        if args.metrics_port is not None:  # before the model loads: a port in use fails at once
            self.metrics.serve(args.metrics_port, self.host)
        config = engine_config(args)
        shm_path = None
        if self.role == "decode" and self.protocol == "ipc" and not _wants_cuda(config.device):
            from pdlab.transfer.shm import shm_path as make_shm_path

            shm_path = make_shm_path(f"{os.getpid()}-{args.cache_queue_port}")
        self.engine = LLMEngine(config, kv_cache_shm_path=shm_path)
        self.metrics.watch(self.engine.scheduler, self.engine.kv_cache.num_bytes // self.engine.kv_cache.num_blocks)
        self.zmq = zmq.Context()
        self.ewq = self._bind(args.engine_worker_queue_port, "engine-worker-queue")
        self.cache = self._bind(args.cache_queue_port, "cache-queue")
        from pdlab.cluster.roles import ROLES

        self.handler = ROLES[self.role](self)
        self._stopping = False
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"

    def _bind(self, port: int, name: str) -> zmq.Socket:
        sock = self.zmq.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind the {name} port {self.host}:{port}: {e.strerror}") from None
        return sock

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    def banner(self) -> str:
        e = self.engine
        return (f"pdlab instance {self.instance_id}: role={self.role} model={e.source.location} dtype={e.dtype} "
                f"device={e.device} kv_blocks={e.block_manager.num_blocks}x{e.config.block_size} "
                f"protocol={self.protocol} engine_worker_queue={self.host}:{self.args.engine_worker_queue_port} "
                f"cache_queue={self.host}:{self.args.cache_queue_port}")

    def pong(self) -> Pong:
        s = self.engine.scheduler
        return Pong(
            instance_id=self.instance_id, role=self.role, model=self.engine.source.location,
            num_blocks=s.block_manager.num_blocks, num_free_blocks=s.block_manager.num_free_blocks,
            num_running=s.num_running, num_waiting=s.num_waiting + len(s.reserving) + len(s.transferring),
            num_held=len(s.held), incarnation=self.incarnation,
            dtype=str(self.engine.dtype).removeprefix("torch."), device=str(self.engine.device),
            block_size=s.block_manager.block_size, max_model_len=s.config.max_model_len,
            vocab_size=self.engine.model_config.vocab_size,
        )

    def stop(self, *_) -> None:
        self._stopping = True

    def serve(self) -> None:
        handlers = {self.ewq: self._on_ewq, self.cache: self._on_cache, **self.handler.sockets()}
        poller = zmq.Poller()
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping:
                busy = self.engine.scheduler.has_work()
                events = dict(poller.poll(0 if busy else 5))
                for sock, handle in handlers.items():
                    if sock in events:
                        self._drain(sock, handle, routed=sock.type == zmq.ROUTER)
                self.handler.tick(self.engine.clock())
                if self.engine.scheduler.has_work():
                    self.handler.step()
        finally:
            self.handler.close()
            self.metrics.close()
            self.engine.kv_cache.close()
            self.zmq.destroy(linger=0)

    def _drain(self, sock: zmq.Socket, handle, routed: bool) -> None:
        """Handle every queued message; a ROUTER's first frame is the sender's identity."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if routed:
                if len(frames) < 2:
                    continue
                identity, frames = frames[0].bytes, frames[1:]
            else:
                identity = b""
            body, rest = frames[0].buffer, frames[1:]
            try:
                message = decode(body)
            except MessageError as e:
                log.warning("%s: dropped a message: %s", self.instance_id, e)
                continue
            try:
                handle(identity, message, rest)
            except PdlabError as e:
                log.warning("%s: %s", self.instance_id, e)
            except Exception:  # a bug in handling one message must not take the instance down
                log.exception("%s: failed to handle %s", self.instance_id, type(message).__name__)

    def _on_ewq(self, identity: bytes, message, rest) -> None:
        if isinstance(message, Ping):
            self.ewq.send_multipart([identity, encode(self.pong())])
        else:
            self.handler.on_ewq(identity, message)

    def _on_cache(self, identity: bytes, message, rest) -> None:
        self.handler.on_cache(identity, message, rest)


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def main(argv: list[str] | None = None) -> int:
    parser = add_instance_args(argparse.ArgumentParser(prog="python -m pdlab.cluster.instance", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        instance = Instance(args)
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, instance.stop)
    signal.signal(signal.SIGINT, instance.stop)
    print(instance.banner(), flush=True)
    instance.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

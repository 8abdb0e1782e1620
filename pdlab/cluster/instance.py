"""One engine instance as its own OS process, with a role (FastDeploy's `--splitwise-role`).

    python -m pdlab.cluster.instance --splitwise-role decode --model smollm2 \
        --engine-worker-queue-port 8186 --cache-queue-port 8187 --innode-prefill-ports 8182

The process binds two zmq ROUTER sockets: the engine-worker-queue port (tasks:
client requests, prefill tasks, acks, pings) and the cache-queue port (KV
transfer coordination and, over tcp, the KV itself), and with `--pd-comm-port`
a third that takes both kinds from other instances. One thread runs the loop:
drain the sockets, let the role do its periodic work, step the engine.

With `--scheduler-name splitwise` the instance also registers with the global
scheduler in Redis (`pdlab/cluster/splitwise/`): requests its clients send go
through its router, and tasks for it arrive in its Redis inbox.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

import zmq

from pdlab.cluster.args import add_instance_args, apply_sm_percentage, engine_config, parse_ports
from pdlab.cluster.auth import RefusalLog, cluster_token, unseal
from pdlab.cluster.messages import (
    AbortRequest, GenerateRequest, KVLayer, MessageError, Ping, PrefillDone, PrefillFailed, Pong, WeightsOffer,
    WeightsRequest, decode, encode,
)
from pdlab.cluster.prometheus import InstanceMetrics
from pdlab.cluster.kv_protocols import usable_protocols
from pdlab.engine.engine import LLMEngine
from pdlab.errors import ConfigError, PdlabError
from pdlab.lifetime import follow_parent
from pdlab.policy.dispatch import instance_load

log = logging.getLogger("pdlab.instance")

# The largest control-message body an instance reads (a prompt of millions of token ids fits); larger
# bodies are dropped and logged. zmq itself refuses frames past `_max_frame_bytes` (a KV layer of the
# longest request included) by dropping the connection that sent one, before it is held in memory.
MAX_MESSAGE_BYTES = 64 << 20


class Instance:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.role = args.splitwise_role
        self.host = args.host
        self.advertise_host = args.advertise_host or _advertised(args.host)
        self.instance_id = args.instance_id or f"{self.role}:{args.engine_worker_queue_port}"
        config = engine_config(args)
        self.splitwise = _splitwise_config(args)
        self.protocols, self.protocol_notes = usable_protocols(args, config.device, self.splitwise is not None)
        self.protocol = self.protocols[0]  # the one a single-machine pair uses
        if self.splitwise is not None:  # a missing Redis fails now, not after the model has loaded
            from pdlab.cluster.splitwise.agent import connect

            connect(self.splitwise).close()
        self.metrics = InstanceMetrics(self.role, self.instance_id)
        if args.metrics_port is not None:  # before the model loads: a port in use fails at once
            self.metrics.serve(args.metrics_port, self.host)
        shm_path = None
        if self.role == "decode" and "ipc" in self.protocols and not _wants_cuda(config.device):
            from pdlab.transfer.shm import shm_path as make_shm_path

            shm_path = make_shm_path(f"{os.getpid()}-{args.cache_queue_port}")
        shared = _mapped_weights(args) if args.weights_from is not None else None
        self.engine = LLMEngine(config, kv_cache_shm_path=shm_path, shared_weights=shared)
        self._weights_offer: WeightsOffer | None = None
        self.metrics.watch(self.engine.scheduler, self.engine.kv_cache.num_bytes // self.engine.kv_cache.num_blocks)
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.zmq = zmq.Context()
        self.token = cluster_token(args.cluster_token)  # required on the control-plane ports when set
        self.refusals = RefusalLog(self.instance_id)
        self._port_names: dict[zmq.Socket, str] = {}
        self._handlers: dict[zmq.Socket, object] = {}
        self._poller = zmq.Poller()
        self.ewq = self._bind(args.engine_worker_queue_port, "engine-worker-queue")
        self.cache = self._bind(args.cache_queue_port, "cache-queue")
        self.watch(self.ewq, self._on_ewq)
        self.watch(self.cache, self._on_cache)
        self.pd = None
        if args.pd_comm_port is not None:
            self.pd = self._bind(args.pd_comm_port, "pd-comm")
            self.watch(self.pd, self._on_pd)
        self.agent = self.router = None
        try:
            if self.splitwise is not None:
                from pdlab.cluster.splitwise.agent import RedisAgent
                from pdlab.cluster.splitwise.router import Router

                self.node_id = args.instance_id or f"{self.role}@{self.advertise_host}:{args.engine_worker_queue_port}"
                self.agent = RedisAgent(self.splitwise, self.node_info(), self.zmq)
                self.router = Router(self, self.agent, self.splitwise, seed=args.seed)
            from pdlab.cluster.roles import role_class

            self.handler = role_class(self.role)(self)
        except BaseException:
            if self.agent is not None:
                self.agent.close()
            raise
        self._stopping = False
        self._next_info_s = 0.0

    @property
    def task_endpoint(self) -> str:
        """Where other instances send prefill tasks (a prefill instance's)."""
        return self.endpoint(self.args.pd_comm_port or self.args.engine_worker_queue_port)

    @property
    def peer_cache_endpoint(self) -> str:
        """Where prefill instances send KV and PrefillDone (a decode instance's)."""
        return self.endpoint(self.args.pd_comm_port or self.args.cache_queue_port)

    def node_info(self):
        """This instance as the splitwise scheduler sees it (the agent stamps the time)."""
        from pdlab.cluster.splitwise.wire import NodeInfo

        s = self.engine.scheduler
        return NodeInfo(
            node_id=self.node_id, role=self.role, host=self.advertise_host, task_endpoint=self.task_endpoint,
            cache_endpoint=self.peer_cache_endpoint, protocols=list(self.protocols), model=self.engine.source.location,
            load=instance_load(self.role, (r.num_tokens for r in s.requests.values())),
            num_running=s.num_running, num_waiting=s.num_waiting + len(s.reserving) + len(s.transferring),
            num_free_blocks=s.block_manager.num_free_blocks, num_blocks=s.block_manager.num_blocks,
            max_model_len=s.config.max_model_len, incarnation=self.incarnation, ts=0.0,
            rdma_ports=parse_ports(self.args.rdma_comm_ports),
        )

    def watch(self, sock: zmq.Socket, handle) -> None:
        """Poll `sock` in the loop; `handle(identity, message, rest)` gets each message."""
        self._handlers[sock] = handle
        self._poller.register(sock, zmq.POLLIN)

    def _bind(self, port: int, name: str) -> zmq.Socket:
        sock = self.zmq.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # A ROUTER silently drops what it cannot queue for a peer: with the default high-water mark a
        # client that stops reading for a moment (1,000 updates) loses the last update of some requests,
        # which then never finish. Unbounded: replies wait in memory until the client reads them (a
        # client that goes away takes its queue with it).
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind the {name} port {self.host}:{port}: {e.strerror}") from None
        self._port_names[sock] = name
        return sock

    def _max_frame_bytes(self) -> int:
        """The largest frame a peer may send: a control message, or one layer of KV (tcp) for the
        longest request this cache holds, whichever is larger."""
        kv = self.engine.kv_cache.kv  # [L, 2, N, bs, H, D]
        block_size = kv.shape[3]
        max_blocks = -(-self.engine.scheduler.config.max_model_len // block_size) + 1
        layer_bytes = 2 * max_blocks * block_size * kv.shape[4] * kv.shape[5] * kv.element_size()
        return max(MAX_MESSAGE_BYTES, layer_bytes) + (1 << 20)

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.advertise_host}:{port}"

    def banner(self) -> str:
        e = self.engine
        text = (f"pdlab instance {self.instance_id}: role={self.role} model={e.source.location} dtype={e.dtype} "
                f"device={e.device} kv_blocks={e.block_manager.num_blocks}x{e.config.block_size} "
                f"protocols={','.join(self.protocols)} engine_worker_queue={self.host}:{self.args.engine_worker_queue_port} "
                f"cache_queue={self.host}:{self.args.cache_queue_port}")
        if self.args.pd_comm_port is not None:
            text += f" pd_comm={self.host}:{self.args.pd_comm_port}"
        if self.args.weights_from is not None:  # how its GPU memory is split: the log's "GPU memory:" line
            text += f" weights=mapped-from:{self.args.weights_from}"
        if self.args.sm_percentage is not None:
            text += f" sm_percentage={self.args.sm_percentage}"
        if self.splitwise is not None:
            text += (f" scheduler=splitwise@{self.splitwise.address} topic={self.splitwise.topic} "
                     f"node={self.node_id}")
        return "\n".join([text, *(f"  note: {n}" for n in self.protocol_notes)])

    def pong(self) -> Pong:
        s = self.engine.scheduler
        return Pong(
            instance_id=self.instance_id, role=self.role, model=self.engine.source.location,
            num_blocks=s.block_manager.num_blocks, num_free_blocks=s.block_manager.num_free_blocks,
            num_running=s.num_running, num_waiting=s.num_waiting + len(s.reserving) + len(s.transferring),
            num_held=len(s.held), incarnation=self.incarnation,
            dtype=str(self.engine.dtype).removeprefix("torch."), device=str(self.engine.device),
            block_size=s.block_manager.block_size, max_model_len=s.config.max_model_len,
            vocab_size=self.engine.model_config.vocab_size, scheduler="splitwise" if self.splitwise else "",
        )

    def weights_offer(self) -> WeightsOffer:
        """How an instance starting on this GPU maps this one's weights (computed once)."""
        if self._weights_offer is None:
            try:
                self._weights_offer = WeightsOffer(self.engine.export_weights())
            except (PdlabError, RuntimeError) as e:
                self._weights_offer = WeightsOffer(error=f"{self.instance_id} cannot share its weights: {e}")
        return self._weights_offer

    def stop(self, *_) -> None:
        self._stopping = True

    def serve(self) -> None:
        if self.agent is not None:
            self.watch(self.agent.socket, None)
        try:
            while not self._stopping:
                busy = self.engine.has_work()
                events = dict(self._poller.poll(0 if busy else 5))
                for sock, handle in list(self._handlers.items()):
                    if sock not in events:
                        continue
                    if handle is None:
                        self._drain_agent()
                    else:
                        self._drain(sock, handle, routed=sock.type == zmq.ROUTER)
                now_s = self.engine.clock()
                self.handler.tick(now_s)
                if self.agent is not None:
                    self.router.tick(now_s)
                    if now_s >= self._next_info_s:
                        self._next_info_s = now_s + self.splitwise.heartbeat_s
                        self.agent.set_info(self.node_info())
                if self.engine.has_work():
                    self.handler.step()
        finally:
            self.handler.close()
            if self.agent is not None:
                self.agent.close()
            self.metrics.close()
            self.engine.kv_cache.close()
            self.engine.close()
            self.zmq.destroy(linger=0)

    def _drain_agent(self) -> None:
        """Entries the agent popped from this node's Redis lists: tasks for the role, results for the router."""
        from pdlab.cluster.splitwise.agent import INBOX, RESTARTED
        from pdlab.cluster.splitwise.wire import TaskAbort, decode_inbox, decode_update

        while True:
            try:
                kind, payload = self.agent.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if kind == RESTARTED:  # what was in this node's lists is lost
                    self.handler.on_scheduler_restarted()
                    self.router.on_scheduler_restarted()
                elif kind == INBOX:
                    entry = decode_inbox(payload)
                    if isinstance(entry, TaskAbort):
                        if self.role != "prefill":
                            self.handler.on_abort(entry.request_id)
                    else:
                        self.handler.on_task(entry)
                else:
                    self.router.on_update(decode_update(payload))
            except MessageError as e:
                log.warning("%s: dropped an entry of its Redis %s list: %s", self.instance_id, kind.decode(), e)
            except PdlabError as e:
                log.warning("%s: %s", self.instance_id, e)
            except Exception:  # a bug in handling one entry must not take the instance down
                log.exception("%s: failed to handle an entry of its Redis %s list", self.instance_id, kind.decode())

    def _drain(self, sock: zmq.Socket, handle, routed: bool) -> None:
        """Handle every queued message; a ROUTER's first frame is the sender's identity."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            port = self._port_names.get(sock, "peer")
            if routed:
                if len(frames) < 2:
                    continue
                identity, frames = frames[0].bytes, frames[1:]
                frames = unseal(self.token, frames)
                if frames is None:
                    self.refusals.refused(port, "no cluster token, or a wrong one")
                    continue
                if not frames:
                    continue
            else:
                identity = b""
            body, rest = frames[0].buffer, frames[1:]
            if len(body) > MAX_MESSAGE_BYTES:
                self.refusals.refused(port, f"a message of {len(body)} bytes (at most {MAX_MESSAGE_BYTES})")
                continue
            try:
                message = decode(body)
            except MessageError as e:
                self.refusals.refused(port, str(e))
                continue
            try:
                handle(identity, message, rest)
            except PdlabError as e:
                log.warning("%s: %s", self.instance_id, e)
            except Exception:  # a bug in handling one message must not take the instance down
                log.exception("%s: failed to handle %s", self.instance_id, type(message).__name__)

    def _on_ewq(self, identity: bytes, message, rest, sock: zmq.Socket | None = None) -> None:
        if isinstance(message, Ping):
            (sock or self.ewq).send_multipart([identity, encode(self.pong())])
        elif isinstance(message, WeightsRequest):
            (sock or self.ewq).send_multipart([identity, encode(self.weights_offer())])
        elif self.router is not None and isinstance(message, GenerateRequest):
            self.router.on_generate(identity, message)
        elif self.router is not None and isinstance(message, AbortRequest):
            self.router.on_abort(message)
        else:
            self.handler.on_ewq(identity, message)

    def _on_cache(self, identity: bytes, message, rest) -> None:
        self.handler.on_cache(identity, message, rest)

    def _on_pd(self, identity: bytes, message, rest) -> None:
        """--pd-comm-port: what other instances would send to the engine-worker-queue or cache-queue port."""
        if isinstance(message, (KVLayer, PrefillDone, PrefillFailed)):
            self._on_cache(identity, message, rest)
        elif not isinstance(message, (GenerateRequest, AbortRequest)):  # clients use the engine-worker-queue port
            self._on_ewq(identity, message, rest, sock=self.pd)
        else:
            log.warning("%s: a client request on the pd-comm port; use the engine-worker-queue port", self.instance_id)


def _advertised(host: str) -> str:
    """The address peers can reach a wildcard-bound instance at (the machine's own, by its name)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _splitwise_config(args: argparse.Namespace):
    if args.scheduler_name != "splitwise":
        return None
    from pdlab.cluster.splitwise.agent import SplitwiseConfig

    return SplitwiseConfig(host=args.scheduler_host, port=args.scheduler_port, password=args.scheduler_password,
                           topic=args.scheduler_topic, ttl_s=args.scheduler_ttl, heartbeat_s=args.scheduler_heartbeat_s,
                           expire_s=args.scheduler_expire_s, dispatch=args.scheduler_dispatch)


def _mapped_weights(args: argparse.Namespace):
    """--weights-from: the weights of the instance at that port on this machine, to map instead of loading."""
    from pdlab.cluster.client import fetch_weights

    endpoint = f"tcp://{_advertised(args.host)}:{args.weights_from}"
    log.info("waiting for the instance at %s to offer its weights", endpoint)
    offer = fetch_weights(endpoint, args.weights_timeout_s, cluster_token(args.cluster_token))
    if offer is None:
        raise ConfigError(f"--weights-from {args.weights_from}: no instance answered at {endpoint} within "
                          f"{args.weights_timeout_s:g} s")
    if offer.weights is None:
        raise ConfigError(f"--weights-from {args.weights_from}: {offer.error}")
    return offer.weights


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def main(argv: list[str] | None = None) -> int:
    parser = add_instance_args(argparse.ArgumentParser(prog="python -m pdlab.cluster.instance", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    follow_parent()  # started by pdlab (a runner, an api_server): SIGTERM when that process ends
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_sm_percentage(args.sm_percentage)  # before anything touches CUDA
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

"""One instance's link to the splitwise scheduler: registration, heartbeats, its two lists, the live view.

Two threads do all the Redis I/O, so that the engine loop never waits on it
and heartbeats go on during a long step:

- the writer: every `heartbeat_s` it writes this node's `NodeInfo` into the
  cluster hash, reads the hash back (the live view the router picks from) and
  removes nodes whose heartbeat is older than `expire_s`, with their lists; in
  between it pushes what the loop queued (LPUSH + EXPIRE, pipelined).
- the reader: blocks on this node's inbox and results lists and forwards each
  entry, as `[kind, payload]` frames, into an inproc zmq socket that the
  instance loop polls with its other sockets.

When Redis cannot be reached, both threads retry with a short backoff and
`down_for_s` tells the loop for how long it has been gone; pushes wait in
memory (bounded) until it is back. When it comes back as a new server (its
`run_id` changed: restarted, and without persistence empty), the reader
forwards `[RESTARTED, run_id]` before anything it pops from the new one:
whatever the lists held is lost, and the loop must act on it (routers send
their requests again). Nothing is pickled: values are JSON.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import msgspec
import redis
import zmq
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdlab.cluster.messages import MessageError
from pdlab.cluster.splitwise.keys import Keys
from pdlab.cluster.splitwise.wire import NodeInfo, decode_node, encode
from pdlab.errors import ConfigError

log = logging.getLogger("pdlab.splitwise")

MIN_REDIS_VERSION = (6, 2)  # RPOP with a count
MAX_QUEUED_PUSHES = 100_000
INBOX, RESULTS, RESTARTED = b"inbox", b"results", b"restarted"

# Remove a node's entry only if it is still the stale heartbeat we saw (it may have come back since).
_REAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class SplitwiseConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None
    topic: str = "fd"
    ttl_s: float = 900.0  # requests and results live this long (FastDeploy's --scheduler-ttl)
    heartbeat_s: float = 0.2  # how often a node writes its NodeInfo and reads the others'
    expire_s: float = 3.0  # a node silent for longer is gone (FastDeploy's expire_period)
    dispatch: str = "fastdeploy"  # a policy in pdlab.policy.dispatch.POLICIES

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __post_init__(self) -> None:
        if not self.ttl_s > 0 or not self.heartbeat_s > 0 or not self.expire_s > self.heartbeat_s:
            raise ConfigError(f"splitwise scheduler: need --scheduler-ttl > 0 and --scheduler-expire-s > the "
                              f"heartbeat period ({self.heartbeat_s} s); got ttl {self.ttl_s}, expire {self.expire_s}")


def connect(config: SplitwiseConfig, socket_timeout_s: float = 5.0, on_connect=None) -> redis.Redis:
    """A checked connection: Redis answers and is new enough; else `ConfigError` naming the address.
    `on_connect()` runs after each (re)connection the client makes."""

    def connected(connection) -> None:
        connection.on_connect()
        if on_connect is not None:
            on_connect()

    # No retries inside redis-py (its default retries 10 times with backoff): the agent's loops
    # retry themselves and must notice at once that Redis is gone.
    client = redis.Redis(host=config.host, port=config.port, password=config.password,
                         socket_connect_timeout=2.0, socket_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
                         redis_connect_func=connected)
    where = f"the splitwise scheduler's Redis at {config.address} (--scheduler-host, --scheduler-port)"
    try:
        version = client.info("server")["redis_version"]
    except (redis.AuthenticationError, redis.ResponseError) as e:
        if config.password is None and isinstance(e, redis.AuthenticationError) or "NOAUTH" in str(e):
            raise ConfigError(f"{where} needs a password (--scheduler-password)") from None
        if isinstance(e, redis.AuthenticationError):
            raise ConfigError(f"{where} refused the password (--scheduler-password): {e}") from None
        raise ConfigError(f"{where} answered with an error: {e}") from None
    except redis.RedisError as e:
        raise ConfigError(f"cannot reach {where}: {e}") from None
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_REDIS_VERSION:
        raise ConfigError(f"{where} runs Redis {version}; the splitwise scheduler needs >= 6.2")
    return client


class RedisAgent:
    def __init__(self, config: SplitwiseConfig, info: NodeInfo, context: zmq.Context) -> None:
        """Connect (`ConfigError` if Redis is unreachable), clear this node's stale lists, register."""
        self.config = config
        self.keys = Keys(config.topic)
        self.node_id = info.node_id
        self.info = info  # replaced by the loop (`set_info`); the writer stamps and writes it
        self.view: dict[str, NodeInfo] = {}  # live nodes, by id, as of the last heartbeat
        self.last_seen_ts: dict[str, float] = {}  # node id -> the newest heartbeat seen of it (wall clock)
        self._writer_redis = connect(config)
        self._reader_connects = 0  # connections the reader's client has made (redis-py reconnects by itself)
        self._reader_redis = connect(config, socket_timeout_s=5.0 + 1.0,  # outlives the 1 s BRPOP
                                     on_connect=self._on_reader_connect)
        self._reap = self._writer_redis.register_script(_REAP)
        self._pushes: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._down_since: float | None = None
        self._last_beat_s = time.monotonic()  # the last heartbeat that Redis answered
        self._stopping = threading.Event()
        address = f"inproc://pdlab-splitwise-{uuid.uuid4().hex}"
        self.socket = context.socket(zmq.PAIR)  # the loop's end
        self.socket.bind(address)
        self._forward = context.socket(zmq.PAIR)  # the reader's end
        self._forward.connect(address)
        r = self._writer_redis
        self._run_id = _run_id(self._reader_redis)  # the server the lists are on; checked on every reconnect
        self._checked_connects = self._reader_connects
        r.delete(self.keys.inbox(self.node_id), self.keys.results(self.node_id))
        self._heartbeat()
        self._threads = [threading.Thread(target=self._write_loop, name="splitwise-writer", daemon=True),
                         threading.Thread(target=self._read_loop, name="splitwise-reader", daemon=True)]
        for thread in self._threads:
            thread.start()

    # --- the loop's side ---------------------------------------------------------------------

    def set_info(self, info: NodeInfo) -> None:
        self.info = info

    def push(self, key: str, payload: bytes) -> None:
        """Queue an LPUSH (with the TTL); the writer sends it, in order, as soon as it can."""
        self._pushes.put((key, payload))

    def push_task(self, node_id: str, payload: bytes) -> None:
        self.push(self.keys.inbox(node_id), payload)

    def push_result(self, node_id: str, payload: bytes) -> None:
        self.push(self.keys.results(node_id), payload)

    def down_for_s(self) -> float:
        """How long Redis has not answered (0 while heartbeats go through).

        A failed call says so at once; a call that hangs, or a writer that cannot run, shows as
        heartbeats overdue by more than two periods.
        """
        silent_s = time.monotonic() - self._last_beat_s
        overdue = silent_s > 3 * self.config.heartbeat_s + 0.5
        return silent_s if self._down_since is not None or overdue else 0.0

    def live_nodes(self) -> dict[str, NodeInfo]:
        """The nodes that had heartbeated within `expire_s` when the hash was last read.

        While Redis is down this is the last view, not an empty one: check `down_for_s` first.
        """
        return self.view

    def silent_for_s(self, node_id: str) -> float:
        """How long ago the newest heartbeat of `node_id` that this node has seen was written (inf: never seen).

        A node missing from the view is not gone for that alone: a Redis that restarted empty
        lists no node until each has heartbeated again.
        """
        return time.time() - self.last_seen_ts.get(node_id, float("-inf"))

    def close(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=3.0)
        try:  # leave at once rather than after expire_s
            self._writer_redis.hdel(self.keys.cluster, self.node_id)
        except redis.RedisError:
            pass
        self._forward.close(linger=0)
        self.socket.close(linger=0)
        self._writer_redis.close()
        self._reader_redis.close()

    # --- the threads --------------------------------------------------------------------------

    def _went_down(self, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("%s: lost the splitwise scheduler's Redis at %s: %s; retrying",
                        self.node_id, self.config.address, e)

    def _came_back(self) -> None:
        if self._down_since is not None:
            log.warning("%s: the splitwise scheduler's Redis at %s is back after %.1f s",
                        self.node_id, self.config.address, time.monotonic() - self._down_since)
            self._down_since = None

    def _write_loop(self) -> None:
        pending: list[tuple[str, bytes]] = []
        next_beat = time.monotonic() + self.config.heartbeat_s
        while not self._stopping.is_set():
            try:
                pending.append(self._pushes.get(timeout=max(0.0, next_beat - time.monotonic())))
            except queue.Empty:
                pass
            while True:
                try:
                    pending.append(self._pushes.get_nowait())
                except queue.Empty:
                    break
            if len(pending) > MAX_QUEUED_PUSHES:
                log.warning("%s: Redis unreachable; dropped %d queued pushes", self.node_id,
                            len(pending) - MAX_QUEUED_PUSHES)
                del pending[:len(pending) - MAX_QUEUED_PUSHES]
            try:
                if pending:
                    self._send(pending)
                    pending = []
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.config.heartbeat_s
                    self._heartbeat()
            except redis.RedisError as e:
                self._went_down(e)
                self._stopping.wait(min(0.5, self.config.heartbeat_s))

    def _send(self, pushes: list[tuple[str, bytes]]) -> None:
        ttl_ms = int(self.config.ttl_s * 1000)
        pipe = self._writer_redis.pipeline(transaction=False)
        for key, payload in pushes:
            pipe.lpush(key, payload)
        for key in {key for key, _ in pushes}:
            pipe.pexpire(key, ttl_ms)
        pipe.execute()

    def _heartbeat(self) -> None:
        r, keys = self._writer_redis, self.keys
        me = msgspec.structs.replace(self.info, ts=time.time())
        r.hset(keys.cluster, self.node_id, encode(me))
        # Redis answered: it is back now, before anyone can see this node listed again and send it work.
        self._last_beat_s = time.monotonic()
        self._came_back()
        view = {}
        now = time.time()
        entries = r.hgetall(keys.cluster)
        for node_id, raw in entries.items():
            node_id = node_id.decode(errors="replace")
            try:
                info = decode_node(raw)
            except MessageError as e:
                log.warning("%s: dropping a bad entry %r of %s: %s", self.node_id, node_id, keys.cluster, e)
                r.hdel(keys.cluster, node_id)
                continue
            if now - info.ts > self.config.expire_s:
                if self._reap(keys=[keys.cluster, keys.inbox(node_id), keys.results(node_id)], args=[node_id, raw]):
                    log.warning("%s: removed %s from the scheduler: no heartbeat for %.1f s",
                                self.node_id, node_id, now - info.ts)
                continue
            view[node_id] = info
            self.last_seen_ts[node_id] = max(info.ts, self.last_seen_ts.get(node_id, 0.0))
        self.view = view

    def _read_loop(self) -> None:
        r, keys = self._reader_redis, self.keys
        inbox, results = keys.inbox(self.node_id), keys.results(self.node_id)
        kinds = {inbox.encode(): INBOX, results.encode(): RESULTS}
        while not self._stopping.is_set():
            try:
                item = r.brpop([inbox, results], timeout=1)
                self._check_server(r)
                if item is None:
                    continue
                self._forward.send_multipart([kinds[item[0]], item[1]])
                for key in (inbox, results):  # the rest of what is queued, in batches
                    while batch := r.rpop(key, 256):
                        self._check_server(r)
                        for value in batch:
                            self._forward.send_multipart([kinds[key.encode()], value])
            except redis.RedisError as e:
                self._went_down(e)
                self._stopping.wait(0.2)

    def _on_reader_connect(self) -> None:
        self._reader_connects += 1

    def _check_server(self, r: redis.Redis) -> None:
        """After the reader's connection was made again (an error, or redis-py reconnecting by itself),
        and before anything read over it is forwarded: is it still the server whose lists we read?"""
        if self._reader_connects == self._checked_connects:
            return
        run_id = _run_id(r)
        self._checked_connects = self._reader_connects
        if run_id != self._run_id:
            log.warning("%s: the splitwise scheduler's Redis at %s restarted (run_id %s -> %s): its lists are lost",
                        self.node_id, self.config.address, self._run_id, run_id)
            self._run_id = run_id
            self._forward.send_multipart([RESTARTED, run_id.encode()])


def _run_id(client: redis.Redis) -> str:
    """The Redis server's run id: a new one each time it starts."""
    return str(client.info("server")["run_id"])

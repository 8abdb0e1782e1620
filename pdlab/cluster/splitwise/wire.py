"""What the splitwise scheduler keeps in Redis: typed structs as JSON (msgspec), never pickle.

Decoding validates every field and raises `MessageError` for anything else, so
a stray or hostile value in a list (a pickle payload, a truncated write) is
logged and dropped by the instance that pops it.
"""

from __future__ import annotations

import msgspec

from pdlab.cluster.messages import MessageError, RequestUpdate, SamplingMsg


class NodeInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One instance's heartbeat, in the `{topic}.cluster` hash under its node id."""

    node_id: str
    role: str  # "prefill", "decode" or "mixed"
    host: str  # the address its endpoints are on; two nodes with the same host can use ipc
    task_endpoint: str  # zmq address for prefill tasks (a prefill's --pd-comm-port, else its engine-worker-queue port)
    cache_endpoint: str  # zmq address for KV and PrefillDone (a decode's --pd-comm-port, else its cache-queue port)
    protocols: list[str]  # KV transfer protocols it can use, preferred first
    model: str
    load: float  # pdlab.policy.dispatch.instance_load
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    max_model_len: int
    incarnation: str  # changes when the process restarts
    ts: float  # wall-clock time of this heartbeat (time.time())
    rdma_ports: list[int] = []


class Task(msgspec.Struct, frozen=True, tag="task", forbid_unknown_fields=True):
    """A request for a decode or mixed instance, in its `{topic}.inbox.{node}` list."""

    request_id: str  # "{the router's request id}#{attempt}": unique across re-dispatches
    prompt_token_ids: list[int]
    sampling: SamplingMsg
    seed: int
    reply_to: str  # node id of the router: updates go to its results list
    deadline_ts: float  # wall clock; past it the request ends with an error (--scheduler-ttl)
    output_token_ids: list[int] = []  # tokens it already has (re-dispatched after a failure)
    # A decode instance's task: the prefill instance that computes the prompt, and how the KV travels.
    prefill_id: str = ""
    prefill_endpoint: str = ""
    protocol: str = ""


class TaskAbort(msgspec.Struct, frozen=True, tag="abort", forbid_unknown_fields=True):
    request_id: str


Inbox = Task | TaskAbort

_encoder = msgspec.json.Encoder()
_inbox = msgspec.json.Decoder(Inbox)
_update = msgspec.json.Decoder(RequestUpdate)
_node = msgspec.json.Decoder(NodeInfo)


def encode(value: NodeInfo | Task | TaskAbort | RequestUpdate) -> bytes:
    return _encoder.encode(value)


def _decode(decoder: msgspec.json.Decoder, data: bytes, what: str):
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise MessageError(f"malformed {what} in Redis ({len(data)} bytes): {e}") from None


def decode_inbox(data: bytes) -> Inbox:
    return _decode(_inbox, data, "inbox entry")


def decode_update(data: bytes) -> RequestUpdate:
    return _decode(_update, data, "result")


def decode_node(data: bytes) -> NodeInfo:
    return _decode(_node, data, "node entry")

"""Control-plane messages: small typed structs, msgpack on the wire (never pickle).

Grouped by the port that receives them:
- an instance's engine-worker-queue port: `GenerateRequest`, `AbortRequest`,
  `Ping` (from clients), `PrefillTask`, `AbortPrefill`, `KVAck` (from a decode
  instance), `WeightsRequest` (from an instance starting on the same GPU);
- a decode instance's cache-queue port: `KVLayer` (tcp transport data,
  followed by the raw bytes as a second frame), `PrefillDone`, `PrefillFailed`
  (from a prefill instance);
- a client: `RequestUpdate`, `Pong`, `WeightsOffer`.
`encode`/`decode` handle every type; decoding validates types and rejects
anything else with `MessageError`.
"""

from __future__ import annotations

import dataclasses
import typing

import msgspec

from pdlab.engine.weight_refs import SharedWeights
from pdlab.sampling_params import SamplingParams


class MessageError(ValueError):
    """Bytes that are not a valid control-plane message."""


def _sampling_struct() -> type[msgspec.Struct]:
    """`SamplingParams`' wire form: the same fields, types and defaults, declared once (in sampling_params.py)."""
    hints = typing.get_type_hints(SamplingParams)
    fields = [(f.name, hints[f.name], f.default) for f in dataclasses.fields(SamplingParams)]
    return msgspec.defstruct("SamplingMsg", fields, frozen=True, forbid_unknown_fields=True, module=__name__)


SamplingMsg = _sampling_struct()


class KVRank(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one tensor-parallel rank's cache is (the per-rank fields of `KVDescriptor`)."""

    ipc_handle: bytes = b""
    ipc_offset: int = 0
    ipc_pid: int = 0
    ipc_ptr: int = 0
    ipc_device: int = 0
    shm_name: str = ""
    rdma_endpoint: str = ""


class KVDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where and how a decode instance receives KV: enough for a prefill instance to push to it.

    The cache fields describe rank 0's cache (of a tensor-parallel instance: its KV heads);
    `ranks` holds every rank's own, and prefill rank r writes into decode rank r (`for_rank`).
    """

    instance_id: str
    protocol: str  # "tcp", "ipc", "rdma"
    cache_endpoint: str  # zmq address of the decode instance's cache-queue port
    # The decode cache's layout; the prefill side checks it matches its own.
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # ipc on GPUs: a CUDA IPC handle (64 bytes) of the allocation holding the cache, the
    # cache's byte offset in it, and the exporter's pid and raw pointer (usable as is
    # by a sender in the same process, where IPC handles cannot be opened).
    ipc_handle: bytes = b""
    ipc_offset: int = 0
    ipc_pid: int = 0
    ipc_ptr: int = 0
    ipc_device: int = 0
    # ipc on CPUs: the shared-memory file that holds the cache.
    shm_name: str = ""
    host: str = ""
    # rdma: "host:port" of the decode instance's rdma comm port (one per GPU), where a prefill
    # sets up its queue pair and learns the cache's memory region (pdlab/transfer/rdma.py).
    rdma_endpoint: str = ""
    # Tensor parallelism: the decode instance's size, and each rank's cache (empty: one rank).
    tensor_parallel_size: int = 1
    ranks: list[KVRank] = []

    def for_rank(self, rank: int) -> KVDescriptor:
        """The descriptor of rank `rank`'s cache."""
        if not self.ranks:
            return self
        return msgspec.structs.replace(self, **msgspec.structs.asdict(self.ranks[rank]), ranks=[])


# --- engine-worker-queue port --------------------------------------------------------


class GenerateRequest(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingMsg


class AbortRequest(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    request_id: str


class Ping(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Ask an instance whether it is up, and for its load."""


class KVAck(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """The decode side took the KV (or gave up on it): the prefill side may free its blocks."""

    request_id: str


class PrefillTask(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Compute this prompt, push its KV into `dst_block_ids` of `kv`, then report the first token."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingMsg
    seed: int
    dst_block_ids: list[int]
    kv: KVDescriptor
    # A request resumed after the instance serving it failed: the tokens it already generated.
    # Their KV is computed and sent with the prompt's; the first token reported is the next one.
    output_token_ids: list[int] = []


class AbortPrefill(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    request_id: str


# --- cache-queue port ------------------------------------------------------------------


class KVLayer(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Header of one layer's blocks (tcp); the next frame holds [2, n, block_size, heads, head_dim] raw."""

    request_id: str
    layer: int
    dst_block_ids: list[int]
    dtype: str
    shape: tuple[int, ...]


class PrefillDone(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Every layer of the prompt's KV has been written to the decode side; here is the first token."""

    request_id: str
    first_token_id: int
    logprobs: dict[int, float] | None = None
    prefill_instance_id: str = ""
    # tcp: how many KVLayer frames the prefill sent for it (-1: not counted); the decode instance
    # checks it received as many, so that KV lost on the way never produces a token.
    num_kv_frames: int = -1


class PrefillFailed(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    request_id: str
    error: str


# --- client ------------------------------------------------------------------------------


# The start of the error of a request refused because too many wait already (--max-waiting-requests);
# the API server answers it with 503 and Retry-After.
QUEUE_FULL = "queue full"


class RequestUpdate(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    text: str | None = None  # the whole output's text, on the final update
    logprobs: list[dict[int, float]] | None = None  # one entry per new token, when asked
    # With an error: the request is not at fault (an instance it needed was lost), so a router may
    # send it elsewhere, with the tokens it has so far.
    retry: bool = False


class Pong(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    instance_id: str
    role: str
    model: str
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int  # waiting here, or for KV blocks / transfers on a decode instance
    num_held: int  # finished requests whose blocks a transfer still uses
    incarnation: str = ""  # changes when the process restarts: tasks sent before are lost
    # What was loaded, for banners and request validation in front ends.
    dtype: str = ""
    device: str = ""
    block_size: int = 0
    max_model_len: int = 0
    vocab_size: int = 0
    scheduler: str = ""  # "splitwise": requests to this instance are routed through the global scheduler


class WeightsRequest(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """From an instance starting on the same GPU: how to map this instance's weights."""


class WeightsOffer(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    weights: SharedWeights | None = None
    error: str = ""  # why there is none (e.g. the weights are not on a GPU)


Message = (
    GenerateRequest | AbortRequest | Ping | PrefillTask | AbortPrefill | KVAck
    | KVLayer | PrefillDone | PrefillFailed | RequestUpdate | Pong | WeightsRequest | WeightsOffer
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    try:
        return _decoder.decode(data)
    # msgspec lets invalid UTF-8 and very deep nesting through as other exceptions.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise MessageError(f"malformed control message ({len(data)} bytes): {e}") from None


def sampling_to_msg(params: SamplingParams) -> SamplingMsg:
    """`SamplingParams` -> its wire form (same field names)."""
    return SamplingMsg(**{f: getattr(params, f) for f in SamplingMsg.__struct_fields__})


def sampling_from_msg(msg: SamplingMsg, **changes) -> SamplingParams:
    """The wire form -> `SamplingParams`, validated (raises InvalidRequestError naming the field)."""
    fields = {f: getattr(msg, f) for f in SamplingMsg.__struct_fields__}
    return SamplingParams(**{**fields, **changes})

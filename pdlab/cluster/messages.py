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

# Where a decode instance's cache is, and the tcp transport's layer header: defined beside the transports that
# read them, part of this module's messages (KVLayer arrives on the cache-queue port, KVDescriptor in a PrefillTask).
from pdlab.transfer.descriptor import KVDescriptor, KVLayer, KVRank  # noqa: F401 (KVRank: re-exported)


class MessageError(ValueError):
    """Bytes that are not a valid control-plane message."""


def _sampling_struct() -> type[msgspec.Struct]:
    """`SamplingParams`' wire form: the same fields, types and defaults, declared once (in sampling_params.py)."""
    hints = typing.get_type_hints(SamplingParams)
    fields = [(f.name, hints[f.name], f.default) for f in dataclasses.fields(SamplingParams)]
    return msgspec.defstruct("SamplingMsg", fields, frozen=True, forbid_unknown_fields=True, module=__name__)


SamplingMsg = _sampling_struct()


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

"""Control-plane messages: every type survives the wire, and anything else is a MessageError."""

from __future__ import annotations

import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.cluster import messages
from pdlab.cluster.messages import (
    AbortPrefill,
    AbortRequest,
    GenerateRequest,
    KVAck,
    KVDescriptor,
    KVLayer,
    KVRank,
    MessageError,
    Ping,
    Pong,
    PrefillDone,
    PrefillFailed,
    PrefillTask,
    RequestUpdate,
    SamplingMsg,
    WeightsOffer,
    WeightsRequest,
    decode,
    encode,
    sampling_from_msg,
    sampling_to_msg,
)
from pdlab.engine.weight_refs import QuantizedRef, SharedWeights, TensorRef
from pdlab.errors import InvalidRequestError
from pdlab.sampling_params import SamplingParams
from tests.fuzz import corrupted

MESSAGE_TYPES = typing.get_args(messages.Message)

SAMPLING = SamplingMsg(
    max_tokens=77, temperature=0.5, top_p=0.9, top_k=40, seed=1234, stop=("</s>", "\n\n"),
    stop_token_ids=(2, 32000), ignore_eos=True, include_stop_str_in_output=True, logprobs=5,
)
KV = KVDescriptor(
    instance_id="decode-1", protocol="ipc", cache_endpoint="tcp://10.0.0.2:5601", num_layers=30, num_blocks=4096,
    block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16", ipc_handle=bytes(range(64)), ipc_offset=4096,
    ipc_pid=31337, ipc_ptr=0x7F00_0000_1000, ipc_device=1, shm_name="/pdlab-kv-decode-1", host="10.0.0.2",
    rdma_endpoint="10.0.0.2:7671", tensor_parallel_size=2,
    ranks=[KVRank(ipc_handle=bytes(64), shm_name="/dev/shm/pdlab-kv-1"), KVRank(ipc_pid=7, rdma_endpoint="10.0.0.2:7672")],
)
EXAMPLES = [
    GenerateRequest("req-1", [1, 2, 3, 50_000], SAMPLING),
    AbortRequest("req-2"),
    Ping(),
    PrefillTask("req-3", [5, 6, 7], SAMPLING, seed=2**63 - 1, dst_block_ids=[4, 5, 6], kv=KV, output_token_ids=[9, 8]),
    AbortPrefill("req-4"),
    KVLayer("req-5", layer=29, dst_block_ids=[7, 8], dtype="float16", shape=(2, 2, 16, 3, 64)),
    PrefillDone("req-6", first_token_id=42, logprobs={42: -0.25, 7: -1.5}, prefill_instance_id="prefill-0",
                num_kv_frames=12),
    PrefillFailed("req-7", error="CUDA error: out of memory"),
    KVAck("req-8"),
    RequestUpdate("req-9", new_token_ids=[3, 4], finished=True, finish_reason="stop", error="detokenizer: bad byte",
                  num_prompt_tokens=12, text="héllo ✓ 世界", logprobs=[{3: -0.1}, {4: -0.2, 9: -3.0}], retry=True),
    Pong("decode-1", role="decode", model="SmolLM2-135M", num_blocks=4096, num_free_blocks=4000, num_running=3,
         num_waiting=2, num_held=1, incarnation="7f3a", dtype="bfloat16", device="cuda:0", block_size=16,
         max_model_len=8192, vocab_size=49152, scheduler="splitwise"),
    WeightsRequest(),
    WeightsOffer(SharedWeights(
        model="llama3-8b", dtype="bfloat16", quantization="wint4", device_uuid="GPU-1234", handles=[bytes(range(64))],
        allocation_bytes=[1 << 30], tensors=[TensorRef("layers.0.o_proj.qweight", "uint8", [4096, 2048], 0, 512)],
        quantized=[QuantizedRef("layers.0.o_proj", "wint4", [4096, 4096], "bfloat16")]), error="not on a GPU"),
]
EXAMPLE = {type(m): m for m in EXAMPLES}


def struct_fields(value: msgspec.Struct):
    """(path, field, value) of every field of `value` and of the structs nested in it."""
    for field in msgspec.structs.fields(value):
        field_value = getattr(value, field.name)
        yield f"{type(value).__name__}.{field.name}", field, field_value
        if isinstance(field_value, msgspec.Struct):
            yield from struct_fields(field_value)


def test_the_examples_cover_every_message_type_with_every_field_off_its_default():
    assert sorted(type(m).__name__ for m in EXAMPLES) == sorted(t.__name__ for t in MESSAGE_TYPES)
    for message in EXAMPLES:
        for path, field, value in struct_fields(message):
            if field.default is not msgspec.NODEFAULT:
                assert value != field.default, f"{path} keeps its default: the round trip would not test it"
            if field.default_factory is not msgspec.NODEFAULT:
                assert value != field.default_factory(), path
            assert value not in ("", 0, [], (), b""), f"{path} is empty"


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    data = encode(message)
    assert isinstance(data, bytes)
    decoded = decode(data)
    assert type(decoded) is type(message) and decoded == message
    # The wire format other processes rely on: a msgpack map tagged with the class name.
    raw = msgspec.msgpack.decode(data)
    assert raw["type"] == type(message).__name__
    assert set(raw) == {"type"} | set(message.__struct_fields__)


def test_nested_values_come_back_with_their_types():
    task = decode(encode(EXAMPLE[PrefillTask]))
    assert isinstance(task.kv.ipc_handle, bytes) and len(task.kv.ipc_handle) == 64
    assert task.kv.ipc_ptr == 0x7F00_0000_1000 and task.seed == 2**63 - 1
    assert task.sampling.stop == ("</s>", "\n\n") and task.sampling.stop_token_ids == (2, 32000)
    assert decode(encode(EXAMPLE[KVLayer])).shape == (2, 2, 16, 3, 64)
    assert decode(encode(EXAMPLE[PrefillDone])).logprobs == {42: -0.25, 7: -1.5}


def test_defaults_round_trip():
    for message in (PrefillDone("r", 1), RequestUpdate("r", []), GenerateRequest("r", [1], SamplingMsg())):
        assert decode(encode(message)) == message


def test_sampling_params_survive_the_wire_form():
    params = SamplingParams(**{f: getattr(SAMPLING, f) for f in SamplingMsg.__struct_fields__})
    msg = sampling_to_msg(params)
    assert msg == SAMPLING
    assert sampling_from_msg(decode(encode(GenerateRequest("r", [1], msg))).sampling) == params
    assert sampling_from_msg(msg, max_tokens=1).max_tokens == 1
    # The wire checks types only; the values are checked on the way back to SamplingParams.
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        sampling_from_msg(SamplingMsg(max_tokens=0))


# --- rejection ---------------------------------------------------------------------------------

VALID_GENERATE = {"type": "GenerateRequest", "request_id": "r", "prompt_token_ids": [1, 2], "sampling": {"max_tokens": 4}}
VALID_TASK = {
    "type": "PrefillTask", "request_id": "r", "prompt_token_ids": [1], "sampling": {}, "seed": 1, "dst_block_ids": [0],
    "kv": {"instance_id": "d", "protocol": "tcp", "cache_endpoint": "tcp://h:1", "num_layers": 1, "num_blocks": 1,
           "block_size": 16, "num_kv_heads": 1, "head_dim": 8, "dtype": "float16"},
}


def with_(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with `value` at the dotted `path`."""
    out = msgspec.msgpack.decode(msgspec.msgpack.encode(base))
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def assert_rejected(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


def test_the_hand_built_maps_are_valid():
    assert decode(msgspec.msgpack.encode(VALID_GENERATE)) == GenerateRequest("r", [1, 2], SamplingMsg(max_tokens=4))
    assert isinstance(decode(msgspec.msgpack.encode(VALID_TASK)), PrefillTask)


def test_empty_bytes_are_rejected():
    assert_rejected(b"")


@pytest.mark.parametrize("data", [b"\xc1", b"\xff\xff\xff\xff", b"GET / HTTP/1.1\r\n\r\n", b"\x93\x01\x02", b"\xc0",
                                  b"\x05", b"\xa5hello", b"\xd4\x05\x00", bytes(range(256))])
def test_garbage_is_rejected(data):
    assert_rejected(data)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_rejected(message):
    data = encode(message)
    for n in range(len(data)):
        assert_rejected(data[:n])
    assert_rejected(data + b"\x00")  # trailing bytes are not another message


@pytest.mark.parametrize("data", [
    with_(VALID_GENERATE, "bogus", 1),
    with_(VALID_GENERATE, "sampling.bogus", 1),
    with_(VALID_TASK, "kv.bogus", "x"),
    {"type": "KVAck", "request_id": "r", "extra": None},
], ids=["top", "sampling", "kv", "null"])
def test_unknown_fields_are_rejected(data):
    assert_rejected(msgspec.msgpack.encode(data))


@pytest.mark.parametrize("data", [
    with_(VALID_GENERATE, "request_id", 7),
    with_(VALID_GENERATE, "prompt_token_ids", "1 2 3"),
    with_(VALID_GENERATE, "prompt_token_ids", [1, "2"]),
    with_(VALID_GENERATE, "prompt_token_ids", [1.5]),
    with_(VALID_GENERATE, "sampling", None),
    with_(VALID_GENERATE, "sampling.max_tokens", "4"),
    with_(VALID_GENERATE, "sampling.ignore_eos", 1),
    with_(VALID_GENERATE, "sampling.stop", "</s>"),
    with_(VALID_TASK, "seed", True),
    with_(VALID_TASK, "kv.ipc_handle", "not bytes"),
    with_(VALID_TASK, "kv.num_layers", 1.0),
    with_(VALID_TASK, "kv", []),
    {"type": "PrefillDone", "request_id": "r", "first_token_id": 1, "logprobs": {"1": -0.5}},
    {"type": "KVLayer", "request_id": "r", "layer": 0, "dst_block_ids": [0], "dtype": "f", "shape": [2, "x"]},
    {"type": "RequestUpdate", "request_id": "r", "new_token_ids": [1], "finished": "yes"},
    {"type": "KVAck"},  # a required field missing
])
def test_wrong_field_types_are_rejected(data):
    assert_rejected(msgspec.msgpack.encode(data))


@pytest.mark.parametrize("data", [
    {"type": "Shutdown", "request_id": "r"},
    {"type": "SamplingMsg"},  # a struct, but not a message
    {"type": "kvack", "request_id": "r"},
    {"type": 3, "request_id": "r"},
    {"request_id": "r"},  # no tag at all
    ["KVAck", "r"],
], ids=["unknown", "not-a-message", "case", "int", "missing", "array"])
def test_unknown_or_missing_tags_are_rejected(data):
    assert_rejected(msgspec.msgpack.encode(data))


# msgspec raises UnicodeDecodeError for invalid UTF-8 in a str value and RecursionError for deep
# nesting under an unknown key (msgspec/msgspec#714); `decode` must turn both into MessageError.
@pytest.mark.parametrize("path", ["type", "request_id"])
def test_invalid_utf8_is_rejected(path):
    data = msgspec.msgpack.encode({"type": "KVAck", "request_id": "r"})
    value = {"type": b"\xa5KVAck", "request_id": b"\xa1r"}[path]
    assert_rejected(data.replace(value, value[:1] + b"\xff" + value[2:]))


def test_deep_nesting_is_rejected():
    assert_rejected(b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0")  # {"a": [[[...]]]}, 100 kB


# --- fuzz ----------------------------------------------------------------------------------------


def decodes_or_rejects(data: bytes, allow: tuple[type[BaseException], ...] = ()) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    except allow:
        return
    assert isinstance(message, MESSAGE_TYPES)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_decode_to_a_message_or_raise_message_error(data):
    decodes_or_rejects(data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(EXAMPLES).map(encode), st.data())
def test_corrupted_encodings_decode_to_a_message_or_raise_message_error(data, draw):
    decodes_or_rejects(corrupted(data, draw.draw, max_edits=4, edits=("replace", "insert", "delete", "truncate")))


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(st.characters(codec="utf-8"), max_size=8) | st.binary(max_size=8)
    | st.sampled_from([t.__name__ for t in MESSAGE_TYPES] + ["type", "request_id", "kv", "sampling"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "request_id", "prompt_token_ids", "sampling", "kv", "shape", "logprobs", "x"]),
        children, max_size=6),
    max_leaves=20,
))
def test_random_msgpack_values_decode_to_a_message_or_raise_message_error(value):
    decodes_or_rejects(msgspec.msgpack.encode(value))

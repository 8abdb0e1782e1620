"""What the splitwise scheduler writes to Redis: every struct round-trips; anything else is a MessageError."""

from __future__ import annotations

import pickle

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.cluster.messages import MessageError, RequestUpdate, SamplingMsg
from pdlab.cluster.splitwise.keys import Keys
from pdlab.cluster.splitwise.router import pair_protocol
from pdlab.cluster.splitwise.wire import NodeInfo, Task, TaskAbort, decode_inbox, decode_node, decode_update, encode
from tests.fuzz import corrupted

SAMPLING = SamplingMsg(max_tokens=64, temperature=0.7, top_p=0.9, top_k=20, seed=99, stop=("\n",),
                       stop_token_ids=(2,), ignore_eos=True, include_stop_str_in_output=True, logprobs=3)
NODE = NodeInfo("decode@10.0.0.2:8186", "decode", "10.0.0.2", "tcp://10.0.0.2:8186", "tcp://10.0.0.2:2334",
                ["rdma", "ipc", "tcp"], "llama3-8b", 3.0, 2, 1, 900, 1000, 8192, "42-1", 1764600000.25,
                rdma_ports=[7671, 7672])
TASK = Task("cmpl-1#2", [1, 2, 3], SAMPLING, 2**63 - 1, "prefill@10.0.0.1:8182", 1764600900.5, [7, 8],
            "prefill@10.0.0.1:8182", "tcp://10.0.0.1:2334", "rdma")
UPDATE = RequestUpdate("cmpl-1#2", [4, 5], True, "error", "prefill lost", 3, "text ✓", [{4: -0.5}, {5: -1.0}], True)


def fields_off_default(value: msgspec.Struct) -> list[str]:
    return [f.name for f in msgspec.structs.fields(value)
            if f.default is not msgspec.NODEFAULT and getattr(value, f.name) == f.default]


@pytest.mark.parametrize("value, decoder", [(NODE, decode_node), (TASK, decode_inbox), (TaskAbort("x#1"), decode_inbox),
                                            (UPDATE, decode_update)])
def test_every_struct_round_trips_as_json(value, decoder):
    assert not fields_off_default(value), "the example should set every field"
    data = encode(value)
    assert data.startswith(b"{"), "Redis holds readable JSON"
    assert decoder(data) == value


@pytest.mark.parametrize("decoder", [decode_node, decode_inbox, decode_update])
@pytest.mark.parametrize("data", [
    pickle.dumps({"request_id": "x"}), b"", b"{", b"[]", b"null", b'{"type": "task"}', b'{"type": "rm -rf"}',
    b"\xff\xfe\x00", b"[" * 100_000,
])
def test_garbage_and_pickle_payloads_are_refused(decoder, data):
    with pytest.raises(MessageError):
        decoder(data)


DECODES_TO = [(decode_node, (NodeInfo,)), (decode_inbox, (Task, TaskAbort)), (decode_update, (RequestUpdate,))]


JSON_BYTES = list(b'{}[]",:0123456789aetnrsu ')  # edits that often leave JSON, and sometimes a struct


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.sampled_from([encode(v) for v in (NODE, TASK, TaskAbort("x#1"), UPDATE)])
       .flatmap(lambda data: st.composite(lambda draw: corrupted(data, draw, JSON_BYTES))()))
def test_random_and_corrupted_bytes_decode_to_the_right_struct_or_raise_message_error(data):
    for decoder, types in DECODES_TO:
        try:
            value = decoder(data)
        except MessageError:
            continue
        assert isinstance(value, types), (decoder.__name__, value)


def test_a_truncated_entry_is_refused():
    data = encode(TASK)
    for cut in range(0, len(data), 7):
        with pytest.raises(MessageError):
            decode_inbox(data[:cut])


def test_keys_are_namespaced_by_topic():
    keys = Keys("prod")
    assert (keys.cluster, keys.inbox("d1"), keys.results("p1")) == ("prod.cluster", "prod.inbox.d1", "prod.results.p1")


def node(host: str, protocols: list[str]) -> NodeInfo:
    return msgspec.structs.replace(NODE, host=host, protocols=protocols)


def test_the_pair_protocol_is_ipc_on_one_host_rdma_when_both_have_it_else_tcp():
    assert pair_protocol(node("a", ["ipc", "tcp"]), node("a", ["ipc", "tcp"])) == "ipc"
    assert pair_protocol(node("a", ["rdma", "ipc", "tcp"]), node("b", ["rdma", "ipc", "tcp"])) == "rdma"
    assert pair_protocol(node("a", ["rdma", "ipc", "tcp"]), node("a", ["rdma", "ipc", "tcp"])) == "ipc"
    assert pair_protocol(node("a", ["ipc", "tcp"]), node("b", ["rdma", "ipc", "tcp"])) == "tcp"
    assert pair_protocol(node("a", ["tcp"]), node("a", ["ipc", "tcp"])) == "tcp"

"""A decode instance with several `--innode-prefill-ports`: which prefill gets each task.

Two stand-in prefills (tests/cluster/fake_prefill.py) and a port where nothing
listens. Each task goes to the prefill with the fewest transfers outstanding
(`LeastLoaded`); a send that fails (nothing connected there) moves the task
to the next least loaded, so the dead port, always the least loaded, never
costs a request.
"""

from __future__ import annotations

import time

from pdlab import SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import free_port
from pdlab.cluster.messages import PrefillTask
from pdlab.engine.outputs import RequestOutput

from .conftest import instance_args, is_idle
from .fake_prefill import FakePrefill, complete

PROMPT = list(range(3, 43))  # 40 tokens: 3 blocks
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
# Long: this test is about where tasks go, not about prefills that stop answering.
TRANSFER_TIMEOUT_S = 60.0


def wait_for(engine: RemoteEngine, outs: dict[str, RequestOutput], request_id: str, timeout_s: float = 30.0) -> None:
    """Step the client until `request_id` has finished (its output lands in `outs`)."""
    deadline = time.monotonic() + timeout_s
    while request_id not in outs and time.monotonic() < deadline:
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert request_id in outs, f"{request_id} never finished"


def next_task_at_either(fakes: list[FakePrefill], timeout_s: float = 20.0) -> tuple[FakePrefill, PrefillTask]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for fake in fakes:
            fake.answer_pings()
            if fake.queued:
                return fake, fake.queued.popleft()
        time.sleep(0.01)
    raise AssertionError("no prefill got the task")


def test_each_task_goes_to_the_least_loaded_prefill_and_past_one_that_cannot_take_it(cluster):
    fakes = [FakePrefill(), FakePrefill()]
    dead = free_port()  # outstanding 0 forever, so picked first every time: every send there fails
    try:
        ports = ",".join(str(p) for p in (dead, fakes[0].port, fakes[1].port))
        decode_proc = cluster.start("decode", "tiny", instance_args(
            "tcp", 512, TRANSFER_TIMEOUT_S, ["--innode-prefill-ports", ports, "--num-gpu-blocks", "64"]))
        decode_proc.wait_ready(120)
        engine = RemoteEngine(decode_proc.endpoint)
        outs: dict[str, RequestOutput] = {}
        try:
            # One task to each live prefill: loads (dead 0, 0, 0), then 0 against 1.
            engine.add_request(PROMPT, PARAMS, "first")
            engine.add_request(PROMPT, PARAMS, "second")
            held = [fake.next_task() for fake in fakes]
            assert sorted(t.request_id.split("/")[0] for t in held) == ["first", "second"]
            # Loads (dead 0, 1, 1): only the dead port is least loaded; the send there fails, a live one takes it.
            engine.add_request(PROMPT, PARAMS, "third")
            idle, task = next_task_at_either(fakes)
            busy = fakes[1 - fakes.index(idle)]
            for done_task in (task, held[fakes.index(idle)]):
                complete(idle, done_task)
                wait_for(engine, outs, done_task.request_id.split("/")[0])
            # Loads (dead 0, busy 1, idle 0): each new task goes to idle, which stays the least loaded live one.
            for i in range(4):
                engine.add_request(PROMPT, PARAMS, f"r{i}")
                task = idle.next_task()
                assert task.request_id.startswith(f"r{i}/")
                complete(idle, task)
                wait_for(engine, outs, f"r{i}")
            busy.answer_pings()
            assert not busy.queued, f"a task went to the busier prefill: {[t.request_id for t in busy.queued]}"
            complete(busy, held[fakes.index(busy)])
            outs.update(engine.drain(30.0))
        finally:
            engine.close()
        assert {r: (o.error, o.token_ids[:1]) for r, o in outs.items()} == {
            r: (None, [7]) for r in ["first", "second", "third", "r0", "r1", "r2", "r3"]}
        deadline = time.monotonic() + 10.0
        while not is_idle(pong := ping(decode_proc.endpoint)):
            assert time.monotonic() < deadline, f"blocks left: {pong}\n{decode_proc.log_tail(20)}"
            for fake in fakes:
                fake.answer_pings()
    finally:
        for fake in fakes:
            fake.close()

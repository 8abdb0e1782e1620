"""An instance's Prometheus metrics, served on `--metrics-port` (none: not served, still counted).

Every metric carries the labels `role` (mixed, prefill, decode) and
`instance_id` (`--instance-id`; not `instance`, which Prometheus sets to the
scrape target and would rename to `exported_instance`).

Gauges are read from the live scheduler when scraped (the HTTP server's
thread reads only lengths and ints; the loop pays nothing). Counters and
histograms are updated by the roles, on the loop thread, through the `on_*`
hooks below; times are the engine clock's, taken in this instance (on a
decode instance a request arrives when its `GenerateRequest` does, and its
first token comes with `PrefillDone`).

What each role counts:
- mixed, decode (client-facing): prompt tokens when a request's first token
  goes out (on a decode instance those of the requests it served, computed
  by a prefill instance), generation tokens as they stream, and, once per
  finished request, its finish reason, TTFT, TPOT, E2E latency, preemptions;
- prefill: prompt tokens and prefill time (task received -> `PrefillDone`
  sent) per completed task, and its preemptions;
- KV transfer: bytes sent (prefill) or received (decode), counted as blocks x
  bytes per block for every protocol (ipc moves no frame), completed
  transfers, failed ones by reason, latency (decode: task dispatched ->
  `PrefillDone` received).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from pdlab.errors import ConfigError

if TYPE_CHECKING:
    from pdlab.engine.outputs import RequestOutput
    from pdlab.policy.scheduler import Scheduler

LABELS = ("role", "instance_id")
FINISH_REASONS = ("stop", "length", "abort", "error")
# timeout: no prefill instance took the task in time; prefill_lost: it closed its connection, restarted or
# stopped answering; prefill_failed: it could not compute or send the KV (or its KV could not be written);
# aborted: the request was aborted while its KV was on its way.
# decode_lost (prefill): the connection to the decode instance dropped, or it stopped answering heartbeats.
TRANSFER_FAILURES = ("timeout", "prefill_lost", "prefill_failed", "aborted", "decode_lost")
REFUSALS = ("queue_full",)  # --max-waiting-requests requests were waiting already

# From milliseconds (a small model on a GPU) to minutes (a long queue).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                  0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class InstanceMetrics:
    """The metrics of one instance, in their own registry (never the process-global one)."""

    def __init__(self, role: str, instance_id: str, registry: CollectorRegistry | None = None) -> None:
        self.role = role
        self.instance_id = instance_id
        self.registry = registry if registry is not None else CollectorRegistry()
        self.kv_bytes_per_block = 0
        self.block_size = 1
        self._server = None

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*LABELS, *labels), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry).labels(role, instance_id)

        ids = (role, instance_id)
        self.prompt_tokens = counter("pdlab:prompt_tokens",
                                     "Prompt tokens of the requests served (prefill: computed).").labels(*ids)
        self.generation_tokens = counter("pdlab:generation_tokens", "Output tokens streamed to clients.").labels(*ids)
        finished = counter("pdlab:requests_finished", "Finished requests by finish reason.", ("finish_reason",))
        self.finished = {reason: finished.labels(*ids, reason) for reason in FINISH_REASONS}
        refused = counter("pdlab:requests_refused", "Requests refused before they were queued, by reason.",
                          ("reason",))
        self.refused = {reason: refused.labels(*ids, reason) for reason in REFUSALS}
        self.preemptions = counter("pdlab:num_preemptions",
                                   "Preemptions (recomputations), counted when their request finishes.").labels(*ids)
        self.kv_sent_bytes = counter("pdlab:kv_transfer_sent_bytes", "KV bytes pushed to decode instances.").labels(*ids)
        self.kv_received_bytes = counter("pdlab:kv_transfer_received_bytes",
                                         "KV bytes received from prefill instances.").labels(*ids)
        self.transfers = counter("pdlab:kv_transfers_completed", "KV transfers completed.").labels(*ids)
        failed = counter("pdlab:kv_transfers_failed", "KV transfers that did not complete, by reason.", ("reason",))
        self.transfers_failed = {reason: failed.labels(*ids, reason) for reason in TRANSFER_FAILURES}

        self.ttft = histogram("pdlab:time_to_first_token_seconds",
                              "Time from the request's arrival at this instance to its first token.", TTFT_BUCKETS_S)
        self.tpot = histogram("pdlab:time_per_output_token_seconds",
                              "Mean time per output token after the first, per finished request.", TPOT_BUCKETS_S)
        self.e2e = histogram("pdlab:e2e_request_latency_seconds",
                             "Time from the request's arrival at this instance to its end.", E2E_BUCKETS_S)
        self.prefill_time = histogram("pdlab:prefill_time_seconds",
                                      "Prefill instance: prefill task received -> PrefillDone sent.", TTFT_BUCKETS_S)
        self.transfer_latency = histogram("pdlab:kv_transfer_latency_seconds",
                                          "Decode instance: prefill task dispatched -> PrefillDone received.",
                                          TRANSFER_BUCKETS_S)

    # --- setup ---------------------------------------------------------------------------

    def watch(self, scheduler: Scheduler, kv_bytes_per_block: int) -> None:
        """Report `scheduler`'s queues and blocks as gauges, read at scrape time."""
        self.kv_bytes_per_block = kv_bytes_per_block
        self.block_size = scheduler.block_manager.block_size
        self.registry.register(_SchedulerCollector(scheduler, (self.role, self.instance_id)))

    def serve(self, port: int, host: str) -> None:
        """Serve /metrics on host:port from a daemon thread; a port in use raises ConfigError naming it."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on --metrics-port {port} ({host}:{port}): {e.strerror or e}"
                              ) from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def kv_bytes(self, num_prompt_tokens: int) -> int:
        """Bytes of a prompt's KV: the blocks it fills, whole."""
        return -(-num_prompt_tokens // self.block_size) * self.kv_bytes_per_block

    # --- hooks (the loop thread) -----------------------------------------------------------

    def on_output(self, out: RequestOutput, num_new_tokens: int) -> None:
        """Client-facing roles: `num_new_tokens` of `out` are going to its client now."""
        if num_new_tokens and num_new_tokens == len(out.token_ids):  # its first tokens
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            if out.ttft_s is not None:
                self.ttft.observe(out.ttft_s)
        self.generation_tokens.inc(num_new_tokens)
        if not out.finished:
            return
        self.finished[_reason(out.finish_reason)].inc()
        self.preemptions.inc(out.num_preemptions)
        if out.e2e_s is not None:
            self.e2e.observe(out.e2e_s)
        if out.tpot_s is not None:
            self.tpot.observe(out.tpot_s)

    def on_prefill_done(self, out: RequestOutput, now_s: float) -> None:
        """Prefill role: the KV of `out`'s prompt is in the decode instance and PrefillDone is sent."""
        num_prompt_tokens = len(out.prompt_token_ids)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.preemptions.inc(out.num_preemptions)
        self.prefill_time.observe(now_s - out.arrival_time_s)
        self.kv_sent_bytes.inc(self.kv_bytes(num_prompt_tokens))
        self.transfers.inc()

    def on_kv_received(self, num_prompt_tokens: int, latency_s: float) -> None:
        """Decode role: PrefillDone arrived for a request still waiting for its KV."""
        self.kv_received_bytes.inc(self.kv_bytes(num_prompt_tokens))
        self.transfers.inc()
        self.transfer_latency.observe(latency_s)

    def on_transfer_failed(self, reason: str) -> None:
        self.transfers_failed[reason].inc()

    def on_refused(self, reason: str) -> None:
        self.refused[reason].inc()


def _reason(finish_reason: str | None) -> str:
    return finish_reason if finish_reason in FINISH_REASONS else "error"


class _SchedulerCollector:
    """Gauges read at scrape time, from the HTTP thread: only lengths and ints of the live scheduler."""

    def __init__(self, scheduler: Scheduler, label_values: tuple[str, str]) -> None:
        self.scheduler = scheduler
        self.label_values = label_values

    def collect(self):
        s = self.scheduler
        num_blocks = s.block_manager.num_blocks
        num_free = s.block_manager.num_free_blocks
        # list() of a dict view runs without releasing the GIL: no "changed size during iteration".
        num_held = sum(len(r.block_ids) for r in list(s.held.values()))
        values = [
            ("pdlab:num_requests_running", "Requests in the running batch.", len(s.running)),
            ("pdlab:num_requests_waiting", "Requests waiting (decode: also for KV blocks and for their KV).",
             len(s.waiting) + len(s.reserving) + len(s.transferring)),
            ("pdlab:kv_cache_num_blocks", "KV cache blocks in all.", num_blocks),
            ("pdlab:kv_cache_num_free_blocks", "Free KV cache blocks.", num_free),
            ("pdlab:kv_cache_num_held_blocks",
             "Blocks of finished requests kept for a KV transfer still using them.", num_held),
            ("pdlab:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", 1 - num_free / num_blocks),
        ]
        for name, doc, value in values:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self.label_values, value)
            yield family

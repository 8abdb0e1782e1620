"""Per-request records and the serving metrics computed from them (TTFT, TPOT, ITL, E2E, goodput)."""

from pdlab.metrics.records import (
    RequestRecord,
    frame_to_records,
    read_records_csv,
    records_to_frame,
    write_records_csv,
)
from pdlab.metrics.summary import max_rate_meeting_target, meets_slo, summarize, summary_table

__all__ = [
    "RequestRecord",
    "frame_to_records",
    "max_rate_meeting_target",
    "meets_slo",
    "read_records_csv",
    "records_to_frame",
    "summarize",
    "summary_table",
    "write_records_csv",
]

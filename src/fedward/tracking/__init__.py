"""Run directory (config, metrics.jsonl, TensorBoard, checkpoints) and reports."""

from fedward.tracking.report import compare, format_summary_table, summarize, write_report
from fedward.tracking.rundir import RunDirectory, atomic_torch_save, atomic_write_bytes, atomic_write_text

__all__ = [
    "RunDirectory",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "compare",
    "format_summary_table",
    "summarize",
    "write_report",
]

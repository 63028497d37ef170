"""``fedward reproduce TABLE``: one command per paper table.

A table is a grid of runs (a method and its settings on one shared base of settings) and the rows
read from them (a run's local models, its global model, or its fine-tuned global model, "+FT").
Every (run, seed) has its own run directory under ``--out``; a finished one is reused, an
interrupted one resumes from its last checkpoint, and a folder holding a different configuration
is an error (never silently mixed). The table is written as Markdown and CSV, with each row's
per-client metrics (mean ± std over seeds and a 95% t-interval of their mean), the global model's
pooled-test balanced accuracy where the table reports it, the paper's numbers next to them where
known, and paired comparisons over seeds.
"""

from __future__ import annotations

from fedward.reproduce import fedmas_isic, mhpflid_breakhis  # noqa: F401  (register their tables)
from fedward.reproduce.table import TABLES, Row, RunSpec, Table, reproduce

__all__ = ["TABLES", "Row", "RunSpec", "Table", "reproduce"]

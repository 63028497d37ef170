"""``fedward.train``: one federated training from Python, as ``fedward run`` does it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainedRun:
    """A finished run: its folder (config.yaml, metrics.jsonl, results.json, report.html, models)
    and its summary (the contents of results.json)."""

    path: Path
    summary: dict[str, Any]


def train(settings: dict[str, Any] | None = None, **overrides: Any) -> TrainedRun:
    """Check the settings (the CLI's flag names; ``overrides`` win), load the data, train every
    round and write the run folder. Bad settings raise ``fedward.errors.ConfigError`` with the
    message the CLI prints."""
    from fedward.config import build_config
    from fedward.engine.simulation import prepare, run

    cfg = build_config({**(settings or {}), **overrides})
    run_dir, data = prepare(cfg)
    summary = run(cfg, run_dir, data=data)
    return TrainedRun(run_dir.path, summary)

"""``fedward.train``: one federated training from Python, as ``fedward run`` does it;
``fedward.load_run``: a finished run folder as the same object."""

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

    @property
    def results_csv(self) -> Path:
        """Every number of metrics.jsonl, one a line (``pandas.read_csv`` reads it as it is)."""
        return self.path / "results.csv"


def load_run(path: str | Path) -> TrainedRun:
    """A finished run folder (one ``train`` or ``fedward run`` wrote, here or on another machine)."""
    from fedward.errors import FedwardError
    from fedward.tracking import RunDirectory

    run_dir = RunDirectory.open_existing(path)
    if not run_dir.results_path.is_file():
        raise FedwardError(f"{run_dir.path} has no results.json: the run has not finished (resume it with "
                           f"`fedward run --resume {run_dir.path}`)")
    return TrainedRun(run_dir.path, run_dir.read_results())


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

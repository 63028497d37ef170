"""Run directory: config, metrics.jsonl, TensorBoard, atomic writes, resume truncation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedward.errors import FedwardError
from fedward.tracking import RunDirectory, atomic_torch_save, atomic_write_bytes
from fedward.tracking.rundir import tensorboard_scalars


def eval_row(round_: int, scope: str, client: int | None, split: str, ba: float, **extra: object) -> dict:
    row = {"round": round_, "scope": scope, "client": client, "split": split, "balanced_accuracy": ba,
           "accuracy": ba + 0.1, "macro_f1": ba - 0.1, "loss": 1.0 / round_, "n": 10}
    row.update(extra)
    return row


# ---- create / open


def test_create_makes_layout_and_refuses_non_empty_dir(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    assert run.path == tmp_path / "run"
    assert run.checkpoints_dir.is_dir()
    assert run.config_path.name == "config.yaml" and run.metrics_path.name == "metrics.jsonl"
    assert run.tensorboard_dir.name == "tensorboard" and run.final_model_path.name == "final_model.pt"
    assert run.results_path.name == "results.json" and run.report_path.name == "report.html"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FedwardError, match="busy"):
        RunDirectory.create(busy)
    # Even with overwrite, a folder that is not a fedward run is never emptied.
    with pytest.raises(FedwardError, match="not a fedward run"):
        RunDirectory.create(busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_create_overwrite_empties_an_old_run(tmp_path: Path) -> None:
    old = RunDirectory.create(tmp_path / "run", tensorboard=False)
    old.write_config({"method": "fedavg"})
    old.log_rows([eval_row(1, "server", None, "test", 0.5)])
    new = RunDirectory.create(tmp_path / "run", overwrite=True, tensorboard=False)
    assert new.read_rows() == []
    assert not new.config_path.exists()


def test_create_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FedwardError, match="is a file"):
        RunDirectory.create(target)


def test_open_existing_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FedwardError, match="missing_run.*does not exist"):
        RunDirectory.open_existing(tmp_path / "missing_run")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FedwardError, match="no_config.*config.yaml"):
        RunDirectory.open_existing(tmp_path / "no_config")
    run = RunDirectory.create(tmp_path / "ok", tensorboard=False)
    run.write_config({"seed": 1})
    assert RunDirectory.open_existing(tmp_path / "ok").read_config() == {"seed": 1}


# ---- config and rows


def test_config_round_trip_keeps_order_and_plain_types(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    config = {"method": "fedmas", "seed": 3, "data": {"dir": Path("/data/isic"), "sizes": (224, 224)}, "alpha": 0.5}
    run.write_config(config)
    back = run.read_config()
    assert list(back) == ["method", "seed", "data", "alpha"]
    assert back["data"] == {"dir": "/data/isic", "sizes": [224, 224]}
    assert back["alpha"] == 0.5


def test_rows_round_trip_and_append(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    first = eval_row(1, "server", None, "test", 0.5, per_class_recall=[1.0, None])
    run.log_rows([first])
    # numpy scalars and arrays from the engine become plain JSON numbers
    run.log_rows([{"round": 1, "scope": "aggregation", "clients": [0, 1], "weights": np.array([0.25, 0.75]),
                   "train_loss": [np.float32(0.5), 1.5]}])
    rows = run.read_rows()
    assert rows[0] == first
    assert rows[1]["weights"] == [0.25, 0.75] and rows[1]["train_loss"] == [0.5, 1.5]
    assert len(run.metrics_path.read_text().splitlines()) == 2


def test_log_rows_rejects_rows_that_break_the_contract(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    bad = eval_row(1, "server", None, "test", 0.5)
    del bad["macro_f1"]
    with pytest.raises(ValueError, match="macro_f1"):
        run.log_rows([bad])
    with pytest.raises(ValueError, match="weights"):
        run.log_rows([{"round": 1, "scope": "aggregation"}])
    assert run.read_rows() == []


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    good = json.dumps(eval_row(1, "server", None, "test", 0.5))
    run.metrics_path.write_text(f"{good}\n{{\"round\": 2, \"scope\n{good}\n")
    with pytest.raises(FedwardError, match=r"metrics\.jsonl line 2"):
        run.read_rows()
    run.metrics_path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(FedwardError, match=r"line 2: expected a JSON object"):
        run.read_rows()


def test_truncate_rounds_after_keeps_earlier_rounds_and_drops_a_partial_tail(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    run.log_rows([eval_row(r, "server", None, "test", 0.1 * r) for r in (1, 2, 3)])
    with open(run.metrics_path, "a") as handle:  # what a crash in the middle of a write leaves
        handle.write('{"round": 4, "scope": "ser')
    run.truncate_rounds_after(2)
    assert [row["round"] for row in run.read_rows()] == [1, 2]
    run.log_rows([eval_row(3, "server", None, "test", 0.9)])
    assert [(row["round"], row["balanced_accuracy"]) for row in run.read_rows()] == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_write_results_round_trip(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tensorboard=False)
    run.write_results({"final_round": 3, "final": {"balanced_accuracy": np.float32(0.5)}})
    assert run.read_results() == {"final_round": 3, "final": {"balanced_accuracy": 0.5}}
    assert json.loads(run.results_path.read_text())["final_round"] == 3


# ---- atomic writes and checkpoints


def test_atomic_torch_save_round_trips_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "round_0001.pt"
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "round": 1}
    atomic_torch_save(state, target)
    loaded = torch.load(target)
    assert torch.equal(loaded["w"], state["w"]) and loaded["round"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["round_0001.pt"]

    # A save that fails half-way keeps the old file and removes its temporary file.
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda x: x}, target)
    assert torch.equal(torch.load(target)["w"], state["w"])
    assert [p.name for p in target.parent.iterdir()] == ["round_0001.pt"]


def test_atomic_write_bytes_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


# ---- TensorBoard


def test_tensorboard_tags_per_row_kind() -> None:
    pooled = eval_row(3, "server", None, "test", 0.5, model="global", data="pooled", per_class_recall=[0.25, None])
    tags = dict(tensorboard_scalars(pooled))
    assert tags["server/pooled/test/balanced_accuracy"] == 0.5
    assert tags["server/pooled/test/recall/class_0"] == 0.25
    assert "server/pooled/test/recall/class_1" not in tags and "server/pooled/test/n" not in tags
    on_client = dict(tensorboard_scalars(eval_row(3, "server", 2, "val", 0.4, model="global", data="client")))
    assert on_client["client_2/global/val/balanced_accuracy"] == 0.4
    local = dict(tensorboard_scalars(eval_row(3, "client", 2, "test", 0.3)))  # model/data left to defaults
    assert local["client_2/local/test/balanced_accuracy"] == 0.3
    local_pooled = dict(tensorboard_scalars(eval_row(3, "client", 2, "test", 0.2, model="local", data="pooled")))
    assert local_pooled["client_2/local_on_pooled/test/balanced_accuracy"] == 0.2
    agg = dict(tensorboard_scalars({"round": 3, "scope": "aggregation", "clients": [0, 2], "weights": [0.25, 0.75],
                                    "train_loss": [1.0, 2.0], "elapsed": 4}))
    assert agg == {"aggregation/weight/client_0": 0.25, "aggregation/weight/client_2": 0.75,
                   "aggregation/train_loss/client_0": 1.0, "aggregation/train_loss/client_2": 2.0,
                   "aggregation/elapsed": 4.0}
    # hospitals and classes by name when the run names them
    names, classes = ["BCN", "HAM", "MSK"], ["MEL", "NV"]
    named = dict(tensorboard_scalars({**pooled, "client": 2, "data": "client"}, names, classes))
    assert named["client_2_MSK/global/test/recall/MEL"] == 0.25 and "client_2_MSK/global/test/recall/NV" not in named
    named_agg = dict(tensorboard_scalars({"round": 3, "scope": "aggregation", "clients": [0, 2], "weights": [0.25, 0.75]},
                                         names, classes))
    assert named_agg == {"aggregation/weight/client_0_BCN": 0.25, "aggregation/weight/client_2_MSK": 0.75}


def _read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(event.step, pytest.approx(event.value)) for event in accumulator.Scalars(tag)]


def test_log_rows_writes_tensorboard_events_and_resume_purges_later_steps(tmp_path: Path) -> None:
    with RunDirectory.create(tmp_path / "run") as run:
        run.write_config({"method": "fedavg"})
        run.log_rows([eval_row(r, "server", None, "test", 0.1 * r) for r in (1, 2, 3)])
        run.log_rows([{"round": 1, "scope": "aggregation", "clients": [0, 2], "weights": [0.25, 0.75]}])
    files = [p for p in run.tensorboard_dir.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size > 0 for p in files)
    assert _read_scalars(run.tensorboard_dir, "server/pooled/test/balanced_accuracy") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert _read_scalars(run.tensorboard_dir, "aggregation/weight/client_2") == [(1, 0.75)]

    resumed = RunDirectory.open_existing(run.path)
    resumed.truncate_rounds_after(1)
    resumed.log_rows([eval_row(2, "server", None, "test", 0.9)])
    resumed.close()
    assert _read_scalars(run.tensorboard_dir, "server/pooled/test/balanced_accuracy") == [(1, 0.1), (2, 0.9)]


def test_tensorboard_uses_the_runs_names_and_records_its_settings(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunDirectory.create(tmp_path / "run") as run:
        run.write_config({"method": "fedavg", "client_names": ["BCN", "MSK"], "class_names": ["MEL", "NV"]})
        run.log_rows([eval_row(1, "server", 1, "test", 0.5, model="global", data="client", per_class_recall=[0.5, 1.0])])
        run.write_hparams({"method": "fedavg", "lr": 0.001, "adam": True, "devices": ["cpu"]},
                          {"final_test_ba": 0.5, "selected_test_ba": None})
    accumulator = EventAccumulator(str(run.tensorboard_dir))
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "client_1_MSK/global/test/recall/NV" in tags["scalars"]
    assert [e.value for e in accumulator.Scalars("hparam/final_test_ba")] == [0.5]
    assert "hparam/selected_test_ba" not in tags["scalars"]  # no number, no tag
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["lr"].number_value == 0.001 and start.hparams["method"].string_value == "fedavg"
    assert start.hparams["adam"].number_value == 1 and "devices" not in start.hparams  # a list: left out

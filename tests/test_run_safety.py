"""A run folder has one writer and one set of settings: a resume of an edited config is refused
(except a longer comm_round), a second writer is refused naming the first, and default names
never collide."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from fedward.cli import main
from fedward.errors import FedwardError
from fedward.tracking import RunDirectory
from fedward.tracking.rundir import new_run_folder

TINY_FLAGS = ["--model", "smallcnn", "--image_size", "16", "--data_scale", "0.03", "--progress", "false", "--threads", "1",
              "--comm_round", "1", "--lr", "0.01"]


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--output", str(out), *TINY_FLAGS]) == 0
    return out


def _edit_config(out, **changes):
    path = out / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


def _rounds(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted({r["round"] for r in rows if r.get("scope") == "participation"})


@pytest.mark.parametrize("changes, named", [({"lr": 0.5}, "lr 0.01 -> 0.5"),
                                            ({"model": "resnet18"}, "model 'smallcnn' -> 'resnet18'")])
def test_a_resume_of_an_edited_config_is_refused_naming_the_change(finished_run, capsys, changes, named):
    _edit_config(finished_run, **changes)
    capsys.readouterr()
    assert main(["run", "--resume", str(finished_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "restore them in config.yaml" in err and len(err.splitlines()) == 1, err
    assert _rounds(finished_run) == [1]  # nothing truncated or appended


def test_a_resume_may_extend_comm_round_and_says_so(finished_run, capsys):
    _edit_config(finished_run, comm_round=2)
    capsys.readouterr()
    assert main(["run", "--resume", str(finished_run)]) == 0
    assert "comm_round changed from 1 to 2" in capsys.readouterr().err
    assert _rounds(finished_run) == [1, 2]


def test_a_second_writer_is_refused_with_the_holders_pid(finished_run, capsys):
    with RunDirectory.open_existing(finished_run).writing():
        capsys.readouterr()
        assert main(["run", "--resume", str(finished_run)]) == 2
        err = capsys.readouterr().err
        assert f"being written by another process (pid {os.getpid()})" in err
        with pytest.raises(FedwardError, match="being written by another process"):
            RunDirectory.create(finished_run, overwrite=True)  # never emptied under its writer
    assert (finished_run / "results.json").is_file()
    with RunDirectory.open_existing(finished_run).writing():  # released with its holder
        pass


def test_default_run_folders_never_collide(tmp_path):
    base = tmp_path / "runs" / "fedavg-CE-seed0-20261201-120000"
    first, second, third = (new_run_folder(base) for _ in range(3))
    assert [p.name for p in (first, second, third)] == [base.name, f"{base.name}-2", f"{base.name}-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))


def test_config_files_that_are_not_settings_are_named(tmp_path, capsys):
    binary, empty = tmp_path / "weights.pt", tmp_path / "empty.yaml"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    empty.write_text("# nothing yet\n")
    for path, text in ((binary, "is not a text file (byte 4 is not UTF-8)"), (empty, "is empty")):
        assert main(["run", "--config", str(path), "--output", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert str(path) in err and text in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "never").exists()


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", "--output", str(blocker / "run"), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot create run directory {blocker / 'run'}" in err and len(err.splitlines()) == 1, err


def test_skipped_images_are_one_log_line_and_counted_in_data_json_and_the_report(tmp_path, capsys):
    from test_folders import make_tree

    root = make_tree(tmp_path / "data")
    (root / "alpha" / "train" / "benign" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    flags = [f for f in TINY_FLAGS if f not in ("--data_scale", "0.03")]
    assert main(["run", "--dataset", "folders", "--data_dir", str(root), "--skip_bad_images", "--output", str(out),
                 *flags, "--image_size", "8", "--batch_size", "4"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "unreadable" in x)
    assert "fedward: warning: folders: skipped 1 unreadable image" in line
    assert "RuntimeWarning" not in err and ".py:" not in err
    facts = json.loads((out / "data.json").read_text())
    assert facts["skipped_bad_images"] == 1 and "broken.png" in facts["bad_images"][0]
    assert [c["name"] for c in facts["clients"]] == ["alpha", "beta"]
    train = [sum(c["train"]) + sum(c["val"]) for c in facts["clients"]]
    assert train == [6 + 2, 6]  # alpha: 6 train + 2 val images on disk; beta: 6 train, val carved from them
    report = (out / "report.html").read_text()
    assert "<h2>Data</h2>" in report and "<td>alpha</td><td>6</td><td>2</td><td>2</td><td>3</td>" in report
    assert "1 unreadable image(s) skipped (--skip_bad_images): " in report and "broken.png" in report

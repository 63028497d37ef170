"""`fedward run` end to end on every real-data layout, on fake trees with the real file names."""

from __future__ import annotations

import pytest

from fedward.cli import main
from fedward.tracking import RunDirectory

TINY = ["--image_size", "16", "--comm_round", "1", "--batch_size", "4", "--progress", "false", "--threads", "1"]


def _run(args, out):
    model = [] if "--client_models" in args else ["--model", "smallcnn"]  # the heterogeneous methods have no --model
    assert main(["run", *args, *model, *TINY, "--output", str(out)]) == 0
    return RunDirectory.open_existing(out).read_config()


def test_medmnist_run_splits_over_client_number(tmp_path):
    from test_medmnist import write_npz

    write_npz(tmp_path / "dermamnist.npz", rgb=True)
    config = _run(["--dataset", "medmnist", "--data_dir", str(tmp_path), "--client_number", "3",
                   "--partition_method", "hetero", "--partition_alpha", "0.5", "--method", "fedavg"], tmp_path / "run")
    assert len(config["client_names"]) == 3 and len(config["class_names"]) == 7


def test_folders_run_takes_clients_and_classes_from_the_tree(tmp_path):
    from test_folders import make_tree

    make_tree(tmp_path / "hospitals")
    config = _run(["--dataset", "folders", "--data_dir", str(tmp_path / "hospitals"), "--method", "fedprox"],
                  tmp_path / "run")
    assert config["client_names"] == ["alpha", "beta"] and config["class_names"] == ["benign", "malignant", "other"]


def test_fed_isic2019_flamby_layout_run(tmp_path):
    from test_fed_isic2019 import make_flamby

    make_flamby(tmp_path / "isic")
    config = _run(["--data_dir", str(tmp_path / "isic"), "--method", "fedavg", "--loss_fn_name", "BSM"], tmp_path / "run")
    assert config["client_names"][4] == "MSK"


def test_dataset_without_data_dir_is_an_error(capsys):
    assert main(["run", "--dataset", "folders", *TINY]) == 2
    assert "needs --data_dir" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["medmnist", "folders", "fed_isic2019"])
def test_registered(name):
    from fedward.data import DATASETS, get_dataset_module

    assert DATASETS[name].name == get_dataset_module(name).NAME == name and DATASETS[name].needs_data_dir


def test_data_check_reports_counts_per_client_and_class(tmp_path, capsys):
    from test_folders import TREE, make_tree

    make_tree(tmp_path / "hospitals")
    assert main(["data", "check", str(tmp_path / "hospitals"), "--dataset", "folders", "--image_size", "8"]) == 0
    out = capsys.readouterr().out
    assert "folders: 2 clients, 3 classes" in out
    beta_train = next(line for line in out.splitlines() if line.startswith("1 beta") and " train " in line)
    # beta/train: benign 4, malignant 2, other 0 (carved val takes a share of train)
    numbers = [int(x) for x in beta_train.split()[3:]]
    assert numbers[2] == 0 and numbers[3] == sum(numbers[:3]) and sum(numbers[:3]) <= sum(TREE["beta"]["train"].values())
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2


def test_data_prepare_cli_resizes_and_resumes(tmp_path, capsys):
    from PIL import Image

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (200, 100 + i, 50)).save(raw / f"ISIC_{i:07d}.jpg")
    out = tmp_path / "ISIC_2019_Training_Input_preprocessed"
    args = ["data", "prepare", "isic2019", "--src", str(raw), "--dst", str(out), "--size", "16", "--workers", "1"]
    assert main(args) == 0 and "prepared 3 images, 0 already done" in capsys.readouterr().out
    with Image.open(out / "ISIC_0000000.jpg") as image:
        assert image.size == (21, 16)
    assert main(args) == 0 and "prepared 0 images, 3 already done" in capsys.readouterr().out


def test_mhpflid_runs_on_a_breakhis_tree(tmp_path):
    """The MH-pFLID setup (4 clients at x1/x2/x4/x8, one local architecture each, the messenger)
    on a fake BreakHis tree with the real folder and file names."""
    from test_breakhis import make_tree

    make_tree(tmp_path / "data")
    config = _run(["--dataset", "breakhis", "--data_dir", str(tmp_path / "data" / "BreaKHis_v1"), "--method", "mhpflid",
                   "--client_models", "smallcnn,resnet5,smallcnn,resnet5", "--stem", "small", "--messenger_dim", "16",
                   "--injection_epochs", "1"], tmp_path / "run")
    assert config["client_names"] == ["x1", "x2", "x4", "x8"] and config["class_names"] == ["benign", "malignant"]
    run_dir = RunDirectory.open_existing(tmp_path / "run")
    tested = {r["client"] for r in run_dir.read_rows() if r.get("model") == "local" and r.get("split") == "test"}
    assert tested == {0, 1, 2, 3}
    assert all(run_dir.client_model_path(k).is_file() for k in range(4))

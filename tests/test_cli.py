"""The command line: the issue's example command, reference flags, and one-line errors (exit 2)
that leave no run directory behind."""

from __future__ import annotations

import pytest
import torch

from fedward.cli import main
from fedward.engine import checkpoint as ckpt
from fedward.errors import CheckpointError
from fedward.tracking import RunDirectory

TINY_FLAGS = ["--model", "smallcnn", "--image_size", "16", "--data_scale", "0.03", "--progress", "false", "--threads", "1"]


def test_issue_example_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--method", "fedavg", "--client_number", "6", "--comm_round", "2", "--lr", "0.0003",
                 "--epochs", "1", "--batch_size", "64", "--loss_fn_name", "BSM", "--adam", "--validate_client",
                 "--output", str(out), *TINY_FLAGS])
    assert code == 0
    printed = capsys.readouterr().out
    assert "balanced" in printed.lower() and str(out) in printed
    saved = RunDirectory.open_existing(out).read_config()
    assert saved["adam"] is True and saved["loss_fn_name"] == "BSM" and saved["validate_client"] is True


def test_reference_only_flags_are_accepted_or_mapped(tmp_path, capsys):
    out = tmp_path / "ref"
    code = main(["run", "--method", "fedavg", "--thread_number", "6", "--gpu", "0,1,3", "--fold", "1",
                 "--update_projector_head", "both", "--partition_method", "homo", "--partition_alpha", "0",
                 "--comm_round", "1", "--output", str(out), *TINY_FLAGS])
    assert code == 0
    err = capsys.readouterr().err
    assert "natural centres" in err
    if not torch.cuda.is_available():
        assert "running on the CPU" in err


@pytest.mark.parametrize("argv, text", [
    (["--method", "fedsgd"], "--method 'fedsgd' is unknown"),
    (["--loss_fn_name", "dice"], "dice"),
    (["--model", "vgg11"], "unknown model 'vgg11'"),
    (["--distill_u", "1"], "--distill_u is not accepted"),
    (["--balanced_free"], "--balanced_free is not accepted: the reference crashes with it"),
    (["--multi_step"], "--multi_step is not accepted"),
    (["--adam_w"], "--adam_w is not accepted: the reference crashes with it"),
    (["--validate_client_every", "5"], "--eval_every sets the cadence"),
    (["--method", "scaffold", "--adamw"], "drop --adamw"),
    (["--comm_rounds", "3"], "unknown flag --comm_rounds"),
    (["--pre_trained_tv"], "resnet18-f37072fd.pth"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--partition_method", "natural", "--client_number", "4"], "6 natural centres"),
    (["--fold", "2"], "single fold"),
    (["--method", "fedmas", "--pre_trained_models", "moco"], "moco_v2_800ep_pretrain.pth.tar: not found"),
])
def test_bad_input_one_line_exit_2_no_run_dir(tmp_path, capsys, argv, text):
    out = tmp_path / "never"
    base = ["run", "--output", str(out), *TINY_FLAGS]
    if "--model" in argv or "--pre_trained_tv" in argv:
        base = ["run", "--output", str(out), "--image_size", "16", "--data_scale", "0.03", "--progress", "false",
                "--threads", "1"]
    code = main([*base, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert text in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_resume_refuses_a_checkpoint_for_other_classes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--comm_round", "1", "--output", str(out), *TINY_FLAGS]) == 0
    run_dir = RunDirectory.open_existing(out)
    payload = torch.load(ckpt.path_of(run_dir), weights_only=False)
    payload["num_classes"] = 3
    torch.save(payload, ckpt.path_of(run_dir))
    with pytest.raises(CheckpointError, match="trained for 3 classes but the data has 8"):
        ckpt.load(run_dir, expected_num_classes=8)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    assert "3 classes" in capsys.readouterr().err


def test_report_command_compares_runs(tmp_path, capsys):
    for name, loss in (("ce", "CE"), ("bsm", "BSM")):
        assert main(["run", "--comm_round", "1", "--loss_fn_name", loss, "--output", str(tmp_path / name),
                     *TINY_FLAGS]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "ce"), str(tmp_path / "bsm"), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "BSM" in table and "CE" in table
    assert (tmp_path / "ce" / "report.html").is_file()


def test_dirichlet_repartition_from_the_command_line(tmp_path):
    out = tmp_path / "hetero"
    assert main(["run", "--partition_method", "hetero", "--partition_alpha", "0.5", "--client_number", "4",
                 "--comm_round", "1", "--output", str(out), *TINY_FLAGS]) == 0
    saved = RunDirectory.open_existing(out).read_config()
    assert saved["client_names"] == ["client_0", "client_1", "client_2", "client_3"]
    (agg,) = [r for r in RunDirectory.open_existing(out).read_rows() if r["scope"] == "aggregation"]
    assert agg["clients"] == [0, 1, 2, 3]


@pytest.mark.parametrize("argv, text", [
    (["--data_dir", "nowhere/Flamby_isic"], "--data_dir nowhere/Flamby_isic does not exist"),
    (["--method", "fedavg", "--mu", "0.9"], "--mu applies to --method fedprox, moon"),
    (["--aug", "1"], "--aug is not accepted"),  # no abbreviation of --augment
    (["--blur", "1"], "--blur is not accepted"),  # nor of --blur_scale
    (["--distill-u", "1"], "--distill_u is not accepted"),
])
def test_flags_are_never_guessed(tmp_path, capsys, argv, text):
    out = tmp_path / "never"
    code = main(["run", "--output", str(out), "--model", "smallcnn", "--image_size", "16", "--progress", "false", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and text in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_kebab_and_snake_case_flags_are_the_same_setting(tmp_path):
    out = tmp_path / "kebab"
    assert main(["run", "--comm-round", "1", "--loss-fn-name", "BSM", "--output", str(out), *TINY_FLAGS]) == 0
    saved = RunDirectory.open_existing(out).read_config()
    assert saved["comm_round"] == 1 and saved["loss_fn_name"] == "BSM"


def test_help_of_one_method_shows_only_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--method", "fedprox", "--help"])
    text = capsys.readouterr().out
    assert "--mu" in text and "--lr" in text and "--free_u" not in text and "--messenger_dim" not in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--free_u" in text and "options of --method fedmas" in text and "--server_lr" in text

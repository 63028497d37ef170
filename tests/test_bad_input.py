"""Every bad input of the list in docs/errors.md is one line and exit 2 through the CLI, never a
traceback, and leaves no run folder; the page lists each case's message."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedward.cli import main

TINY = ["--model", "smallcnn", "--image_size", "16", "--data_scale", "0.03", "--progress", "false", "--threads", "1"]
FILES = {"empty.yaml": b"", "binary.yaml": b"PK\x03\x04\xff\xfe", "broken.yaml": b"a: [\n", "list.yaml": b"- a\n",
         "key.yaml": b"lrr: 1\n", "full/x": b"x", "a_file": b"x", "not_a_run/notes.txt": b"x"}

# (arguments, with {d} for the test's folder; the start of the message after "fedward: error: ")
CASES = [
    (["run", "--config", "{d}/missing.yaml"], "config file {d}/missing.yaml does not exist"),
    (["run", "--config", "{d}/empty.yaml"], "config file {d}/empty.yaml is empty"),
    (["run", "--config", "{d}/binary.yaml"], "config file {d}/binary.yaml is not a text file"),
    (["run", "--config", "{d}/broken.yaml"], "config file {d}/broken.yaml is not valid YAML"),
    (["run", "--config", "{d}/list.yaml"], "config file {d}/list.yaml must hold a mapping"),
    (["run", "--config", "{d}/key.yaml"], "unknown config key 'lrr'"),
    (["run", "--data_dir", "{d}/Flamby_isci"], "--data_dir {d}/Flamby_isci does not exist"),
    (["run", "--method", "fedsgd"], "--method 'fedsgd' is unknown"),
    (["run", "--comm_rounds", "3"], "unknown flag --comm_rounds"),
    (["run", *TINY, "--batch_size", "0"], "--batch_size must be at least 1"),
    (["run", *TINY, "--output", "{d}/full"], "run directory {d}/full exists and is not empty"),
    (["run", *TINY, "--output", "{d}/a_file/run"], "cannot create run directory {d}/a_file/run"),
    (["run", "--resume", "{d}/nothere"], "run directory {d}/nothere does not exist"),
    (["run", "--resume", "{d}/not_a_run"], "run directory {d}/not_a_run has no config.yaml"),
    (["run", *TINY, "--partition_method", "iid", "--client_number", "100000"],
     "--client_number 100000 is more than the"),
    (["run", *TINY, "--partition_method", "iid", "--client_number", "400"], "--client_number 400 (iid) leaves client"),
    (["run", *TINY, "--clients_per_round", "50"], "--clients_per_round 50: the federation has 6 clients"),
    (["run", *TINY, "--dp_noise_multiplier", "1"], "--dp_noise_multiplier needs --dp_clip"),
    (["run", *TINY, "--method", "fedprox", "--dp_sgd_clip", "1"], "--dp_sgd_clip does not apply to --method fedprox"),
    (["run", *TINY, "--method", "scaffold", "--secure_aggregation", "true"],
     "--secure_aggregation does not apply to --method scaffold"),
    (["run", *TINY, "--secagg_shares", "0.5"], "--secagg_shares applies with --secure_aggregation true only"),
    (["report", "{d}/nothere"], "run directory {d}/nothere does not exist"),
    (["reproduce", "mhpflid-breakhis", "--seeds", "0"], "--seeds 0: expected at least 1"),
    (["data", "check", "{d}/nothere", "--dataset", "folders"], "data folder {d}/nothere does not exist"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(folder, capsys, argv, message):
    out = folder / "never"
    argv = [a.format(d=folder) for a in argv]
    if argv[0] == "run" and "--output" not in argv and "--resume" not in argv:
        argv += ["--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("fedward: error: " + message.format(d=folder)), err
    assert not out.exists()


def test_the_errors_page_lists_every_case():
    page = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    missing = [message for _, message in CASES if message.replace("{d}/", "") not in page]
    assert not missing, f"docs/errors.md lacks: {missing}"

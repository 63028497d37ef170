"""`fedward reproduce`: the grid runs once per seed, is reused and resumed, and the table's numbers are
the runs' own rows, averaged by hand here."""

from __future__ import annotations

import csv

import pytest

from fedward.config import build_config
from fedward.errors import ConfigError
from fedward.metrics import mean_interval
from fedward.reproduce import TABLES, Row, RunSpec, Table, reproduce
from fedward.reproduce import table as table_module
from fedward.reproduce.table import client_results, run_settings


def tiny_table(tiny_values) -> Table:
    fedavg = RunSpec("fedavg", {"method": "fedavg", "finetune_epochs": 1})
    return Table(name="tiny", title=lambda options: "tiny", client_names=["a", "b", "c", "d", "e", "f"],
                 base=lambda options: {**tiny_values, "comm_round": 1},
                 rows=[Row("FedAvg", fedavg, "global", "global"), Row("FedAvg+FT", fedavg, "finetuned", "global"),
                       Row("Local", RunSpec("local", {"method": "local"}), group="local")],
                 comparisons=[("Local", "best baseline")])


def test_the_table_is_the_runs_rows_averaged(tiny_values, tmp_path):
    table = tiny_table(tiny_values)
    files = reproduce(table, out=tmp_path, seeds=[0, 1], options={}, log=lambda line: None)
    per_seed = [client_results(tmp_path / "local" / f"seed{s}", "local") for s in (0, 1)]
    averages = [sum(c["accuracy"] for c in p.values()) / len(p) for p in per_seed]
    mean, low, high = mean_interval(averages)
    with files["csv"].open() as handle:
        summary = {(r["row"], r["metric"], r["client"]): r for r in csv.DictReader(handle)}
    cell = summary["Local", "accuracy", "Average"]
    assert float(cell["mean"]) == pytest.approx(mean) and float(cell["ci_low"]) == pytest.approx(low)
    assert float(cell["ci_high"]) == pytest.approx(high)
    assert float(summary["Local", "accuracy", "a"]["mean"]) == pytest.approx((per_seed[0][0]["accuracy"]
                                                                              + per_seed[1][0]["accuracy"]) / 2)
    text = files["markdown"].read_text()
    assert "| Local |" in text and "| FedAvg+FT |" in text and "Local − FedAvg" in text
    with files["runs"].open() as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 2 * 6  # rows x seeds x clients
    # One run serves FedAvg and FedAvg+FT: two folders per seed, not three.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["fedavg", "local"]
    # a finished run keeps its records and final model, not the checkpoint (hundreds of MB a run)
    for folder in ("fedavg", "local"):
        assert not (tmp_path / folder / "seed0" / "checkpoints" / "last.pt").exists()
        assert (tmp_path / folder / "seed0" / "results.json").is_file()


def test_finished_runs_are_reused_and_other_settings_refused(tiny_values, tmp_path, monkeypatch):
    table = tiny_table(tiny_values)
    reproduce(table, out=tmp_path, seeds=[0], options={}, only=["Local"], log=lambda line: None)
    monkeypatch.setattr(table_module, "ensure_run", lambda values, log: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(AssertionError):  # FedAvg is not there yet: it would train
        reproduce(table, out=tmp_path, seeds=[0], options={}, log=lambda line: None)
    monkeypatch.undo()
    reused = []
    monkeypatch.setattr("fedward.engine.simulation.run", lambda *a, **k: reused.append(a))
    reproduce(table, out=tmp_path, seeds=[0], options={}, only=["Local"], log=lambda line: None)
    assert reused == []  # finished: read, not trained again
    # a run written before a setting existed counts it at its default
    import yaml

    config_file = tmp_path / "local" / "seed0" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.pop("clients_per_round")
    config_file.write_text(yaml.safe_dump(config))
    reproduce(table, out=tmp_path, seeds=[0], options={}, only=["Local"], log=lambda line: None)
    assert reused == []
    monkeypatch.undo()
    changed = Table(**{**table.__dict__, "base": lambda options: {**tiny_values, "comm_round": 1, "lr": 0.5}})
    with pytest.raises(ConfigError, match="other settings \\(lr\\)"):
        reproduce(changed, out=tmp_path, seeds=[0], options={}, only=["Local"], log=lambda line: None)
    with pytest.raises(ConfigError, match="--only Lokal"):
        reproduce(table, out=tmp_path, seeds=[0], options={}, only=["Lokal"], log=lambda line: None)


def test_a_finished_runs_records_moved_to_another_folder_are_reused(tiny_values, tmp_path, monkeypatch):
    """A table's records committed in one session (config, data facts, rows, results; no
    checkpoints or event files) are reused from where they were moved in the next."""
    import shutil

    table = tiny_table(tiny_values)
    first = reproduce(table, out=tmp_path / "a", seeds=[0], options={}, only=["Local"], log=lambda line: None)
    for name in ("config.yaml", "data.json", "metrics.jsonl", "results.json"):
        target = tmp_path / "b" / "local" / "seed0" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "a" / "local" / "seed0" / name, target)
    trained = []
    monkeypatch.setattr("fedward.engine.simulation.run", lambda *a, **k: trained.append(a))
    second = reproduce(table, out=tmp_path / "b", seeds=[0], options={}, only=["Local"], log=lambda line: None)
    assert trained == []
    assert second["csv"].read_text() == first["csv"].read_text()


def test_jobs_train_runs_in_processes_with_the_cores_shared_and_reuse_finished_runs(tiny_values, tmp_path):
    import yaml

    from fedward.engine.setup import cpu_cores

    table = tiny_table(tiny_values)
    two_threads = Table(**{**table.__dict__, "base": lambda options: {**table.base(options), "threads": 2}})
    reproduce(two_threads, out=tmp_path, seeds=[0], options={}, only=["Local"], log=lambda line: None)
    local_results = tmp_path / "local" / "seed0" / "results.json"
    before = local_results.stat().st_mtime_ns
    lines = []
    files = reproduce(two_threads, out=tmp_path, seeds=[0], options={}, jobs=2, log=lines.append)
    assert local_results.stat().st_mtime_ns == before  # finished under another thread count: reused
    config = yaml.safe_load((tmp_path / "fedavg" / "seed0" / "config.yaml").read_text())
    assert config["threads"] == max(1, cpu_cores() // 2)
    assert yaml.safe_load((tmp_path / "local" / "seed0" / "config.yaml").read_text())["threads"] == 2
    assert len(lines) == 2 and "| FedAvg+FT |" in files["markdown"].read_text()


@pytest.mark.parametrize("options", [{}, {"data_dir": "Flamby_isic", "rounds": 2}])
def test_every_run_of_the_fedmas_table_is_a_valid_config(options, tmp_path):
    table = TABLES["fedmas-isic"]
    assert len(table.runs) == 3 * 7 + 4 + 2  # FedAvg/FedProx/MOON x 7 losses, 4 aggregations, 2 bounds
    for spec in table.runs:
        cfg = build_config(run_settings(table, spec, 0, options, tmp_path))
        assert cfg.method == spec.settings["method"] and cfg.loss_fn_name == spec.settings["loss_fn_name"]
        assert cfg.dataset == ("fed_isic2019" if options else "synthetic") and cfg.epochs == 1 and cfg.adam
        if cfg.method == "fedmas":
            assert cfg.free_u == 3 and cfg.loss_fn_name == "BSM"
            assert cfg.pre_trained_models == ("moco" if options else "auto")
    assert len({spec.folder for spec in table.runs}) == len(table.runs)


def test_a_pooled_table_reads_results_json_and_never_takes_a_bound_as_best_baseline(tiny_values, tmp_path):
    import json

    from fedward.reproduce.table import BOUND, POOLED_FINAL

    fedavg = RunSpec("fedavg", {"method": "fedavg"})
    prox = RunSpec("fedprox", {"method": "fedprox"})
    central = RunSpec("centralized", {"method": "centralized"})
    table = Table(name="tiny-pooled", title=lambda options: "tiny", client_names=[], pooled=True,
                  headline=POOLED_FINAL, metrics=(("balanced_accuracy", "BA"),),
                  base=lambda options: {**tiny_values, "comm_round": 1},
                  rows=[Row("FedAvg", fedavg, "global", "baseline"), Row("FedProx", prox, "global", "mine"),
                        Row("Centralized", central, "global", BOUND),
                        Row("Local", RunSpec("local", {"method": "local"}), group=BOUND)],
                  comparisons=[("FedProx", "FedAvg"), ("FedProx", "best baseline"), ("Local", "FedAvg")])
    files = reproduce(table, out=tmp_path, seeds=[0, 1], options={}, log=lambda line: None)
    final = {(label, s): json.loads((tmp_path / label / f"seed{s}" / "results.json").read_text())["final"]
             ["balanced_accuracy"] for label in ("fedavg", "fedprox", "centralized") for s in (0, 1)}
    with files["csv"].open() as handle:
        summary = {(r["row"], r["metric"], r["client"]): r for r in csv.DictReader(handle)}
    cell = summary["FedAvg", "pooled_balanced_accuracy_final", "pooled"]
    assert float(cell["mean"]) == pytest.approx((final["fedavg", 0] + final["fedavg", 1]) / 2)
    assert ("Local", "pooled_balanced_accuracy_final", "pooled") not in summary  # a local row has no global model
    text = files["markdown"].read_text()
    differences = [final["fedprox", s] - final["fedavg", s] for s in (0, 1)]
    # the only non-bound row outside FedProx's group is FedAvg, whatever the centralized bound scored
    assert f"FedProx − FedAvg (the best baseline) | {sum(differences) / 2:+.3f}" in text
    assert text.count("FedProx − FedAvg") == 1  # asked for twice (by name and as the best baseline): one row
    assert "Local −" not in text  # Local has no pooled number to compare
    assert "| method | BCN | HAM_vidir_molemax |" in text  # the data set's own client names


@pytest.mark.parametrize("options", [{}, {"data_dir": "BreaKHis_v1", "rounds": 2}])
def test_every_run_of_the_mhpflid_table_is_a_valid_config(options, tmp_path):
    table = TABLES["mhpflid-breakhis"]
    for spec in table.runs:
        values = run_settings(table, spec, 0, options, tmp_path)
        cfg = build_config(values)
        assert cfg.method == spec.settings["method"] and cfg.seed == cfg.data_seed == 0
        assert cfg.dataset == ("breakhis" if options else "synthetic_multires")
        assert not cfg.augment and cfg.batch_size == 8


def test_the_command_names_bad_arguments(capsys, tmp_path):
    from fedward.cli import main

    assert main(["reproduce", "mhpflid-breakhis", "--seeds", "0"]) == 2
    assert "--seeds 0: expected at least 1" in capsys.readouterr().err
    assert main(["reproduce", "mhpflid-breakhis", "--data_dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["reproduce", "mhpflid-breakhis", "--only", "Lokal", "--out", str(tmp_path / "r")]) == 2
    assert "--only Lokal: not rows of mhpflid-breakhis" in capsys.readouterr().err
    assert main(["reproduce", "fedmas-isic", "--homogeneous_model", "resnet8", "--out", str(tmp_path / "r")]) == 2
    assert "--homogeneous_model does not apply to the fedmas-isic table" in capsys.readouterr().err


def test_the_fedmas_table_explains_each_clients_mas_weight(tiny_values, tmp_path, small_prior):
    from fedward.reproduce.fedmas_isic import robust_factor_section
    from fedward.tracking import RunDirectory

    mas = RunSpec("fedmas-mas", {"method": "fedmas", "pre_trained_models": small_prior, "free_u": 1.0,
                                 "aggregate_method": "mas"})
    table = Table(name="tiny-mas", title=lambda options: "tiny", client_names=[], pooled=True,
                  metrics=(("balanced_accuracy", "BA"),), base=lambda options: {**tiny_values, "comm_round": 1},
                  rows=[Row("Fed-MAS, mas", mas, "global", "fedmas")], extra=robust_factor_section)
    text = reproduce(table, out=tmp_path, seeds=[0], options={}, log=lambda line: None)["markdown"].read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("| Fed-MAS, mas |") and "/" in x]
    last = [r for r in RunDirectory.open_existing(tmp_path / "fedmas-mas" / "seed0").read_rows()
            if r.get("scope") == "aggregation"][-1]
    shares = [n / sum(last["num_examples"]) for n in last["num_examples"]]
    ratios = [float(x) for x in line.split("|")[4].split("/")]
    assert ratios == pytest.approx([w / s for w, s in zip(last["weights"], shares)], abs=0.006)


def test_job_processes_exit_when_the_command_is_killed(tiny_values, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "long_table.py"
    script.write_text(f"""
from pathlib import Path
from fedward.reproduce import Row, RunSpec, Table, reproduce
values = {{**{tiny_values!r}, "comm_round": 500}}
rows = [Row(f"FedAvg {{k}}", RunSpec(f"fedavg-{{k}}", {{"method": "fedavg", "lr": 0.01 * (k + 1)}}), "global")
        for k in range(2)]
table = Table(name="long", title=lambda o: "long", client_names=[], rows=rows, base=lambda o: values)
if __name__ == "__main__":
    reproduce(table, out=Path({str(tmp_path / 'out')!r}), seeds=[0], options={{}}, jobs=2, log=print)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            command = (stat.parent / "cmdline").read_bytes() if int(fields[1]) == parent.pid else b""
            if b"spawn_main" in command:  # the job processes, not multiprocessing's resource tracker
                found.append(int(stat.parent.name))
        return found

    def running(pid: int) -> bool:  # an exited orphan may stay a zombie when nothing reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "fedavg-1" / "seed0" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.5)  # both jobs are training
    jobs = children()
    assert len(jobs) >= 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [pid for pid in jobs if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []  # no orphan goes on writing the run directories


def test_a_finished_fedmas_run_on_the_auto_prior_is_reused(tiny_values, tmp_path, monkeypatch):
    # The run records the file ``auto`` stood for; the table compares a request resolved the same way.
    from fedward import priors
    import yaml

    from fedward.selfsup import cached
    from fedward.selfsup.moco import MocoSettings

    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cached, "cached_prior_settings",
                        lambda size: MocoSettings(arch="smallcnn", image_size=size, batch_size=16, bn_groups=2, epochs=1,
                                                  feature_dim=8))
    monkeypatch.setattr(cached, "PUBLIC_IMAGES", 96)
    fedmas = RunSpec("fedmas", {"method": "fedmas", "pre_trained_models": "auto", "free_u": 1})
    table = Table(name="tiny", title=lambda options: "tiny", client_names=[],
                  base=lambda options: {**tiny_values, "comm_round": 1}, rows=[Row("Fed-MAS", fedmas, "global")])
    reproduce(table, out=tmp_path / "out", seeds=[0], options={}, log=lambda line: None)
    recorded = yaml.safe_load((tmp_path / "out" / "fedmas" / "seed0" / "config.yaml").read_text())
    assert recorded["prior_path"] == str(cached.cached_prior_path(16))
    reused = []
    monkeypatch.setattr("fedward.engine.simulation.run", lambda *a, **k: reused.append(a))
    reproduce(table, out=tmp_path / "out", seeds=[0], options={}, log=lambda line: None)
    assert reused == []
    # Once the MoCo-v2 file is there, ``auto`` means another prior: the old run is not that run.
    from test_selfsup import _small_moco_file

    _small_moco_file(priors.default_prior_dir() / priors.MOCO_FILE)
    with pytest.raises(ConfigError, match="other settings \\(prior_path\\)"):
        reproduce(table, out=tmp_path / "out", seeds=[0], options={}, log=lambda line: None)


def test_one_seed_shows_no_spread_and_no_interval(tiny_values, tmp_path):
    files = reproduce(tiny_table(tiny_values), out=tmp_path, seeds=[0], options={}, log=lambda line: None)
    text = files["markdown"].read_text()
    assert "±" not in text.split("\n## ", 1)[1] and "| – |" in text and "one seed: no spread" in text

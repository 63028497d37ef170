"""The Python API of docs/api.md: its first example runs as written (on a smaller data set), and
`import fedward` stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedward
from fedward.errors import ConfigError


def test_the_pages_example_runs(tmp_path, monkeypatch, capsys):
    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    example = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    import fedward.config

    build = fedward.config.build_config
    monkeypatch.setattr(fedward.config, "build_config",  # the page's settings, on the tiny data of the tests
                        lambda values: build({**values, "data_scale": 0.03, "image_size": 16, "threads": 1}))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    runs = namespace["runs"]
    assert sorted(runs) == ["BSM", "CE"] and all((t.path / "results.json").is_file() for t in runs.values())
    saved = fedward.RunDirectory.open_existing(runs["BSM"].path).read_results()
    assert json.loads(json.dumps(runs["BSM"].summary)) == saved  # results.json (its keys are strings)
    assert len(namespace["per_round"]) == 2 and namespace["facts"]["dataset"] == "synthetic"
    assert namespace["again"] == runs["BSM"].__class__(runs["BSM"].path, saved)  # load_run gives the same run
    header = namespace["long"].read_text().splitlines()[0]
    assert header == "round,scope,model,data,client,client_name,split,n,metric,value"
    unfinished = fedward.RunDirectory.create(tmp_path / "unfinished")
    unfinished.write_config({"method": "fedavg"})
    with pytest.raises(fedward.errors.FedwardError, match="has no results.json: the run has not finished"):
        fedward.load_run(unfinished.path)
    printed = capsys.readouterr().out
    assert "BSM runs/api-BSM" in printed and "CE runs/api-CE" in printed


def test_bad_settings_raise_the_clis_message():
    with pytest.raises(ConfigError, match="--method 'fedsgd' is unknown"):
        fedward.train({"method": "fedsgd"})
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        fedward.trian  # noqa: B018


def test_import_fedward_does_not_import_torch():
    code = "import sys, fedward; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

"""A new method, data set and model are one module each: a toy plugin written to a temporary folder
registers all three and runs on both engines, with no file of fedward changed."""

from __future__ import annotations

import textwrap

import pytest
import torch

from fedward.cli import main
from fedward.config import build_config
from fedward.errors import ConfigError
from fedward.tracking import RunDirectory

from test_flower import loopback_run, simulation_model  # the loopback Grid (its task_identity fixture: conftest)


@pytest.fixture(autouse=True)
def _registries_as_they_were():
    """What a test's plugin registers is gone after it: other files (the generated options page,
    the every-method tests) see fedward's own registry whatever ran before them in the process."""
    from fedward import plugins
    from fedward.algorithms.registry import METHOD_REGISTRY
    from fedward.data.registry import DATASETS
    from fedward.models.registry import _REGISTRY

    saved = [(registry, dict(registry)) for registry in (METHOD_REGISTRY, DATASETS, _REGISTRY, plugins._LOADED)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)

PLUGIN = textwrap.dedent('''
    """Coordinate-wise trimmed mean (Yin et al. 2018), a tiny data set and a tiny model."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from fedward.algorithms import FedAvg, register_method
    from fedward.algorithms.base import LocalTraining
    from fedward.data import register_dataset
    from fedward.data.synthetic import load as load_synthetic
    from fedward.models import FeatureClassifier, register_model
    from fedward.options import NON_NEGATIVE, option


    @dataclass
    class TrimmedOptions(LocalTraining):
        trim: int = option(0, "replies dropped at each end of every coordinate", check=NON_NEGATIVE)


    @register_method
    class TrimmedMean(FedAvg):
        name = "toytrimmed"
        summary = "coordinate-wise trimmed mean of the clients' state dicts"
        Options = TrimmedOptions

        def aggregate(self, round_index, global_state, replies, server_state):
            k, n = self.cfg.trim, len(replies)
            new = {}
            for key, value in global_state.items():
                stacked = torch.stack([r.arrays[key].double() for r in replies]).sort(dim=0).values
                new[key] = stacked[k:n - k].mean(dim=0).to(value.dtype)
            return new, {"weights": [1.0 / n] * n}


    @dataclass
    class TinySetOptions:
        tiny_scale: float = option(0.03, "fraction of the synthetic set's counts")


    @register_dataset("toyset", options=TinySetOptions, needs_data_dir=False)
    def from_config(cfg):
        """a small slice of the synthetic set"""
        return load_synthetic(seed=cfg.data_seed, image_size=cfg.image_size, scale=cfg.tiny_scale)


    class Linear(FeatureClassifier):
        def __init__(self, num_classes):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3, stride=4)
            self.num_features = 4
            self.fc = nn.Linear(4, num_classes)

        def feature_map(self, x):
            return self.body(x)


    @register_model("toylinear")
    def toylinear(*, num_classes, image_size=32, in_channels=3, generator=None):
        return Linear(num_classes)
''')

SETTINGS = dict(method="toytrimmed", trim=1, dataset="toyset", model="toylinear", image_size=16, comm_round=2,
                batch_size=16, lr=0.01, progress=False, threads=1, client_number=3, partition_method="iid")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "toy_plugin.py"
    path.write_text(PLUGIN)
    return str(path)


def test_plugin_trimmed_mean_by_hand(plugin):
    from fedward.algorithms import ClientReply, TaskSpec, get_algorithm

    cfg = build_config({**SETTINGS, "plugins": [plugin]})
    spec = TaskSpec(2, 8, ["a", "b"], (0.5,) * 3, (0.2,) * 3, [[1, 1]] * 3, [3, 3])
    algorithm = get_algorithm("toytrimmed")(cfg, spec, lambda: None)
    replies = [ClientReply(k, {"w": torch.tensor([v, -v])}, {"num-examples": 1.0}) for k, v in enumerate((1.0, 5.0, 2.0))]
    new, _ = algorithm.aggregate(1, {"w": torch.zeros(2)}, replies, {})
    assert torch.equal(new["w"], torch.tensor([2.0, -2.0]))  # the median of 1, 5, 2 and of -1, -5, -2


def test_plugin_runs_from_the_command_line_and_resumes(plugin, tmp_path, capsys):
    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    with pytest.raises(SystemExit):
        main(["run", "--plugins", plugin, "--method", "toytrimmed", "--help"])
    text = capsys.readouterr().out
    assert "--trim" in text and "toytrimmed" in text and "--tiny_scale" in text
    out = tmp_path / "run"
    assert main(["run", "--plugins", plugin, *flags, "--output", str(out)]) == 0
    saved = RunDirectory.open_existing(out).read_config()
    assert saved["plugins"] == [plugin] and saved["trim"] == 1 and saved["tiny_scale"] == 0.03
    assert torch.load(out / "final_model.pt", weights_only=False)["model"] == "toylinear"
    assert main(["run", "--resume", str(out)]) == 0  # the saved config names the plugin
    # an option of the plugin is an error for another method, naming its owner
    assert main(["run", "--plugins", plugin, "--method", "fedavg", "--trim", "1", "--output", str(tmp_path / "x")]) == 2
    assert "--trim applies to --method toytrimmed" in capsys.readouterr().err


def test_plugin_runs_on_flower_as_in_the_simulation(plugin, tmp_path, task_identity):
    cfg = build_config({**SETTINGS, "plugins": [plugin]})
    coordinator, _ = loopback_run(cfg, tmp_path)
    flower_model = torch.load(coordinator.run_dir.final_model_path, weights_only=False)["state_dict"]
    sim_model, _ = simulation_model(cfg, tmp_path)
    assert all(torch.equal(flower_model[k], sim_model[k]) for k in sim_model)


def test_a_plugin_that_does_not_exist_is_named():
    with pytest.raises(ConfigError, match="--plugins nowhere/toy.py: no such file"):
        build_config({"plugins": ["nowhere/toy.py"]})


def test_a_yaml_file_may_list_the_plugin_and_use_its_options(plugin, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"plugins: [{plugin}]\nmethod: toytrimmed\ntrim: 1\ndataset: toyset\nmodel: toylinear\n"
                      "image_size: 16\ncomm_round: 1\nclient_number: 3\npartition_method: iid\nprogress: false\n")
    assert main(["run", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    assert RunDirectory.open_existing(tmp_path / "run").read_config()["trim"] == 1

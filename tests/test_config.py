import pytest

from fedward.config import RunConfig, build_config, load_yaml
from fedward.errors import ConfigError


def test_seed_flag_names_and_case_insensitive_values():
    cfg = build_config({"method": "FedAvg", "client_number": "6", "comm_round": "3", "lr": "0.0003", "adam": "true",
                        "loss_fn_name": "BSM", "aggregate_method": "AVG"})
    assert (cfg.method, cfg.client_number, cfg.comm_round, cfg.lr, cfg.adam) == ("fedavg", 6, 3, 0.0003, True)
    assert not cfg.has("aggregate_method")  # a Fed-MAS flag at its default, as the reference passes it


@pytest.mark.parametrize("values, text", [
    ({"method": "fedsgd"}, "--method 'fedsgd' is unknown; expected one of"),
    ({"method": "fedavg", "client_models": "resnet5,resnet8"}, "--client_models applies to --method local, mhpflid"),
    ({"method": "mhpflid", "client_models": "resnet5,resnet9"}, "--client_models entry 'resnet9' is not a model"),
    ({"method": "mhpflid", "mhpflid_fusion": "concat"}, "--mhpflid_fusion 'concat' is unknown"),
    ({"method": "mhpflid", "injection_epochs": 0, "distillation_epochs": 0}, "would train nothing"),
    ({"method": "fml", "fml_alpha": 1.5}, "--fml_alpha must be in [0, 1], got 1.5"),
    ({"method": "fedkd", "fedkd_energy_end": 0}, "--fedkd_energy_end must be in (0, 1]"),
    ({"method": "fedmas"}, "needs --pre_trained_models"),
    ({"method": "fedmas", "pre_trained_models": "random", "aggregate_method": "median"}, "'median' is unknown"),
    ({"comm_round": 0}, "--comm_round must be at least 1, got 0"),
    ({"lr": "fast"}, "'lr' must be float, got 'fast'"),
    ({"epochs": 1.5}, "'epochs' must be int, got 1.5"),
    ({"adam": "maybe"}, "'adam' must be bool"),
    ({"partition_method": "hetero", "partition_alpha": 0}, "partition_alpha must be > 0"),
    ({"partition_method": "random"}, "--partition_method 'random' is unknown"),
    ({"aggregate_method": "mas"}, "--aggregate_method applies to --method fedmas; this run is --method fedavg"),
    ({"mu": 0.9}, "--mu applies to --method fedprox, moon; this run is --method fedavg"),
    ({"magnifications": "40X"}, "--magnifications applies to --dataset breakhis; this run is --method fedavg on "
                                "--dataset synthetic"),
    ({"thread_number": 8}, "--thread_number 8 sets the number of GPU workers with --gpu"),
    ({"method": "mhpflid", "lr": 0.1}, "--lr applies to --method fedavg, fedprox"),
    ({"method": "scaffold", "adam": True}, "option II's control variates"),
    ({"dataset": "synthetic_multires", "data_dir": "x"}, "--data_dir applies to data sets read from files"),
    ({"dataset": "breakhis"}, "--dataset breakhis needs --data_dir"),
    ({"dataset": "breakhis", "data_dir": "x", "partition_method": "iid"}, "comes split over its clients"),
    ({"fedavg_typo": 1}, "unknown setting 'fedavg_typo'"),
])
def test_bad_values_name_the_key(values, text):
    with pytest.raises(ConfigError) as err:
        build_config(values)
    assert text in str(err.value)


def test_heterogeneous_methods_default_to_the_seeds_batch_of_8():
    assert build_config({"method": "MHpFLID"}).batch_size == 8
    assert build_config({"method": "fedkd", "batch_size": 32}).batch_size == 32
    assert build_config({"method": "fedavg"}).batch_size == RunConfig().batch_size == 64


def test_reference_flags_at_their_default_are_accepted_by_every_method():
    # the seed's FedAvg command passes Fed-MAS's --update_projector_head 'both'
    cfg = build_config({"method": "fedavg", "update_projector_head": "both", "aggregate_method": "AVG", "free_u": 0})
    assert not cfg.has("update_projector_head") and "update_projector_head" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="--update_projector_head applies to --method fedmas"):
        build_config({"method": "fedavg", "update_projector_head": "free"})


def test_settings_of_the_method_and_data_set_read_as_attributes_and_round_trip():
    cfg = build_config({"method": "fedprox", "mu": "0.1", "dataset": "synthetic_multires", "patients_scale": 2})
    assert (cfg.mu, cfg.patients_scale, cfg.lr) == (0.1, 2.0, 1e-3)
    with pytest.raises(AttributeError, match="'free_u' is not a setting of this run"):
        cfg.free_u
    saved = cfg.to_dict()
    assert saved["mu"] == 0.1 and "free_u" not in saved and "data_scale" not in saved
    assert build_config(saved).to_dict() == saved
    assert cfg.updated(mu=0.2).mu == 0.2 and cfg.mu == 0.1


def test_method_defaults_differ_where_the_method_says_so():
    assert build_config({"method": "fedyogi"}).server_lr == 0.01
    assert build_config({"method": "fedadam"}).server_lr == 0.1
    scaffold = build_config({"method": "scaffold"})
    assert (scaffold.momentum, scaffold.nesterov) == (0.0, False)
    assert build_config({"method": "fedavg"}).momentum == 0.9


def test_client_architectures_default_cycle_and_count_check():
    from fedward.algorithms.base import client_architectures
    from fedward.algorithms.heterogeneous import DEFAULT_CLIENT_MODELS

    assert client_architectures(build_config({"method": "mhpflid"}), 6, list(DEFAULT_CLIENT_MODELS)) == [
        "resnet17", "resnet11", "resnet8", "resnet5", "resnet17", "resnet11"]
    assert client_architectures(build_config({"method": "local", "model": "smallcnn"}), 2) == ["smallcnn", "smallcnn"]
    cfg = build_config({"method": "local", "client_models": "resnet5,smallcnn"})
    assert client_architectures(cfg, 2) == ["resnet5", "smallcnn"]
    with pytest.raises(ConfigError, match="lists 2 models .* but the data set has 3 clients"):
        client_architectures(cfg, 3)


def test_yaml_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: fedprox\nmu: 0.01\nclass_names: [a, b]\n")
    assert load_yaml(path) == {"method": "fedprox", "mu": 0.01}
    (tmp_path / "dead.yaml").write_text("distill_u: 1\n")
    with pytest.raises(ConfigError, match="distill_u.*not accepted"):
        load_yaml(tmp_path / "dead.yaml")
    (tmp_path / "typo.yaml").write_text("comm_rounds: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'comm_rounds'"):
        load_yaml(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_defaults_follow_the_reference():
    cfg = build_config({"method": "fedprox"})
    assert cfg.persist_optimizer_state and cfg.bn_policy == "average" and cfg.mu == 0.45


@pytest.mark.parametrize("name", ["demo.yaml", "results.yaml", "mhpflid.yaml", "strategies.yaml"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    from fedward.config import load_yaml

    cfg = build_config(load_yaml(Path(__file__).parent.parent / "configs" / name))
    assert cfg.comm_round >= 1


def _methods():
    from fedward.algorithms import list_methods

    return list_methods()


@pytest.mark.parametrize("method", _methods())
def test_every_methods_config_pickles_and_round_trips(method):
    """A worker pool (--devices cpu,cpu) sends the config to its processes; config.yaml rebuilds it."""
    import pickle

    extra = {"pre_trained_models": "random"} if method == "fedmas" else {}
    cfg = build_config({"method": method, **extra})
    assert pickle.loads(pickle.dumps(cfg)).to_dict() == cfg.to_dict() == build_config(cfg.to_dict()).to_dict()


def test_the_benchmark_grids_build_valid_configs():
    """Every run of `bench/bench_results.py` is a valid config (`fedward reproduce`'s tables have
    their own test)."""
    import importlib.util
    from pathlib import Path

    import yaml

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("bench_results", root / "bench" / "bench_results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    for name, grid in results.GRIDS.items():
        base = yaml.safe_load((root / "configs" / ("strategies.yaml" if name in ("strategies", "sgd_lr")
                                                    else "results.yaml")).read_text())
        for _, overrides in grid:
            overrides = {k: v for k, v in overrides.items() if k != "prior"}  # bench_results' prior file choice
            if overrides["method"] == "fedmas":
                overrides = {**results.FEDMAS, **overrides, "pre_trained_models": "random"}
            build_config({**base, **overrides})


@pytest.mark.parametrize("values, dataset", [
    ({}, "synthetic"),
    ({"data_dir": "data/Flamby_isic"}, "fed_isic2019"),  # the seed's commands
    ({"method": "mhpflid"}, "synthetic_multires"),  # a model-heterogeneous method's own setting
    ({"method": "fml", "data_dir": "BreaKHis_v1"}, "breakhis"),
    ({"method": "mhpflid", "dataset": "synthetic_multires"}, "synthetic_multires"),
    ({"method": "fedavg", "dataset": "synthetic_multires"}, "synthetic_multires"),
])
def test_a_method_takes_its_natural_data_set_when_none_is_named(values, dataset):
    assert build_config(values).dataset == dataset

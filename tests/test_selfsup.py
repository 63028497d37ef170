"""Self-supervised priors: MoCo-v2 augmentation, the MoCo step, the checkpoint format, resume,
image folders, ``fedward prior train|download`` and ``--pre_trained_models auto|mix``."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedward import priors
from fedward.cli import main
from fedward.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fedward.config import build_config
from fedward.download import RemoteFile, offline
from fedward.engine.simulation import prepare
from fedward.errors import CheckpointError, DataError
from fedward.selfsup import cached, moco
from fedward.selfsup.augment import MocoV2Augment, grayscale
from fedward.selfsup.images import read_image_folder
from fedward.selfsup.moco import MocoModel, MocoSettings, knn_accuracy, train_moco

TINY = dict(arch="smallcnn", image_size=16, batch_size=16, bn_groups=2, epochs=2, feature_dim=8)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean


def test_augment_identity_settings_give_back_the_image_or_its_mirror():
    images = _images(6)
    augment = MocoV2Augment(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = _unnormalise(augment(images, torch.Generator().manual_seed(1)))
    plain, mirrored = images.float() / 255, images.flip(-1).float() / 255
    matches = [torch.allclose(v, a, atol=1e-5) or torch.allclose(v, b, atol=1e-5) for v, a, b in zip(out, plain, mirrored)]
    assert all(matches)
    assert any(torch.allclose(v, b, atol=1e-5) for v, b in zip(out, mirrored))  # some views were flipped
    same = MocoV2Augment(16)(images, torch.Generator().manual_seed(3))
    again = MocoV2Augment(16)(images, torch.Generator().manual_seed(3))
    assert torch.equal(same, again) and same.shape == (6, 3, 16, 16) and same.dtype == torch.float32


def test_augment_grayscale_always_makes_equal_channels():
    augment = MocoV2Augment(16, jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)
    out = _unnormalise(augment(_images(3), torch.Generator().manual_seed(0)))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_hue_rotation_of_zero_and_unit_factors_change_nothing():
    images = torch.rand(2, 3, 4, 4)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.allclose(MocoV2Augment._jitter(images, one, one, one, zero), images, atol=1e-6)
    # saturation 0 gives the grey image; brightness 0.5 halves every pixel
    grey = MocoV2Augment._jitter(images, one, one, zero, zero)
    assert torch.allclose(grey, grayscale(images).expand_as(images), atol=1e-6)
    assert torch.allclose(MocoV2Augment._jitter(images, one * 0.5, one, one, zero), images * 0.5, atol=1e-6)


def test_knn_accuracy_by_hand():
    # two tight clusters; point 3 sits in cluster 0's place but is labelled 1
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.98, -0.1]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    # k=1: 0 -> 1 (label 0, right), 1 -> 0 (right), 2 -> nearest is 1 (label 0, wrong), 3 -> 0 (wrong)
    assert knn_accuracy(features, labels, k=1) == 0.5


def test_moco_step_updates_key_encoder_and_queue_by_hand():
    settings = MocoSettings(**{**TINY, "key_momentum": 0.9})
    model = MocoModel(settings, queue_size=32)
    key_before = model.encoder_k.fc[0].weight.clone()
    query_before = model.encoder_q.fc[0].weight.clone()
    old_queue = model.queue.clone()
    images = torch.randn(16, 3, 16, 16)
    loss, accuracy = model(images, images, torch.Generator().manual_seed(0))
    expected = 0.9 * key_before + 0.1 * query_before  # the momentum update, before the keys are computed
    assert torch.allclose(model.encoder_k.fc[0].weight, expected)
    assert int(model.queue_ptr) == 16
    # the 16 new keys are unit vectors in the first 16 queue columns; the rest is untouched
    assert torch.allclose(model.queue[:, :16].norm(dim=0), torch.ones(16), atol=1e-5)
    assert torch.equal(model.queue[:, 16:], old_queue[:, 16:])
    # the loss is the cross-entropy of [q.k+, q.queue] / T with the positive first
    assert loss.ndim == 0 and loss.item() > 0 and 0 <= accuracy.item() <= 1


def test_training_writes_the_moco_format_and_loads_as_a_prior(tmp_path):
    path = tmp_path / "prior.pth.tar"
    images = _images(64)
    summary = train_moco(images, MocoSettings(**TINY), path, labels=torch.arange(64) % 4, progress=False, log=lambda m: None)
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "smallcnn" and payload["epoch"] == 2 and "optimizer" in payload
    keys = payload["state_dict"]
    assert "module.queue" in keys and "module.queue_ptr" in keys
    assert {"module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight", "module.encoder_k.fc.2.weight"} <= set(keys)
    assert len(summary["history"]) == 2 and {"knn_before", "knn_after"} <= set(summary)
    prior = priors.load_prior(str(path), image_size=16)  # loads like the real MoCo checkpoint
    backbone = {k.removeprefix("module.encoder_q."): v for k, v in keys.items()
                if k.startswith("module.encoder_q.") and ".fc." not in f".{k}"}
    assert set(prior.encoder.state_dict()) == set(backbone)
    assert priors.prior_dim(str(path)) == prior.num_features


def test_interrupted_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    images = _images(48)
    settings = MocoSettings(**{**TINY, "epochs": 3})
    straight = tmp_path / "straight.pth.tar"
    train_moco(images, settings, straight, progress=False, log=lambda m: None)

    resumed = tmp_path / "resumed.pth.tar"
    real_save = moco.save_checkpoint

    def crash_after_first_epoch(path, model, optimizer, epoch, *args, **kwargs):
        real_save(path, model, optimizer, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(moco, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_moco(images, settings, resumed, progress=False, log=lambda m: None)
    monkeypatch.setattr(moco, "save_checkpoint", real_save)
    with pytest.raises(Exception, match="--resume"):
        train_moco(images, settings, resumed, progress=False, log=lambda m: None)
    train_moco(images, settings, resumed, resume=True, progress=False, log=lambda m: None)
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_image_folder_reads_sizes_and_names_bad_files(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(tmp_path / "a" / "wide.png")
    Image.fromarray(np.zeros((30, 10, 3), np.uint8)).save(tmp_path / "tall.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = read_image_folder(tmp_path, 16, progress=False)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert int(images[0].float().mean().round()) == 200  # a/wide.png sorts first
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="1 unreadable image.*broken.jpg"):
        read_image_folder(tmp_path, 16, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty", 16, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "missing", 16, progress=False)


def test_cli_prior_train_on_the_public_split(tmp_path, capsys):
    out = tmp_path / "p.pth.tar"
    code = main(["prior", "train", "--arch", "smallcnn", "--image_size", "16", "--public_images", "96",
                 "--batch_size", "16", "--bn_groups", "2", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert code == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "kNN accuracy" in text and f"--pre_trained_models {out}" in text
    assert main(["prior", "train", "--image_size", "16", "--public_images", "8", "--out", str(tmp_path / "x")]) == 2


def test_mix_assigns_both_priors_evenly_and_reproducibly():
    names = priors.client_prior_names("mix", 6, seed=0)
    assert sorted(names) == ["IMAGENET1K_V1"] * 3 + ["moco"] * 3
    assert names == priors.client_prior_names("mix", 6, seed=0)
    assert priors.client_prior_names("moco", 3, seed=0) == ["moco"] * 3


@pytest.fixture
def file_server(tmp_path):
    """A plain static HTTP server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(served)))
    httpd.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _small_moco_file(path, arch="resnet8", seed=0):
    train_moco(_images(32, 16), MocoSettings(arch=arch, image_size=16, batch_size=16, bn_groups=2, epochs=0,
                                             feature_dim=8, seed=seed), path, progress=False, log=lambda m: None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_prior_download_fetches_verifies_and_loads(file_server, tmp_path, monkeypatch, capsys):
    served, url = file_server
    md5 = _small_moco_file(served / priors.MOCO_FILE)
    monkeypatch.setitem(priors.REMOTE_PRIORS, "moco", RemoteFile(priors.MOCO_FILE, f"{url}/{priors.MOCO_FILE}",
                                                                 md5_prefix=md5[:8], licence="test licence"))
    target = tmp_path / "priors"
    assert main(["prior", "download", "moco-v2", "--to", str(target), "--no-progress"]) == 2  # licence not accepted
    assert "--accept-licence" in capsys.readouterr().err
    assert main(["prior", "download", "moco-v2", "--to", str(target), "--accept-licence", "--no-progress"]) == 0
    assert (target / priors.MOCO_FILE).read_bytes() == (served / priors.MOCO_FILE).read_bytes()
    assert "prior ready" in capsys.readouterr().out
    # the published checksum does not match: nothing is left under the real name
    monkeypatch.setitem(priors.REMOTE_PRIORS, "18_img", RemoteFile("resnet18-f37072fd.pth", f"{url}/{priors.MOCO_FILE}",
                                                                   sha256_prefix="f37072fd"))
    assert main(["prior", "download", "18_img", "--to", str(target), "--no-progress"]) == 2
    assert "f37072fd" in capsys.readouterr().err and not (target / "resnet18-f37072fd.pth").exists()
    assert main(["prior", "download", "dinov2", "--to", str(target)]) == 2


def test_a_missing_public_prior_is_downloaded_on_demand_unless_offline(file_server, tmp_path, monkeypatch, capsys,
                                                                        tiny_values):
    served, url = file_server
    md5 = _small_moco_file(served / priors.MOCO_FILE)
    monkeypatch.setitem(priors.REMOTE_PRIORS, "moco", RemoteFile(priors.MOCO_FILE, f"{url}/{priors.MOCO_FILE}",
                                                                 md5_prefix=md5[:8], licence="test licence"))
    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "cache"))
    target = priors.default_prior_dir() / priors.MOCO_FILE
    command = re.escape(f"`fedward prior download moco --to {target.parent}`")
    with pytest.raises(CheckpointError, match=f"not found at .* downloads are off .*{command}"):  # the suite is offline
        priors.load_prior("moco", image_size=16)
    assert not target.exists()
    elsewhere = tmp_path / "elsewhere.pth"  # an explicit path: never fetched
    with pytest.raises(CheckpointError, match=f"{re.escape(str(elsewhere))}; put it there \\(`fedward prior download"):
        priors.load_prior("moco", prior_path=elsewhere, image_size=16)
    monkeypatch.delenv("FEDWARD_OFFLINE")
    assert not offline()
    prior = priors.load_prior("moco", image_size=16)
    assert target.read_bytes() == (served / priors.MOCO_FILE).read_bytes()  # verified, into the cache the error named
    notice = capsys.readouterr().err
    assert f"prior 'moco': downloading {url}/{priors.MOCO_FILE}" in notice and "test licence" in notice
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(prior(images), priors.load_prior(str(target), image_size=16)(images))
    target.unlink()
    monkeypatch.setitem(priors.REMOTE_PRIORS, "moco", RemoteFile(priors.MOCO_FILE, f"{url}/gone.tar", md5_prefix="0"))
    with pytest.raises(CheckpointError, match=f"could not be downloaded .*404.*{command}"):
        priors.load_prior("moco", image_size=16)
    prepare(build_config({**tiny_values, "offline": True, "output": str(tmp_path / "run")}))  # --offline
    assert offline() and os.environ["FEDWARD_OFFLINE"] == "1"


def test_downloaded_file_of_the_wrong_architecture_is_reported(file_server, tmp_path, monkeypatch, capsys):
    served, url = file_server
    path = served / "resnet50-11ad3fa6.pth"
    _small_moco_file(path)
    payload = torch.load(path, weights_only=True)
    payload.pop("arch")  # a file that does not say what it is is taken as the name's ResNet-50
    torch.save(payload, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(priors.REMOTE_PRIORS, "IMAGENET1K_V1",
                        RemoteFile(path.name, f"{url}/{path.name}", sha256_prefix=sha[:8]))
    assert main(["prior", "download", "IMAGENET1K_V1", "--to", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "is not a resnet50 backbone: missing" in capsys.readouterr().err


def test_auto_prior_trains_once_and_prefers_the_moco_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "cache"))  # a prior folder of its own
    monkeypatch.setattr(cached, "cached_prior_settings",
                        lambda size: MocoSettings(arch="smallcnn", image_size=size, batch_size=16, bn_groups=2, epochs=1,
                                                  feature_dim=8))
    monkeypatch.setattr(cached, "PUBLIC_IMAGES", 96)
    prior = priors.load_prior("auto", image_size=16)
    trained = cached.cached_prior_path(16)
    assert trained.is_file() and "training a self-supervised" in capsys.readouterr().err
    stamp = trained.stat().st_mtime_ns
    priors.load_prior("auto", image_size=16)
    assert trained.stat().st_mtime_ns == stamp and "training" not in capsys.readouterr().err
    assert priors.resolve_auto(16) == str(trained) and prior.num_features == priors.prior_dim("auto", image_size=16)
    moco_file = priors.default_prior_dir() / priors.MOCO_FILE
    _small_moco_file(moco_file)
    assert priors.resolve_auto(16) == str(moco_file)


def test_mix_run_gives_clients_their_own_prior(tmp_path, monkeypatch, tiny_values):
    from fedward.config import build_config
    from fedward.engine.setup import initial_global_state, load_data
    from fedward.engine.simulation import ClientTask, Simulation
    from fedward.errors import ConfigError

    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path / "cache"))  # a prior folder of its own
    folder = priors.default_prior_dir()
    _small_moco_file(folder / priors.MOCO_FILE)
    _small_moco_file(folder / priors.PRIOR_FILES["IMAGENET1K_V1"][1], arch="resnet5")
    with pytest.raises(ConfigError, match="different feature widths"):
        priors.prior_dim("mix")
    (folder / priors.PRIOR_FILES["IMAGENET1K_V1"][1]).unlink()
    _small_moco_file(folder / priors.PRIOR_FILES["IMAGENET1K_V1"][1], seed=1)
    cfg = build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "mix", "free_u": 1})
    sim = Simulation(cfg, load_data(cfg), "cpu")
    state, _ = initial_global_state(cfg, sim.build_model)
    names = priors.client_prior_names("mix", len(sim.training_clients), cfg.seed)
    for k in (names.index("moco"), names.index("IMAGENET1K_V1")):
        sim.run_client(ClientTask(1, k, sim.algorithm.server_message(1, state, {}), {}), False)
    assert set(sim.workspace.priors) == {"moco", "IMAGENET1K_V1"}
    first, second = (sim.workspace.priors[n].encoder.state_dict()["conv1.weight"] for n in ("moco", "IMAGENET1K_V1"))
    assert not torch.equal(first, second)  # two different files, one per group of clients
    with pytest.raises(ConfigError, match="mix uses two files"):
        build_config({**tiny_values, "method": "fedmas", "pre_trained_models": "mix", "prior_path": "x.pth"})

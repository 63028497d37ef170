"""Frozen priors load from checkpoints in the real MoCo-v2 format (random weights, real key names)."""

from __future__ import annotations

import pytest
import torch

from fedward.errors import CheckpointError, ConfigError
from fedward.models import get_model
from fedward.priors import MOCO_FILE, load_prior, prior_dim


def _moco_checkpoint(path, architecture="resnet50", claimed=None):
    """Like moco_v2_800ep_pretrain.pth.tar: {'epoch', 'arch', 'state_dict': module.encoder_q.* (with the
    MLP head fc.0/fc.2), module.encoder_k.*, module.queue, module.queue_ptr}, 'optimizer'}."""
    torch.manual_seed(0)
    backbone = get_model(architecture, num_classes=1000, image_size=224, stem="imagenet").state_dict()
    width = 2048 if architecture == "resnet50" else 512
    state = {f"module.encoder_q.{k}": v for k, v in backbone.items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(width, width), "module.encoder_q.fc.0.bias": torch.randn(width),
                  "module.encoder_q.fc.2.weight": torch.randn(128, width), "module.encoder_q.fc.2.bias": torch.randn(128),
                  "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7), "module.queue": torch.randn(128, 16),
                  "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 800, "arch": claimed or architecture, "state_dict": state, "optimizer": {}}, path)
    return {k.removeprefix("module.encoder_q."): v for k, v in state.items() if k.startswith("module.encoder_q.")}


def test_moco_checkpoint_loads_every_backbone_key_and_drops_the_head(tmp_path):
    path = tmp_path / MOCO_FILE
    saved = _moco_checkpoint(path)
    prior = load_prior("moco", prior_path=path)
    loaded = prior.encoder.state_dict()
    backbone_keys = {k for k in saved if not k.startswith("fc.")}
    assert set(loaded) == backbone_keys  # every backbone key used, no head left
    assert all(torch.equal(loaded[k], saved[k]) for k in backbone_keys)
    features = prior(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 2048) and not features.requires_grad
    prior.train()
    assert not prior.training and not prior.encoder.training  # stays frozen
    assert all(not p.requires_grad for p in prior.parameters())


def test_batchnorm_drift_flag_reproduces_the_reference_quirk(tmp_path):
    path = tmp_path / MOCO_FILE
    _moco_checkpoint(path)
    prior = load_prior("moco", prior_path=path, keep_batchnorm_drift=True)
    before = prior.encoder.bn1.running_mean.clone()
    prior.train()
    prior(torch.rand(4, 3, 64, 64))
    assert not torch.equal(before, prior.encoder.bn1.running_mean)


def test_checkpoint_architecture_key_decides_the_encoder(tmp_path):
    path = tmp_path / "r18.pth.tar"
    saved = _moco_checkpoint(path, architecture="resnet18")
    prior = load_prior(str(path), image_size=32)
    assert prior.num_features == 512 and prior_dim(str(path)) == 512
    assert torch.equal(prior.encoder.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_wrong_architecture_names_the_keys(tmp_path):
    path = tmp_path / "r18.pth.tar"
    _moco_checkpoint(path, architecture="resnet18", claimed="resnet50")
    with pytest.raises(CheckpointError) as err:
        load_prior(str(path))
    message = str(err.value)
    assert str(path) in message and "missing: " in message and "layer1.0.conv3.weight" in message


def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDWARD_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{MOCO_FILE}: not found at {tmp_path}/priors/{MOCO_FILE}"):
        load_prior("moco")
    with pytest.raises(ConfigError, match="neither one of"):
        load_prior("dinov2")


def test_channels_last_prior_gives_the_same_features(tmp_path):
    path = tmp_path / MOCO_FILE
    _moco_checkpoint(path)
    large, small = load_prior("moco", prior_path=path, image_size=224), load_prior("moco", prior_path=path, image_size=32)
    assert large.channels_last and not small.channels_last
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(large(images), small(images), atol=1e-4)

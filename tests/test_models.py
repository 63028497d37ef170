"""Model registry, ResNets (torchvision layout), the MH-pFLID bottleneck family, heads and ImageNet loading."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedward.errors import CheckpointError, ConfigError
from fedward.models import (
    CosineClassifier,
    ProjectionModel,
    default_weights_path,
    get_model,
    list_models,
    load_pretrained_backbone,
    resolve_stem,
    use_cosine_classifier,
)
from fedward.seeding import torch_generator


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a busy
    2-core machine made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, seed: int = 0, *, num_classes: int = 3, image_size: int = 32, **kwargs: object) -> nn.Module:
    return get_model(
        name, num_classes=num_classes, image_size=image_size, generator=torch_generator(seed, "init", name), **kwargs
    )


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch_generator(seed, "images"))


@functools.lru_cache(maxsize=None)
def imagenet_resnet(name: str) -> nn.Module:
    """A 1000-class, ImageNet-stem model, built once per run (tests must not modify it).

    Its BN running stats are moved off their init by one train-mode pass, so that loading them is
    observable.
    """
    model = build(name, seed=100, num_classes=1000, image_size=224)
    with torch.no_grad():
        model(images(size=64, seed=100))
    return model


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- every registered model

IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50")


def test_registry_lists_all_models() -> None:
    expected = {"resnet5", "resnet8", "resnet11", "resnet17", "resnet18", "resnet34", "resnet50", "smallcnn", "messenger"}
    assert set(list_models()) == expected


@pytest.mark.parametrize("name", list_models())
def test_model_interface_gradients_and_state_dict_round_trip(name: str) -> None:
    # The torchvision ResNets run with their ImageNet stem at 64 px (cheap: 2x2 final maps); the
    # others with their auto stem at 32 px. Other stems are covered in test_stems_shapes_and_downsampling.
    size, options = (64, {"stem": "imagenet"}) if name in IMAGENET_RESNETS else (32, {})
    model = build(name, seed=1, image_size=size, **options)
    x = images(size=size)
    logits, embedding, fmap = model(x), model.embed(x), model.feature_map(x)  # train mode: moves BN stats
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert embedding.shape == (2, model.num_features)
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, model.num_features)
    first_linear = model.fc if isinstance(model.fc, nn.Linear) else model.fc[0]  # the messenger's head is an MLP
    assert isinstance(first_linear, nn.Linear) and first_linear.in_features == model.num_features
    # forward is fc(embed), embed is the global average of the feature map
    torch.testing.assert_close(embedding, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.fc(embedding))

    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname

    expected = model.eval()(x)
    fresh = build(name, seed=2, image_size=size, **options).eval()
    assert not torch.equal(fresh(x), expected)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), expected)


def test_generator_makes_init_reproducible_and_leaves_global_stream_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = build("resnet8", seed=5), build("resnet8", seed=5), build("resnet8", seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b_state[key]), key
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_init_follows_torchvision() -> None:
    model = imagenet_resnet("resnet18")
    # Kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * k * k)); 9408 draws -> ~1% error
    assert model.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 7 * 7)), rel=0.05)
    assert torch.equal(model.layer3[0].bn2.weight, torch.ones(256))
    assert torch.equal(model.bn1.bias, torch.zeros(64))
    assert model.fc.weight.abs().max().item() <= 1 / math.sqrt(512)


def test_get_model_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'x'; expected one of: .*resnet18"):
        get_model("x", num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        get_model("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match="image_size"):
        get_model("resnet18", num_classes=2, image_size=-1)
    with pytest.raises(ConfigError, match="unknown stem 'tiny'"):
        get_model("resnet18", num_classes=2, stem="tiny")
    with pytest.raises(ConfigError, match="'smallcnn' takes no option 'stem'"):
        get_model("smallcnn", num_classes=2, stem="small")


# ---------------------------------------------------------------- torchvision ResNets


def test_resnet_keys_and_shapes_match_torchvision() -> None:
    # Counts by hand: every conv has a weight only; every BN has weight, bias, running_mean,
    # running_var, num_batches_tracked; fc has weight and bias.
    # resnet18: convs = stem 1 + 8 blocks * 2 + 3 downsamples (layers 2-4) = 20 = BNs.
    r18 = shapes(imagenet_resnet("resnet18"))
    assert len(r18) == 20 + 20 * 5 + 2
    assert sum(len(s) == 4 for s in r18.values()) == 20
    assert r18["conv1.weight"] == (64, 3, 7, 7)
    assert r18["bn1.running_var"] == (64,)
    assert r18["layer1.1.conv2.weight"] == (64, 64, 3, 3)
    assert r18["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.running_mean"] == (128,)
    assert r18["layer4.1.bn2.num_batches_tracked"] == ()
    assert r18["fc.weight"] == (1000, 512) and r18["fc.bias"] == (1000,)
    assert "layer1.0.downsample.0.weight" not in r18 and "layer1.2.conv1.weight" not in r18

    # resnet34: convs = 1 + (3 + 4 + 6 + 3) * 2 + 3 = 36.
    r34 = shapes(imagenet_resnet("resnet34"))
    assert len(r34) == 36 + 36 * 5 + 2
    assert r34["layer3.5.conv2.weight"] == (256, 256, 3, 3)
    assert "layer3.6.conv1.weight" not in r34

    # resnet50: convs = 1 + 16 blocks * 3 + 4 downsamples (layer1 too: 64 -> 256) = 53 = BNs.
    r50 = shapes(imagenet_resnet("resnet50"))
    assert len(r50) == 53 + 53 * 5 + 2
    assert sum(len(s) == 4 for s in r50.values()) == 53
    assert r50["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert r50["layer2.0.conv1.weight"] == (128, 256, 1, 1)
    assert r50["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert r50["layer4.2.bn3.weight"] == (2048,)
    assert r50["fc.weight"] == (1000, 2048)


def test_resnet_stride_sits_on_the_3x3_conv() -> None:
    model = imagenet_resnet("resnet50")
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize(
    "name, expected",
    # torchvision's published parameter counts for 1000 classes
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_resnet_parameter_counts_equal_torchvision(name: str, expected: int) -> None:
    model = imagenet_resnet(name)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "image_size, expected",
    [(224, "imagenet"), (96, "imagenet"), (95, "medium"), (41, "medium"), (40, "small"), (28, "small")],
)
def test_auto_stem_choice(image_size: int, expected: str) -> None:
    assert resolve_stem("auto", image_size) == expected
    assert build("resnet5", image_size=image_size).stem == expected


def test_stems_shapes_and_downsampling() -> None:
    # resnet8 (stages 1-2, /2 in stage 2) shares the stem code of all ResNets and is cheap.
    imagenet = build("resnet8", image_size=224)
    assert imagenet.conv1.weight.shape == (64, 3, 7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet.feature_map(images(size=64)).shape == (2, 128, 8, 8)  # /4 stem, /2 stages

    medium = build("resnet8", image_size=64)
    assert medium.stem == "medium" and medium.conv1.weight.shape == (64, 3, 3, 3) and medium.conv1.stride == (1, 1)
    assert medium.feature_map(images(size=64)).shape == (2, 128, 16, 16)  # /2 stem (max pool only)

    small = build("resnet8", image_size=224, stem="small")
    assert small.stem == "small" and isinstance(small.maxpool, nn.Identity)
    assert small.feature_map(images(size=32)).shape == (2, 128, 16, 16)  # no stem downsampling
    assert set(shapes(small)) == set(shapes(imagenet))  # key names do not depend on the stem

    gray = build("resnet8", image_size=32, in_channels=1)
    assert gray.conv1.weight.shape == (64, 1, 3, 3)
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


# ---------------------------------------------------------------- MH-pFLID bottleneck family


@pytest.mark.parametrize(
    "name, blocks, num_features",
    [
        ("resnet17", [1, 1, 2, 1], 512),
        ("resnet11", [1, 1, 1, 0], 256),
        ("resnet8", [1, 1, 0, 0], 128),
        ("resnet5", [1, 0, 0, 0], 64),
    ],
)
def test_bottleneck_family_structure(name: str, blocks: list[int], num_features: int) -> None:
    model = build(name, num_classes=4)
    for stage, count in enumerate(blocks, start=1):
        layer = getattr(model, f"layer{stage}", None)
        assert (0 if layer is None else len(layer)) == count, f"layer{stage}"
    assert model.num_features == num_features
    assert model.fc.weight.shape == (4, num_features)
    keys = shapes(model)
    # no x4 expansion: 1x1 -> 3x3 -> 1x1 all at the stage width
    assert keys["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert keys["layer1.0.conv2.weight"] == (64, 64, 3, 3)
    assert keys["layer1.0.conv3.weight"] == (64, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in keys  # 64 -> 64, stride 1


def test_bottleneck_family_projection_shortcut_and_stride() -> None:
    model = build("resnet17")
    keys = shapes(model)
    assert keys["layer2.0.conv1.weight"] == (128, 64, 1, 1)
    assert keys["layer2.0.conv3.weight"] == (128, 128, 1, 1)
    assert keys["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert keys["layer3.1.conv2.weight"] == (256, 256, 3, 3)
    assert "layer3.1.downsample.0.weight" not in keys
    assert model.layer4[0].conv2.stride == (2, 2) and model.layer4[0].conv1.stride == (1, 1)
    # small stem at 32 px, then /2 in each of stages 2-4
    assert model.feature_map(images()).shape == (2, 512, 4, 4)


def test_resnet5_parameter_count_by_hand() -> None:
    model = build("resnet5", num_classes=10, image_size=32)  # small stem: 3x3 conv 3 -> 64
    stem = 64 * 3 * 3 * 3 + 2 * 64
    block = (64 * 64 + 2 * 64) + (64 * 64 * 9 + 2 * 64) + (64 * 64 + 2 * 64)
    head = 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == stem + block + head


# ---------------------------------------------------------------- heads


def test_projection_model_shapes_and_no_dead_parameters() -> None:
    backbone = build("smallcnn", num_classes=5)
    model = ProjectionModel(backbone, num_classes=3, proj_dim=8, generator=torch_generator(0, "proj"))
    x = images()
    z, logits = model.project(x)
    assert z.shape == (2, 8) and logits.shape == (2, 3) and model.num_features == 8
    assert torch.equal(model(x), logits) and torch.equal(model.embed(x), z)
    assert model.feature_map(x).shape == (2, 32, 8, 8)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.p1.weight.shape == (32, 32) and model.p2.weight.shape == (8, 32) and model.fc.weight.shape == (3, 8)
    # z is the p2 output: f -> p1 -> ReLU -> p2
    f = backbone.embed(x)
    torch.testing.assert_close(z, model.p2(torch.relu(model.p1(f))))
    assert not any(k.startswith("backbone.fc") for k in model.state_dict())
    (logits.sum() + z.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_projection_model_rejects_a_plain_module() -> None:
    with pytest.raises(ConfigError, match="backbone with num_features.*got Linear"):
        ProjectionModel(nn.Linear(3, 3), num_classes=2)


def test_cosine_classifier_matches_hand_computation() -> None:
    head = CosineClassifier(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))  # unit rows (0.6, 0.8), (0, -1)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # unit rows (1, 0), (1, 1) / sqrt(2)
    expected = torch.tensor([[0.6, 0.0], [1.4 / math.sqrt(2), -1 / math.sqrt(2)]])
    torch.testing.assert_close(head(x), expected)
    assert not any(name == "bias" for name, _ in head.named_parameters())


def test_cosine_classifier_output_is_bounded_and_swappable() -> None:
    model = use_cosine_classifier(build("smallcnn", num_classes=4), generator=torch_generator(0, "cos"))
    assert isinstance(model.fc, CosineClassifier)
    assert model.fc.weight.shape == (4, 32)
    logits = model(images() * 100)
    assert logits.shape == (2, 4)
    assert logits.abs().max().item() <= 1 + 1e-6
    with pytest.raises(ConfigError, match="fc is nn.Linear"):
        use_cosine_classifier(model)  # its fc is no longer a Linear


# ---------------------------------------------------------------- ImageNet weights


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def save_weights(state: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def r18_weights() -> dict[str, torch.Tensor]:
    """A resnet18 state dict in torchvision's format (1000-class fc, trained-looking BN stats)."""
    return imagenet_resnet("resnet18").state_dict()


@pytest.fixture(scope="module")
def r18_file(r18_weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(r18_weights, tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth")


def test_default_weights_path_is_torchvision_cache(torch_home: Path) -> None:
    assert default_weights_path("resnet18") == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert default_weights_path("resnet50").name == "resnet50-0676ba61.pth"
    for name in ("resnet17", "smallcnn"):
        with pytest.raises(ConfigError, match=f"'{name}' has no torchvision ImageNet weights"):
            default_weights_path(name)
        with pytest.raises(ConfigError, match=name):
            load_pretrained_backbone(build(name), name, None)


def test_pretrained_loads_backbone_and_skips_fc(torch_home: Path, r18_weights: dict[str, torch.Tensor]) -> None:
    weights = r18_weights
    save_weights(weights, default_weights_path("resnet18"))
    model = build("resnet18", seed=2, num_classes=5, image_size=224)
    fc_before = model.fc.weight.clone()
    notices = load_pretrained_backbone(model, "resnet18", None)
    assert any("resnet18" in n for n in notices)
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            continue
        assert torch.equal(value, weights[key]), key
    assert torch.equal(model.fc.weight, fc_before)  # (5, 512) head kept; the file's (1000, 512) skipped


def test_pretrained_accepts_wrappers_and_strips_module_prefix(
    tmp_path: Path, r18_weights: dict[str, torch.Tensor]
) -> None:
    weights = r18_weights
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 90}
    path = save_weights(wrapped, tmp_path / "wrapped.pth")
    model = build("resnet18", seed=4, image_size=224)
    load_pretrained_backbone(model, "resnet18", str(path))
    assert torch.equal(model.layer3[1].conv2.weight, weights["layer3.1.conv2.weight"])

    under_model = save_weights({"model": weights}, tmp_path / "model.pth")
    other = build("resnet18", seed=5, image_size=224)
    load_pretrained_backbone(other, "resnet18", under_model)
    assert torch.equal(other.bn1.running_mean, weights["bn1.running_mean"])


def test_pretrained_takes_moco_query_encoder(tmp_path: Path, r18_weights: dict[str, torch.Tensor]) -> None:
    query = r18_weights
    moco = {f"module.encoder_q.{k}": v for k, v in query.items()}
    moco |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in query.items()}
    moco["module.queue"] = torch.zeros(128, 16)
    path = save_weights({"state_dict": moco, "arch": "resnet18"}, tmp_path / "moco.pth.tar")
    model = build("resnet18", seed=8, image_size=224)
    load_pretrained_backbone(model, "resnet18", path)
    assert torch.equal(model.conv1.weight, query["conv1.weight"])


def test_pretrained_missing_file_names_the_expected_path(torch_home: Path, tmp_path: Path) -> None:
    model = build("resnet18", image_size=224)
    expected = str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(CheckpointError) as info:
        load_pretrained_backbone(model, "resnet18", None)
    assert expected in str(info.value) and "--pre_trained_tv PATH" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_backbone(model, "resnet18", tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(info.value) and expected in str(info.value)


def test_pretrained_wrong_architecture_names_keys_and_shapes(tmp_path: Path) -> None:
    path = save_weights(imagenet_resnet("resnet50").state_dict(), tmp_path / "r50.pth")
    model = build("resnet18", image_size=224)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_backbone(model, "resnet18", path)
    message = str(info.value)
    # layer1.0.conv1 is 3x3 in resnet18 but 1x1 in resnet50 (same channels)
    assert "layer1.0.conv1.weight" in message and "(64, 64, 3, 3)" in message and "(64, 64, 1, 1)" in message
    assert str(path) in message and "more" in message and "\n" not in message


def test_pretrained_conv1_of_imagenet_stem_must_fit(r18_file: Path) -> None:
    gray = build("resnet18", image_size=224, in_channels=1)
    with pytest.raises(CheckpointError, match=r"conv1\.weight model wants \(64, 1, 7, 7\), file has \(64, 3, 7, 7\)"):
        load_pretrained_backbone(gray, "resnet18", r18_file)


def test_pretrained_small_stem_skips_conv1_with_notice(r18_file: Path, r18_weights: dict[str, torch.Tensor]) -> None:
    weights, path = r18_weights, r18_file
    model = build("resnet18", seed=11, image_size=32)  # small stem: conv1 is 3x3
    conv1_before = model.conv1.weight.clone()
    notices = load_pretrained_backbone(model, "resnet18", path)
    assert any("conv1.weight not loaded" in n and "'small'" in n for n in notices)
    assert torch.equal(model.conv1.weight, conv1_before)
    assert torch.equal(model.bn1.weight, weights["bn1.weight"])
    assert torch.equal(model.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])


def test_pretrained_into_projection_model_backbone(r18_file: Path, r18_weights: dict[str, torch.Tensor]) -> None:
    model = ProjectionModel(build("resnet18", seed=13, image_size=224), num_classes=3, proj_dim=16)
    load_pretrained_backbone(model, "resnet18", r18_file)
    expected = r18_weights["layer2.0.downsample.0.weight"]
    assert torch.equal(model.backbone.layer2[0].downsample[0].weight, expected)


def test_pretrained_rejects_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    model = build("resnet18", image_size=224)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_pretrained_backbone(model, "resnet18", garbage)
    a_list = save_weights([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        load_pretrained_backbone(model, "resnet18", a_list)


def test_missing_torchvision_weights_are_downloaded_into_torchvisions_cache(torch_home, tmp_path, monkeypatch):
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from fedward.models import pretrained

    served = tmp_path / "served"
    weights = build("resnet18", seed=3, image_size=224).state_dict()
    data_file = save_weights(weights, served / "tmp.pth")
    name = f"resnet18-{hashlib.sha256(data_file.read_bytes()).hexdigest()[:8]}.pth"  # torchvision's naming
    data_file.rename(served / name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(served)))
    httpd.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(pretrained.TORCHVISION_FILES, "resnet18", name)
        monkeypatch.setattr(pretrained, "TORCHVISION_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
        model = build("resnet18", seed=0, image_size=224)
        with pytest.raises(CheckpointError, match="downloads are off .*: on a machine with internet fetch http"):
            load_pretrained_backbone(model, "resnet18", None)
        monkeypatch.delenv("FEDWARD_OFFLINE")
        load_pretrained_backbone(model, "resnet18", None)
        assert (torch_home / "hub" / "checkpoints" / name).is_file()
        assert torch.equal(model.conv1.weight, weights["conv1.weight"])
        monkeypatch.setitem(pretrained.TORCHVISION_FILES, "resnet18", "resnet18-00000000.pth")  # not served
        with pytest.raises(CheckpointError, match="could not be downloaded .*HTTP 404"):
            load_pretrained_backbone(model, "resnet18", None)
    finally:
        httpd.shutdown()
        httpd.server_close()

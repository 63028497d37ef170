from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fedward.data import FederatedData, synthetic_multires
from fedward.data.types import Split
from fedward.errors import ConfigError

SPLITS = ("train", "val", "test")
# BreakHis patients per subtype x 0.5, rounded half up, worked out by hand:
# adenosis 2, fibroadenoma 5, phyllodes 1.5 -> 2, tubular 3.5 -> 4, ductal 19, lobular 2.5 -> 3,
# mucinous 4.5 -> 5, papillary 3 (43 patients: 13 benign, 30 malignant).
PATIENTS_AT_05 = [2, 5, 2, 4, 19, 3, 5, 3]
SMALL = {"seed": 3, "image_size": 16, "patients_scale": 0.5, "images_per_patient": 2}


def _same(a: FederatedData, b: FederatedData) -> bool:
    return all(
        torch.equal(getattr(x, s).images, getattr(y, s).images) and torch.equal(getattr(x, s).labels, getattr(y, s).labels)
        for x, y in zip(a.clients, b.clients)
        for s in SPLITS
    )


def _images_by_view(data: FederatedData, client: int) -> dict[tuple[int, int], torch.Tensor]:
    """(patient, view) -> image of one client, over all its splits."""
    table = {}
    for split in SPLITS:
        images = getattr(data.clients[client], split).images
        for image, patient, view in zip(images, data.info["patients"][client][split], data.info["views"][client][split]):
            assert (patient, view) not in table
            table[(patient, view)] = image
    return table


def _subtype_of_patient() -> list[int]:
    return [subtype for subtype, count in enumerate(PATIENTS_AT_05) for _ in range(count)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("multires-cache")


@pytest.fixture(scope="module")
def disjoint(cache) -> FederatedData:
    return synthetic_multires.load(cache_dir=cache, **SMALL)


@pytest.fixture(scope="module")
def shared(cache) -> FederatedData:
    return synthetic_multires.load(cache_dir=cache, shared_images=True, **SMALL)


def test_module_facts():
    m = synthetic_multires
    assert m.NAME == "synthetic_multires" and m.NUM_CLIENTS == 4 and m.CLIENT_NAMES == ["x1", "x2", "x4", "x8"]
    assert m.DOWNSAMPLING == (1, 2, 4, 8) and m.NUM_CLASSES == 2 and m.CLASS_NAMES == ["benign", "malignant"]
    assert m.SUBTYPE_NAMES[:4] == ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"]
    assert m.REPRODUCTION_SPLIT_SEEDS == (17, 27, 117, 1017)
    assert m.patient_counts(1.0) == [4, 10, 3, 7, 38, 5, 9, 6]  # BreakHis: 82 patients, 24 benign
    assert m.patient_counts(4.0) == [16, 40, 12, 28, 152, 20, 36, 24]
    assert m.patient_counts(0.5) == PATIENTS_AT_05
    assert m.patient_counts(0.1) == [1, 1, 1, 1, 4, 1, 1, 1]  # 0.4 -> 0 is kept at 1; 0.5 -> 1


def test_shapes_and_metadata(disjoint):
    assert disjoint.name == "synthetic_multires" and disjoint.num_clients == 4 and disjoint.image_size == 16
    assert disjoint.num_classes == 2 and disjoint.class_names == ["benign", "malignant"]
    assert [(c.client_id, c.name) for c in disjoint.clients] == [(0, "x1"), (1, "x2"), (2, "x4"), (3, "x8")]
    for client in disjoint.clients:
        for split in SPLITS:
            part = getattr(client, split)
            assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 16, 16)
            assert len(disjoint.info["patients"][client.client_id][split]) == len(part)
    info = disjoint.info
    assert info["seed"] == 3 and info["patients_scale"] == 0.5 and info["images_per_patient"] == 2
    assert info["labels"] == "binary" and info["shared_images"] is False and info["downsampling"] == [1, 2, 4, 8]
    assert info["patient_subtypes"] == _subtype_of_patient()
    assert disjoint.pooled("train").images.float().std() > 10  # lesions on skin, not blank images


def test_patient_disjoint_setting_groups_by_patient(disjoint):
    subtype_of = _subtype_of_patient()
    owner: dict[int, int] = {}
    for client in range(4):
        seen = {split: set(disjoint.info["patients"][client][split]) for split in SPLITS}
        assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
        for patient in set().union(*seen.values()):
            assert patient not in owner, f"patient {patient} at clients {owner.get(patient)} and {client}"
            owner[patient] = client
        for split in SPLITS:
            labels = getattr(disjoint.clients[client], split).labels.tolist()
            assert labels == [int(subtype_of[p] >= 4) for p in disjoint.info["patients"][client][split]]
        # Every patient brings all its views to one client, each once.
        assert sorted(_images_by_view(disjoint, client)) == sorted((p, v) for p in owner if owner[p] == client for v in range(2))
    assert sorted(owner) == list(range(sum(PATIENTS_AT_05)))
    per_subtype = [sum(1 for p in owner if subtype_of[p] == s) for s in range(8)]
    assert per_subtype == PATIENTS_AT_05
    # Stratified by subtype: a subtype's patients are spread over the clients as evenly as possible.
    for subtype, count in enumerate(PATIENTS_AT_05):
        held = [sum(1 for p in owner if subtype_of[p] == subtype and owner[p] == c) for c in range(4)]
        assert max(held) - min(held) <= 1 and sum(held) == count


def test_test_split_is_thirty_percent_of_patients_per_class(disjoint):
    subtype_of = _subtype_of_patient()
    for client in range(4):
        parts = {split: set(disjoint.info["patients"][client][split]) for split in SPLITS}
        for label in (0, 1):
            test = sum(1 for p in parts["test"] if (subtype_of[p] >= 4) == label)
            total = sum(1 for s in SPLITS for p in parts[s] if (subtype_of[p] >= 4) == label)
            assert total >= 2  # 13 benign and 30 malignant patients over 4 clients
            assert test == max(1, min(int(0.3 * total + 0.5), total - 1))
        assert set(disjoint.clients[client].test.labels.tolist()) == {0, 1}


def test_validation_is_whole_patients_from_train(cache):
    none = synthetic_multires.load(cache_dir=cache, val_fraction=0.0, **SMALL)
    more = synthetic_multires.load(cache_dir=cache, val_fraction=0.5, **SMALL)
    for client in range(4):
        assert len(none.clients[client].val) == 0
        train0 = set(none.info["patients"][client]["train"])
        train, val = set(more.info["patients"][client]["train"]), set(more.info["patients"][client]["val"])
        assert train | val == train0 and not train & val and len(val) > 0
        assert none.info["patients"][client]["test"] == more.info["patients"][client]["test"]
        assert len(more.clients[client].val) == 2 * len(val)  # every view of a val patient


def test_shared_setting_every_client_holds_every_patient_under_one_split(shared):
    everyone = sorted((p, v) for p in range(sum(PATIENTS_AT_05)) for v in range(2))
    splits = []
    for client in range(4):
        assert sorted(_images_by_view(shared, client)) == everyone
        parts = {split: set(shared.info["patients"][client][split]) for split in SPLITS}
        assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"] and not parts["train"] & parts["val"]
        assert set(shared.clients[client].test.labels.tolist()) == {0, 1}
        splits.append(parts)
    # One split for all: no client's test patient is another client's training patient.
    assert all(s == splits[0] for s in splits)


def test_split_per_client_is_the_reproductions_leaky_split(cache):
    with pytest.warns(UserWarning, match="other clients' training patients"):
        data = synthetic_multires.load(cache_dir=cache, shared_images=True, split_per_client=True, **SMALL)
    tests = [set(data.info["patients"][k]["test"]) for k in range(4)]
    trains = [set(data.info["patients"][k]["train"]) for k in range(4)]
    assert len({frozenset(t) for t in tests}) == 4  # each client's own split seed
    assert any(tests[a] & trains[b] for a in range(4) for b in range(4) if a != b)  # the leak
    with pytest.raises(ConfigError, match="--shared_images true"):
        synthetic_multires.load(cache_dir=cache, split_per_client=True, **SMALL)


def test_x1_images_are_one_render_and_clients_degrade_it(disjoint, shared, cache):
    assert disjoint.info["cache_file"] == shared.info["cache_file"]
    assert len(list(cache.glob("synthetic_multires-*.pt"))) == 1
    x1 = _images_by_view(shared, 0)
    for key, image in _images_by_view(disjoint, 0).items():
        assert torch.equal(image, x1[key])  # the same patient/view is the same x1 image in both settings
    for data in (disjoint, shared):
        for client, factor in enumerate(synthetic_multires.DOWNSAMPLING):
            for key, image in _images_by_view(data, client).items():
                assert torch.equal(image, synthetic_multires.degrade(x1[key][None], factor)[0])
    # Views of one patient are different images.
    assert not torch.equal(x1[(0, 0)], x1[(0, 1)])


def test_coarser_clients_lose_high_frequencies(shared):
    def roughness(images: torch.Tensor) -> float:
        x = images.float()
        return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean().item() + ((x[..., 1:] - x[..., :-1]) ** 2).mean().item()

    by_client = [roughness(torch.stack([img for _, img in sorted(_images_by_view(shared, k).items())])) for k in range(4)]
    assert by_client[0] > by_client[1] > by_client[2] > by_client[3]


def test_label_signal_lives_in_fine_detail(tmp_path):
    """A linear probe on the same patients' images degraded by 1, 4, 8 and 32 (one pixel: the mean
    colour): accuracy falls with the factor and nothing is left in the mean colour."""
    from fedward.data.probe import probe_balanced_accuracy

    data = synthetic_multires.load(cache_dir=tmp_path, seed=0, image_size=32, patients_scale=2.0, images_per_patient=6,
                                   shared_images=True)
    client = data.clients[0]  # x1: every patient, undegraded
    score = {d: probe_balanced_accuracy(Split(synthetic_multires.degrade(client.train.images, d), client.train.labels),
                                        Split(synthetic_multires.degrade(client.test.images, d), client.test.labels))
             for d in (1, 4, 8, 32)}
    assert score[1] > 0.75 and score[1] > score[4] + 0.04 > score[8] + 0.08, score
    assert abs(score[32] - 0.5) < 0.07, score


def test_texture_scales_are_aligned_blocks_that_downsampling_removes():
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    texture = synthetic_multires.fine_texture(weights, 32, torch.Generator().manual_seed(0))
    assert abs(float(texture[0].mean())) < 0.12 and abs(float(texture[0].std()) - 1) < 0.1  # 1024 unit normals
    blocks = texture[1, 0].reshape(4, 8, 4, 8)  # the 8-pixel component: constant on aligned 8x8 blocks
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))
    # Area downsampling by 8 leaves the 8-pixel blocks and averages 1-pixel noise nearly away.
    pooled = F.avg_pool2d(texture, 8)
    assert float(pooled[1].std()) > 0.8 and float(pooled[0].std()) < 0.25


def test_degrade_matches_area_pool_then_bilinear_by_hand():
    image = (torch.arange(16).reshape(1, 1, 4, 4) * 10).to(torch.uint8)
    pooled = image.double().reshape(2, 2, 2, 2).mean(dim=(1, 3))  # 2x2 block means: [[25, 45], [105, 125]]
    # Bilinear 2 -> 4, align_corners=False: output i samples source (i + 0.5) / 2 - 0.5, clamped to [0, 1].
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    expected = (weights @ pooled @ weights.T).round().to(torch.uint8)
    assert torch.equal(synthetic_multires.degrade(image, 2)[0, 0], expected)
    assert expected[1].tolist() == [45, 50, 60, 65]
    assert torch.equal(synthetic_multires.degrade(image, 1), image)


def test_degrade_keeps_constants_and_removes_a_checkerboard():
    constant = torch.full((2, 3, 16, 16), 137, dtype=torch.uint8)
    for factor in (1, 2, 4, 8, 32):  # 32 > size: pooled to one pixel
        assert torch.equal(synthetic_multires.degrade(constant, factor), constant)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 200).to(torch.uint8).expand(1, 3, 16, 16)
    assert torch.equal(synthetic_multires.degrade(checker, 2), torch.full_like(checker, 100))
    with pytest.raises(ValueError):
        synthetic_multires.degrade(checker.float(), 2)


def test_subtype_labels_refine_binary_labels(cache, disjoint):
    subtype = synthetic_multires.load(cache_dir=cache, labels="subtype", **SMALL)
    assert subtype.num_classes == 8 and subtype.class_names == synthetic_multires.SUBTYPE_NAMES
    subtype_of = _subtype_of_patient()
    for a, b in zip(subtype.clients, disjoint.clients):
        for split in SPLITS:
            assert torch.equal(getattr(a, split).images, getattr(b, split).images)
            assert torch.equal(getattr(a, split).labels // 4, getattr(b, split).labels)
            assert getattr(a, split).labels.tolist() == [subtype_of[p] for p in subtype.info["patients"][a.client_id][split]]
    assert subtype.pooled("train").labels.unique().tolist() == list(range(8))


def test_same_seed_is_bit_identical_other_seed_differs(tmp_path, disjoint):
    again = synthetic_multires.load(cache_dir=tmp_path / "fresh", **SMALL)
    assert _same(disjoint, again) and again.info["patients"] == disjoint.info["patients"]
    other = synthetic_multires.load(cache_dir=tmp_path / "fresh", **{**SMALL, "seed": 4})
    first = {k: v for c in range(4) for k, v in _images_by_view(disjoint, c).items()}
    second = {k: v for c in range(4) for k, v in _images_by_view(other, c).items()}
    assert not torch.equal(first[(0, 0)], second[(0, 0)])
    assert len(list((tmp_path / "fresh").glob("synthetic_multires-*.pt"))) == 2


def test_cache_is_read_and_a_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    first = synthetic_multires.load(cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("synthetic_multires-*.pt")
    assert first.info["cache_file"] == str(path)

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although a valid cache exists")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic_multires, "_generate_images", no_generation)
        synthetic_multires.load(cache_dir=tmp_path, shared_images=True, labels="subtype", val_fraction=0.3, **SMALL)
        assert _same(first, synthetic_multires.load(cache_dir=tmp_path, **SMALL))
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="regenerating"):
        assert _same(first, synthetic_multires.load(cache_dir=tmp_path, **SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(first, synthetic_multires.load(cache_dir=tmp_path, **SMALL))


def test_difficulty_knob_changes_the_pixels(tmp_path, disjoint):
    easy = synthetic_multires.load(cache_dir=tmp_path, class_overlap=0.0, **SMALL)
    assert easy.info["difficulty"]["class_overlap"] == 0.0
    assert not torch.equal(easy.clients[0].train.images, disjoint.clients[0].train.images)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"image_size": 8}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"patients_scale": 0}, "patients_scale"),
        ({"images_per_patient": 0}, "images_per_patient"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"labels": "multiclass"}, "labels.*binary, subtype.*'multiclass'"),
        ({"shared_images": "yes"}, "shared_images"),
        ({"hospital_shift": 0.5}, "hospital_shift"),
        ({"class_overlap": 1.5}, "class_overlap"),
    ],
)
def test_bad_arguments_raise_config_errors(tmp_path, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        synthetic_multires.load(cache_dir=tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing generated

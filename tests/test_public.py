"""Public data for the public-data methods: the built-in public splits and --public_data folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedward.data import synthetic_multires
from fedward.data.public import UNLABELLED, read_public_folder
from fedward.errors import ConfigError, DataError


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def test_a_folder_with_class_folders_is_labelled_by_them(tmp_path):
    _png(tmp_path / "benign" / "a.png", 10)
    _png(tmp_path / "malignant" / "deep" / "b.png", 200)
    _png(tmp_path / "malignant" / "c.png", 100)
    split = read_public_folder(tmp_path, ["benign", "malignant"], 8)
    assert split.images.shape == (3, 3, 8, 8)
    by_value = {int(img[0, 0, 0]): int(label) for img, label in zip(split.images, split.labels)}
    assert by_value == {10: 0, 100: 1, 200: 1}


def test_a_folder_without_class_folders_is_unlabelled_and_a_stray_image_is_named(tmp_path):
    _png(tmp_path / "slides" / "a.png", 10)
    _png(tmp_path / "b.png", 20)
    split = read_public_folder(tmp_path, ["benign", "malignant"], 8)
    assert split.labels.tolist() == [UNLABELLED, UNLABELLED]
    _png(tmp_path / "benign" / "c.png", 30)
    with pytest.raises(DataError, match="b.png is not in a class folder"):
        read_public_folder(tmp_path, ["benign", "malignant"], 8)
    with pytest.raises(ConfigError, match="not a folder"):
        read_public_folder(tmp_path / "missing", ["benign"], 8)


def test_the_multires_public_split_holds_other_patients_at_full_resolution():
    public = synthetic_multires.public_split(seed=0, image_size=16, count=50)
    again = synthetic_multires.public_split(seed=0, image_size=16, count=50)
    assert torch.equal(public.images, again.images) and torch.equal(public.labels, again.labels)
    assert public.images.shape == (50, 3, 16, 16) and set(public.labels.tolist()) == {0, 1}
    clients = synthetic_multires.load(seed=0, image_size=16, patients_scale=0.5, images_per_patient=6)
    held = {tuple(img.flatten()[:64].tolist()) for c in clients.clients for s in (c.train, c.val, c.test)
            for img in s.images}
    assert not any(tuple(img.flatten()[:64].tolist()) in held for img in public.images)

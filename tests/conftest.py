"""Shared fixtures: a per-session cache folder for the synthetic data set and tiny run configs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["FEDWARD_CACHE"] = str(tmp_path_factory.mktemp("fedward-cache"))
    os.environ.setdefault("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    os.environ["FEDWARD_OFFLINE"] = "1"  # no test reaches the internet; the download tests serve files locally
    yield


TINY = dict(model="smallcnn", image_size=16, data_scale=0.03, comm_round=2, epochs=1, batch_size=16, lr=0.01,
            adam=False, progress=False, eval_batch_size=128,
            threads=1)  # one thread: tiny models gain nothing from more, and a busy machine hurts less


@pytest.fixture
def tiny_values():
    """Settings for a run that takes about a second."""
    return dict(TINY)



def pytest_collection_modifyitems(items):
    """Files with the most slow tests run first: under `-n 2 --dist loadfile` (make test) the other
    files then share the second worker's time beside them, instead of one long file running last."""
    from collections import Counter

    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: the order within a file stays


@pytest.fixture(scope="session")
def small_prior(tmp_path_factory):
    """A MoCo-v2 checkpoint of a ResNet-8 (untrained; the file format and keys of the real one), for
    Fed-MAS tests whose point is not the prior: the ``random`` ResNet-50 costs most of their time."""
    import torch

    from fedward.selfsup.moco import MocoSettings, train_moco

    path = tmp_path_factory.mktemp("small-prior") / "moco-resnet8.pth.tar"
    images = torch.randint(0, 256, (32, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    train_moco(images, MocoSettings(arch="resnet8", image_size=16, batch_size=16, bn_groups=2, epochs=0, feature_dim=8),
               path, progress=False, log=lambda m: None)
    return str(path)


@pytest.fixture
def task_identity():
    """Flower's task identity, which its ClientApp reads, as a SuperNode would set it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None

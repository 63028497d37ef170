"""Shared fixtures: a per-session cache folder for the synthetic data set and tiny run configs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["FEDWARD_CACHE"] = str(tmp_path_factory.mktemp("fedward-cache"))
    os.environ.setdefault("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    yield


TINY = dict(model="smallcnn", image_size=16, data_scale=0.03, comm_round=2, epochs=1, batch_size=16, lr=0.01,
            progress=False, eval_batch_size=128,
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

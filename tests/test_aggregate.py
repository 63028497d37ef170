import pytest
import torch

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.errors import FedwardError


def test_example_weights_by_hand():
    assert example_weights([64, 192]) == [0.25, 0.75]


def test_weighted_average_by_hand():
    # Prepare: two clients, one float weight and one integer BN counter
    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(20)}
    # Execute
    out = weighted_average([a, b], [0.25, 0.75])
    # Assert: 0.25*1 + 0.75*3 = 2.5 ; 0.25*2 + 0.75*6 = 5.0 ; 0.25*10 + 0.75*20 = 17.5 -> 17 (truncated,
    # as the reference's float sum loaded into the integer buffer)
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 17
    # Nine equal counters of 7 at weights 1/9 sum to 6.9999995 in float32: the reference keeps 6.
    ninth = weighted_average([{"n": torch.tensor(7)}] * 9, [1 / 9] * 9)["n"]
    assert int(ninth) == 6


def test_weighted_average_rejects_mismatched_replies():
    with pytest.raises(FedwardError, match="missing"):
        weighted_average([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [0.5, 0.5])
    with pytest.raises(FedwardError, match="no client"):
        weighted_average([], [])

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fedward.data.augment import BatchAugment, gaussian_blur, normalize, reference_pil_transform, rotate
from fedward.errors import ConfigError

IDENTITY_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
NO_BLUR_NO_TURN = {"sigma": (1e-3, 1e-3), "degrees": (0.0, 0.0), **IDENTITY_NORM}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_uint8(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)


# One 2x2 image, channel c holds [[a, b], [c, d]] + 10 * c.
TINY = as_uint8([[[[1, 2], [3, 4]], [[11, 12], [13, 14]], [[21, 22], [23, 24]]]])


def test_normalize_by_hand():
    image = as_uint8([[[[0, 255]], [[51, 102]], [[255, 0]]]])  # (1, 3, 1, 2)
    out = normalize(image, (0.5, 0.2, 0.0), (0.25, 0.2, 0.5))
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 1.0]], [[2.0, 0.0]]]])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_flips_on_a_hand_made_image():
    both = BatchAugment(flip_p=1.0, **NO_BLUR_NO_TURN)(TINY, gen()) * 255
    expected = as_uint8([[[[4, 3], [2, 1]], [[14, 13], [12, 11]], [[24, 23], [22, 21]]]]).float()
    torch.testing.assert_close(both, expected, atol=1e-3, rtol=0)

    horizontal = BatchAugment(flip_p=1.0, vflip=False, **NO_BLUR_NO_TURN)(TINY, gen()) * 255
    torch.testing.assert_close(horizontal[0, 0], torch.tensor([[2.0, 1.0], [4.0, 3.0]]), atol=1e-3, rtol=0)

    vertical = BatchAugment(flip_p=1.0, hflip=False, **NO_BLUR_NO_TURN)(TINY, gen()) * 255
    torch.testing.assert_close(vertical[0, 0], torch.tensor([[3.0, 4.0], [1.0, 2.0]]), atol=1e-3, rtol=0)

    unblurred = BatchAugment(flip_p=1.0, blur=False, degrees=(0.0, 0.0), **IDENTITY_NORM)(TINY, gen()) * 255
    torch.testing.assert_close(unblurred, expected, atol=1e-3, rtol=0)

    never = BatchAugment(flip_p=0.0, **NO_BLUR_NO_TURN)(TINY, gen()) * 255
    torch.testing.assert_close(never, TINY.float(), atol=1e-3, rtol=0)


def test_flips_are_drawn_per_image_with_probability_half():
    batch = TINY.expand(400, 3, 2, 2).contiguous()
    out = BatchAugment(vflip=False, **NO_BLUR_NO_TURN)(batch, gen(5)) * 255
    flipped = (out[:, 0, 0, 0] - 2.0).abs() < 1e-3  # top-left becomes 2 after a horizontal flip
    assert 150 < int(flipped.sum()) < 250


def hand_kernel(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def test_blur_of_an_impulse_is_the_hand_built_gaussian():
    image = torch.zeros(1, 3, 21, 21, dtype=torch.uint8)
    image[:, :, 10, 10] = 255
    augment = BatchAugment(hflip=False, vflip=False, rotation=False, sigma=(2.0, 2.0), **IDENTITY_NORM)
    out = augment(image, gen())
    expected = np.zeros((21, 21))
    expected[10 - 4 : 10 + 5, 10 - 2 : 10 + 3] = np.outer(hand_kernel(9, 2.0), hand_kernel(5, 2.0))  # 9 high, 5 wide
    for channel in range(3):
        assert out[0, channel].sum().item() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(out[0, channel].numpy(), expected, atol=1e-6)


def test_blur_reflects_at_the_border():
    # 1 row, impulse at column 1, kernel 5 wide: output[0] = w[-1] x[1] + w[+1] x[1] (x[-1] reflects to x[1]).
    row = torch.zeros(1, 1, 1, 6)
    row[..., 1] = 1.0
    out = gaussian_blur(row, torch.tensor([1.5]), (5, 1))
    weights = hand_kernel(5, 1.5)
    assert out[0, 0, 0, 0].item() == pytest.approx(2 * weights[1], abs=1e-6)
    assert out[0, 0, 0, 3].item() == pytest.approx(weights[0], abs=1e-6)


def test_blur_sigma_is_drawn_per_image_within_range():
    image = torch.zeros(64, 3, 21, 21, dtype=torch.uint8)
    image[:, :, 10, 10] = 255
    augment = BatchAugment(hflip=False, vflip=False, rotation=False, kernel_size=(21, 21), sigma=(1.0, 3.0), **IDENTITY_NORM)
    peak = augment(image, gen(2))[:, 0, 10, 10]
    # A normalised 2-d Gaussian peaks at about 1 / (2 pi sigma^2): between sigma = 3 and sigma = 1.
    assert peak.min() > 1 / (2 * math.pi * 9) * 0.95 and peak.max() < 1 / (2 * math.pi) * 1.05
    assert peak.std() > 0.01


def test_blur_scale_shrinks_kernel_and_sigma():
    augment = BatchAugment(blur_scale=0.5)
    assert augment.kernel_size == (3, 5) and augment.sigma == pytest.approx((0.05, 2.5))


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_rotation_by_90_degrees_matches_rot90_inside(backend):
    image = torch.randint(0, 256, (2, 3, 7, 7), dtype=torch.uint8, generator=gen(1))
    for degrees, turns in ((90.0, 1), (-90.0, -1)):
        out = BatchAugment(hflip=False, vflip=False, blur=False, degrees=(degrees, degrees), backend=backend,
                           **IDENTITY_NORM)(image, gen())
        expected = torch.rot90(image.float() / 255, turns, dims=(-2, -1))
        torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_small_rotation_fills_corners_with_black(backend):
    image = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    out = BatchAugment(hflip=False, vflip=False, blur=False, degrees=(10.0, 10.0), backend=backend,
                       **IDENTITY_NORM)(image, gen())
    assert out[0, :, 0, 0].max().item() < 0.2  # corner rotated out of the picture
    torch.testing.assert_close(out[0, :, 16, 16], torch.full((3,), 200 / 255))


def test_fused_batch_equals_the_ops_applied_one_by_one():
    # BatchAugment folds flips and 1/(255 std) into the blur matrices; check against the plain
    # sequence flip -> flip -> blur -> rotate -> normalise with the same drawn parameters.
    images = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8, generator=gen(4))
    augment = BatchAugment(flip_p=0.5, sigma=(0.5, 3.0))
    params = augment.draw(6, gen(8))
    step = images.float() / 255
    step = torch.where(params["hflip"][:, None, None, None], step.flip(-1), step)
    step = torch.where(params["vflip"][:, None, None, None], step.flip(-2), step)
    step = rotate(gaussian_blur(step, params["sigma"], (5, 9)), params["angle"])
    mean, std = torch.tensor(augment.mean)[:, None, None], torch.tensor(augment.std)[:, None, None]
    torch.testing.assert_close(augment(images, gen(8)), (step - mean) / std, atol=1e-5, rtol=0)
    assert params["hflip"].any() and not params["hflip"].all()


@pytest.mark.parametrize("shape", [(6, 3, 12, 10), (4, 3, 33, 33), (2, 3, 64, 48)])
def test_the_opencv_backend_gives_the_batched_ops_result(shape):
    """Same parameters, same ops: OpenCV's blur (reflect-101 border) and bilinear warp about the
    pixel-centre midpoint equal the batched matmul blur and grid_sample up to float rounding."""
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(5))
    batched = BatchAugment(sigma=(0.5, 3.0), backend="torch")(images, gen(3))
    per_image = BatchAugment(sigma=(0.5, 3.0), backend="opencv")(images, gen(3))
    assert per_image.shape == batched.shape and per_image.dtype == torch.float32
    torch.testing.assert_close(per_image, batched, atol=5e-4, rtol=0)
    with pytest.raises(ConfigError, match="backend must be one of torch, opencv"):
        BatchAugment(backend="kornia")


def test_same_seed_same_output_other_seed_differs():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(9))
    augment = BatchAugment()
    a, b, c = augment(images, gen(1)), augment(images, gen(1)), augment(images, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="kernel_size"):
        BatchAugment(kernel_size=(4, 9))
    with pytest.raises(ConfigError, match="sigma"):
        BatchAugment(sigma=(0.0, 1.0))
    with pytest.raises(ConfigError, match="degrees"):
        BatchAugment(degrees=(10.0, -10.0))
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment()(torch.zeros(1, 3, 4, 4), gen())


def test_reference_pil_transform_on_a_flat_image():
    colour = (200, 100, 50)
    image = Image.new("RGB", (40, 30), colour)
    out = reference_pil_transform(image, 24, random.Random(0))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])
    torch.testing.assert_close(out[:, 12, 12], expected, atol=1e-5, rtol=0)


def test_reference_pil_transform_is_seeded():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    a = reference_pil_transform(image, 20, random.Random(3))
    b = reference_pil_transform(image, 20, random.Random(3))
    c = reference_pil_transform(image, 20, random.Random(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_auto_takes_opencv_on_a_cpu_from_96_px_and_torch_elsewhere():
    from types import SimpleNamespace

    from fedward.engine.simulation import OPENCV_FROM_PX, Simulation

    def backend(choice: str, device: str, size: int) -> str:
        holder = SimpleNamespace(cfg=SimpleNamespace(augment_backend=choice), device=torch.device(device),
                                 spec=SimpleNamespace(image_size=size))
        return Simulation.augment_backend.fget(holder)

    assert OPENCV_FROM_PX == 96
    assert [backend("auto", "cpu", s) for s in (32, 64, 95, 96, 224)] == ["torch"] * 3 + ["opencv"] * 2
    assert backend("auto", "meta", 224) == "torch"  # any accelerator: the batch stays on the device
    assert backend("opencv", "cpu", 32) == "opencv" and backend("torch", "cpu", 224) == "torch"

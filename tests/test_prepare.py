from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedward.data.prepare import prepare_image, prepare_isic2019, resize_short_side, shades_of_gray
from fedward.errors import DataError


def _power_means(image, p=6):
    return np.mean(image.astype(np.float64) ** p, axis=(0, 1)) ** (1 / p)


def _jpeg(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def test_gray_image_is_unchanged():
    image = np.array([[[10, 10, 10], [50, 50, 50]], [[128, 128, 128], [255, 255, 255]]], dtype=np.uint8)
    out = shades_of_gray(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


def test_colour_cast_is_removed_by_hand():
    # G = B = [[10, 20], [30, 40]], R = 1.5 * G. Illuminant e = e_G * (1.5, 1, 1), ||e|| = e_G * sqrt(4.25),
    # gain_c = ||e|| / (sqrt(3) * e_c): R gets sqrt(4.25/3) / 1.5 = 0.79349, G and B get sqrt(4.25/3) = 1.19024.
    # R: 15, 30, 45, 60 -> 11.90, 23.80, 35.71, 47.61; G/B: 10, 20, 30, 40 -> the same -> rounded 12, 24, 36, 48.
    base = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    image = np.stack([(base * 1.5).astype(np.uint8), base, base], axis=-1)
    out = shades_of_gray(image, power=6)
    expected = np.array([[12, 24], [36, 48]], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    means = _power_means(out)
    assert np.allclose(means, means[0])


def test_colour_cast_power_means_equal_on_random_image():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 160, (6, 5), dtype=np.uint8)
    image = np.stack([(base * 1.5).astype(np.uint8), base, (base * 0.8).astype(np.uint8)], axis=-1)
    means = _power_means(shades_of_gray(image))
    assert np.allclose(means, means.mean(), rtol=0.02)


def test_shades_of_gray_edge_cases():
    black = np.zeros((2, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(shades_of_gray(black), black)
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 100
    out = shades_of_gray(red)  # no NaN from the empty channels
    assert out[..., 1:].max() == 0 and out[..., 0].min() > 0
    with pytest.raises(DataError, match="uint8"):
        shades_of_gray(np.zeros((2, 2, 3), dtype=np.float32))


@pytest.mark.parametrize("size, expected", [((40, 30), (21, 16)), ((30, 40), (16, 21)), ((16, 16), (16, 16))])
def test_prepare_image_short_side(tmp_path, size, expected):
    src = _jpeg(tmp_path / "in" / "a.jpg", size)
    dst = tmp_path / "a.jpg"
    prepare_image(src, dst, size=16)
    with Image.open(dst) as out:
        assert out.format == "JPEG" and out.mode == "RGB" and out.size == expected
    assert not (tmp_path / "a.tmp.jpg").exists()


def test_resize_short_side_converts_to_rgb():
    out = resize_short_side(Image.new("L", (30, 45), 7), 10)
    assert out.mode == "RGB" and out.size == (10, 15)


def test_prepare_isic2019_writes_and_resumes(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "prep"
    names = [f"ISIC_{i:07d}.jpg" for i in range(5)]
    for i, name in enumerate(names):
        _jpeg(src / name, (24 + i, 20), seed=i)
    (src / "notes.txt").write_text("not an image")
    counts = prepare_isic2019(src, dst, size=16, workers=2, progress=False)
    assert counts == {"done": 5, "skipped": 0, "bad": 0}
    assert sorted(p.name for p in dst.iterdir()) == names
    for name in names:
        with Image.open(dst / name) as out:
            assert min(out.size) == 16
    stamps = {name: (dst / name).stat().st_mtime_ns for name in names}

    counts = prepare_isic2019(src, dst, size=16, workers=2, progress=False)
    assert counts == {"done": 0, "skipped": 5, "bad": 0}
    assert {name: (dst / name).stat().st_mtime_ns for name in names} == stamps

    # an empty output (e.g. left by a crash) is redone, the others are skipped
    (dst / names[2]).write_bytes(b"")
    counts = prepare_isic2019(src, dst, size=16, workers=1, progress=False)
    assert counts == {"done": 1, "skipped": 4, "bad": 0}
    assert (dst / names[2]).stat().st_size > 0


def test_prepare_isic2019_reports_truncated_after_good_ones(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "prep"
    good = [_jpeg(src / f"ISIC_{i:07d}.jpg", (64, 48), seed=i).name for i in range(3)]
    whole = _jpeg(tmp_path / "whole.jpg", (64, 48), seed=9).read_bytes()
    (src / "ISIC_9999999.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"1 image .*ISIC_9999999\.jpg") as caught:
        prepare_isic2019(src, dst, size=16, workers=2, progress=False)
    assert "3 now" in str(caught.value)
    assert sorted(p.name for p in dst.iterdir()) == good  # good ones written, no partial or temporary file


def test_prepare_isic2019_missing_or_empty_src(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_isic2019(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jpg"):
        prepare_isic2019(tmp_path / "empty", tmp_path / "out", progress=False)

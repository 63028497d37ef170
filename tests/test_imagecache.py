from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fedward.data import imagecache
from fedward.data.imagecache import decode_images
from fedward.errors import DataError


def _write(path, size=(12, 10), colour=(200, 30, 60), fmt=None, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def _images(tmp_path, count=6):
    rng = np.random.default_rng(0)
    sizes = [(8, 8), (40, 30), (30, 40), (12, 9), (16, 16), (9, 20)]
    return [_write(tmp_path / "img" / f"ISIC_{i:07d}.jpg", sizes[i % len(sizes)], tuple(int(c) for c in rng.integers(0, 256, 3)))
            for i in range(count)]  # fmt: skip


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded an image on a cache hit")


def test_resize_keeps_aspect_and_centre_crops():
    # 40 x 20: left quarter red, middle half green, right quarter blue. Short side 20 -> 8 gives
    # 16 x 8, centre crop 8 x 8 keeps only the green middle.
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))
    image.paste((0, 0, 255), (30, 0, 40, 20))
    out = imagecache.resize_center_crop(image, 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    assert (out[1, :, 1:7] > 200).all() and (out[0, :, 1:7] < 60).all() and (out[2, :, 1:7] < 60).all()


def test_decode_in_memory_shapes_and_modes(tmp_path):
    paths = _images(tmp_path, 4)
    paths.append(_write(tmp_path / "img" / "grey.png", (10, 14), 128, mode="L"))
    paths.append(_write(tmp_path / "img" / "alpha.png", (14, 10), (10, 20, 250, 100), mode="RGBA"))
    result = decode_images(paths, 8, cache_dir=None, progress=False)
    assert result.images.shape == (6, 3, 8, 8) and result.images.dtype == torch.uint8
    assert result.kept == list(range(6)) and result.bad == [] and result.cache_file is None
    assert (result.images[4] == 128).all()
    assert result.images[5, 2].float().mean() > 240 and result.images[5, 0].float().mean() < 20


def test_cache_round_trip_does_no_decoding(tmp_path, monkeypatch):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    first = decode_images(paths, 8, cache_dir=cache, progress=False)
    assert first.cache_file is not None and first.cache_file.suffix == ".u8" and first.cache_file.parent == cache
    key = first.cache_file.stem
    meta = json.loads((cache / f"{key}.json").read_text())
    assert meta["count"] == 6 and meta["shape"] == [6, 3, 8, 8] and meta["bad"] == []
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.json", f"{key}.u8"]  # no temporary files left
    assert first.cache_file.stat().st_size == 6 * 3 * 8 * 8

    in_memory = decode_images(paths, 8, cache_dir=None, progress=False)
    assert torch.equal(first.images, in_memory.images)

    monkeypatch.setattr(imagecache, "decode_one", _no_decoding)
    second = decode_images(paths, 8, cache_dir=cache, progress=False)
    assert second.cache_file == first.cache_file and torch.equal(second.images, first.images)
    # Another size is another key, so it decodes (the patched decoder's failures show as bad files).
    with pytest.raises(DataError, match="decoded an image on a cache hit"):
        decode_images(paths, 16, cache_dir=cache, progress=False)


def test_cache_rebuilt_when_an_image_changes(tmp_path):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    first = decode_images(paths, 8, cache_dir=cache, progress=False)
    stat = paths[2].stat()
    _write(paths[2], (12, 10), (1, 2, 3))
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = decode_images(paths, 8, cache_dir=cache, progress=False)
    assert second.cache_file != first.cache_file
    assert torch.equal(second.images[[0, 1, 3, 4, 5]], first.images[[0, 1, 3, 4, 5]])
    assert second.images[2].float().mean() < 10 and not torch.equal(second.images[2], first.images[2])


def test_cache_key_covers_settings_and_files(tmp_path):
    paths = _images(tmp_path, 3)
    key = imagecache.cache_key(paths, 8, "resize")
    assert key == imagecache.cache_key([p.parent / ".." / "img" / p.name for p in paths], 8, "resize")  # resolved
    assert key != imagecache.cache_key(paths, 9, "resize")
    assert key != imagecache.cache_key(paths[::-1], 8, "resize")
    paths[0].write_bytes(paths[0].read_bytes() + b"\0")
    assert key != imagecache.cache_key(paths, 8, "resize")


def _bad_tree(tmp_path):
    paths = _images(tmp_path, 4)
    truncated = tmp_path / "img" / "ISIC_0000001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-200])
    garbage = tmp_path / "img" / "not_an_image.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    missing = tmp_path / "img" / "ISIC_9999999.jpg"
    return [*paths, garbage, missing]


@pytest.mark.parametrize("cache", [False, True])
def test_bad_images_raise_naming_every_file(tmp_path, cache):
    paths = _bad_tree(tmp_path)
    with pytest.raises(DataError) as error:
        decode_images(paths, 8, cache_dir=tmp_path / "cache" if cache else None, progress=False)
    message = str(error.value)
    assert message.startswith(f"3 images could not be read in {tmp_path / 'img'}: ")
    for name in ("ISIC_0000001.jpg (OSError", "not_an_image.png (UnidentifiedImageError", "ISIC_9999999.jpg (missing file)",
                 "pass --skip_bad_images to skip them"):  # fmt: skip
        assert name in message
    if cache:  # a failed build leaves nothing behind
        assert list((tmp_path / "cache").iterdir()) == []


def test_skip_bad_images_leaves_them_out_and_reports_them(tmp_path, monkeypatch):
    paths = _bad_tree(tmp_path)
    cache = tmp_path / "cache"
    result = decode_images(paths, 8, cache_dir=cache, skip_bad=True, progress=False)
    assert result.kept == [0, 2, 3] and result.images.shape == (3, 3, 8, 8)
    assert [p.name for p, _ in result.bad] == ["ISIC_0000001.jpg", "not_an_image.png", "ISIC_9999999.jpg"]
    assert "truncated" in result.bad[0][1].lower() and result.bad[2][1] == "missing file"
    assert torch.equal(result.images, decode_images([paths[i] for i in (0, 2, 3)], 8, cache_dir=None, progress=False).images)
    assert json.loads(result.cache_file.with_suffix(".json").read_text())["kept"] == [0, 2, 3]
    # With skip_bad the cache is used as is (no decoding) ...
    monkeypatch.setattr(imagecache, "decode_one", _no_decoding)
    again = decode_images(paths, 8, cache_dir=cache, skip_bad=True, progress=False)
    assert again.kept == result.kept and again.bad == result.bad and torch.equal(again.images, result.images)
    # ... without it the remembered failures are tried again (and fail again).
    with pytest.raises(DataError, match="decoded an image on a cache hit"):
        decode_images(paths, 8, cache_dir=cache, progress=False)
    monkeypatch.undo()
    with pytest.raises(DataError, match="3 images could not be read"):
        decode_images(paths, 8, cache_dir=cache, progress=False)


def test_error_lists_twenty_files_and_counts_the_rest(tmp_path):
    paths = [tmp_path / f"gone_{i:02d}.jpg" for i in range(25)]
    with pytest.raises(DataError) as error:
        decode_images(paths, 8, cache_dir=None, progress=False)
    message = str(error.value)
    assert message.startswith(f"25 images could not be read in {tmp_path}: gone_00.jpg (missing file)")
    assert "gone_19.jpg" in message and "gone_20.jpg" not in message and "(+5 more)" in message
    result = decode_images(paths, 8, cache_dir=tmp_path / "cache", skip_bad=True, progress=False)
    assert result.images.shape == (0, 3, 8, 8) and result.kept == [] and len(result.bad) == 25


def test_unreadable_cache_is_rebuilt(tmp_path):
    paths = _images(tmp_path, 3)
    cache = tmp_path / "cache"
    first = decode_images(paths, 8, cache_dir=cache, progress=False)
    expected = first.images.clone()
    del first
    (cache / f"{imagecache.cache_key(paths, 8, 'resize')}.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        second = decode_images(paths, 8, cache_dir=cache, progress=False)
    assert torch.equal(second.images, expected)

"""DICOM images (read with pydicom) in the image cache and the per-hospital folders data set.

Small DICOM files are written with pydicom in tmp_path; the expected pixels are computed here from
the documented rule: modality LUT, then window, MONOCHROME1 inverted, then
``rint((v - min) / (max - min) * 255)`` over the image.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")  # a guard only: pydicom is in the "test" extra

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from fedward.data import folders, imagecache  # noqa: E402
from fedward.data.imagecache import decode_images, decode_one, read_dicom  # noqa: E402
from fedward.errors import DataError  # noqa: E402


def write_dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=None, signed=False, syntax=ExplicitVRLittleEndian,
                pixel_data=None, bare=False, **elements):  # fmt: skip
    """Write ``pixels`` (rows, cols) grayscale, (rows, cols, 3) uint8 RGB or (frames, rows, cols)
    with ``NumberOfFrames=``) as a Secondary Capture DICOM file; ``bare``: only the data set, in
    implicit VR little endian, without preamble and file meta information (as old exports)."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    rgb = photometric == "RGB"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = (pixels.shape[0], pixels.shape[1]) if rgb else pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for name, value in elements.items():
        setattr(ds, name, value)
    if pixel_data is None:
        ds.PixelData = pixels.tobytes()
    else:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def scale(values):
    """The documented min/max rule, by hand."""
    values = np.asarray(values, dtype=np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def grey(path, size=2):
    """decode_one at the image's own size (the resize is then the identity): (3, size, size)."""
    return decode_one(path, size, "resize")


def test_grayscale_min_max_scaling_and_three_channels(tmp_path):
    values = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", values, bits_stored=12)
    expected = scale(values)
    assert expected.tolist() == [[0, 64], [128, 255]]  # 63.75 -> 64, 127.5 -> 128 (round half to even)
    image = read_dicom(path)
    assert image.mode == "L" and np.asarray(image).tolist() == expected.tolist()
    out = grey(path)
    assert out.shape == (3, 2, 2) and out.dtype == np.uint8
    for channel in out:  # grayscale -> 3 identical channels
        assert channel.tolist() == expected.tolist()


def test_bare_data_set_without_file_meta(tmp_path):
    values = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    path = write_dicom(tmp_path / "bare.dcm", values, bits_stored=12, bare=True)
    assert path.read_bytes()[128:132] != b"DICM"  # no preamble, no file meta
    assert grey(path)[0].tolist() == scale(values).tolist()


def test_monochrome1_is_inverted(tmp_path):
    values = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m1.dcm", values, photometric="MONOCHROME1", bits_stored=12)
    expected = scale(-values.astype(np.float64))  # the minimum is white
    assert expected.tolist() == [[255, 191], [128, 0]]
    assert grey(path)[0].tolist() == expected.tolist()


def test_rescale_and_window_clip_values_outside_it(tmp_path):
    stored = np.array([[0, 75], [100, 150]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=50, WindowWidth=101)  # fmt: skip
    # modality LUT: 2 v - 100 -> [[-100, 50], [100, 200]]. Window (PS3.3 C.11.2.1.2.1, LINEAR):
    # c' = 49.5, w' = 100: x <= -0.5 -> y_min, x > 99.5 -> y_max, else ((x - c') / w' + 0.5).
    # Output range: the rescaled range of 12 unsigned bits, [-100, 4095 * 2 - 100].
    y_min, y_max = -100.0, 4095 * 2 - 100.0
    modality = stored * 2.0 - 100

    def window(x):
        if x <= -0.5:
            return y_min
        if x > 99.5:
            return y_max
        return ((x - 49.5) / 100 + 0.5) * (y_max - y_min) + y_min

    expected = scale(np.vectorize(window)(modality))
    assert expected.tolist() == [[0, 129], [255, 255]]  # 100 and 200 both clipped to white
    assert grey(path)[0].tolist() == expected.tolist()
    # without the window, 100 and 200 differ
    plain = write_dicom(tmp_path / "p.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100)
    assert grey(plain)[0].tolist() == scale(modality).tolist() == [[0, 128], [170, 255]]


def test_signed_pixels(tmp_path):
    values = np.array([[-1000, 0], [1000, 3000]], dtype=np.int16)
    path = write_dicom(tmp_path / "ct.dcm", values, signed=True, RescaleSlope=1, RescaleIntercept=-1024)
    assert grey(path)[0].tolist() == scale(values).tolist() == [[0, 64], [128, 255]]


def test_constant_image_is_zeros(tmp_path):
    path = write_dicom(tmp_path / "c.dcm", np.full((2, 2), 7, dtype=np.uint16), bits_stored=12)
    assert (grey(path) == 0).all()
    path = write_dicom(tmp_path / "c1.dcm", np.full((2, 2), 7, dtype=np.uint16), photometric="MONOCHROME1", bits_stored=12)
    assert (grey(path) == 0).all()


def test_rgb_channels_preserved(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dicom", rgb, photometric="RGB")
    image = read_dicom(path)
    assert image.mode == "RGB" and np.asarray(image).tolist() == rgb.tolist()
    assert grey(path).tolist() == rgb.transpose(2, 0, 1).tolist()


def test_first_frame_of_a_multi_frame_file(tmp_path):
    frames = np.array([[[0, 10], [20, 30]], [[30, 0], [0, 0]]], dtype=np.uint16)
    path = write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, NumberOfFrames=2)
    assert grey(path)[0].tolist() == scale(frames[0]).tolist()


def test_same_preprocessing_as_other_images(tmp_path):
    # A 6 x 4 grayscale DICOM decodes exactly like the same pixels saved as PNG, in both modes.
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (4, 6)).astype(np.uint8)
    values[0, 0], values[0, 1] = 0, 255  # min/max scaling is then the identity
    dcm = write_dicom(tmp_path / "x.DCM", values)
    png = tmp_path / "x.png"
    Image.fromarray(values, "L").save(png)
    for preprocess in ("resize", "square"):
        assert decode_one(dcm, 3, preprocess).tolist() == decode_one(png, 3, preprocess).tolist()


def make_tree(root):
    """alpha: 2 PNG + 1 DICOM benign, 1 DICOM malignant train; 1 + 1 test. beta: DICOM only."""

    def png(path, level):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (level,) * 3).save(path)

    def dcm(path, level):  # 8 x 12, left half 0, right half ``level``
        values = np.zeros((8, 12), dtype=np.uint16)
        values[:, 6:] = level
        write_dicom(path, values, bits_stored=12)

    png(root / "alpha" / "train" / "benign" / "a.png", 50)
    png(root / "alpha" / "train" / "benign" / "b.png", 60)
    dcm(root / "alpha" / "train" / "benign" / "c.dcm", 100)
    dcm(root / "alpha" / "train" / "malignant" / "d.DCM", 200)
    dcm(root / "alpha" / "train" / "malignant" / "e.dicom", 300)
    png(root / "alpha" / "test" / "benign" / "f.png", 70)
    dcm(root / "alpha" / "test" / "malignant" / "g.dcm", 400)
    dcm(root / "beta" / "train" / "benign" / "h.dcm", 100)
    dcm(root / "beta" / "train" / "malignant" / "i.dcm", 100)
    dcm(root / "beta" / "val" / "malignant" / "j.dcm", 100)
    dcm(root / "beta" / "test" / "benign" / "k.dcm", 100)
    return root


def load(root, tmp_path, **kwargs):
    return folders.load(data_dir=root, image_size=8, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def test_folders_mixing_png_and_dicom(tmp_path):
    root = make_tree(tmp_path / "data")
    data = load(root, tmp_path, val_fraction=0.0)
    assert [c.name for c in data.clients] == ["alpha", "beta"] and data.class_names == ["benign", "malignant"]
    assert data.info["counts"] == {"train": [[3, 2], [1, 1]], "val": [[0, 0], [0, 1]], "test": [[1, 1], [1, 0]]}
    assert data.info["num_images"] == 11 and data.info["skipped_bad_images"] == 0
    images = data.clients[1].train.images
    assert images.shape == (2, 3, 8, 8) and (images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()
    assert images.max() == 255 and images.min() == 0  # scaled DICOM, not raw 12-bit values
    again = load(root, tmp_path, val_fraction=0.0)  # from the cache
    assert again.info["cache_file"] == data.info["cache_file"]
    assert (again.clients[0].train.images == data.clients[0].train.images).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own warnings while parsing garbage
def test_corrupt_dicom_stops_or_is_skipped(tmp_path):
    root = make_tree(tmp_path / "data")
    benign = root / "alpha" / "train" / "benign"
    (benign / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (benign / "empty.dcm").write_bytes(b"")
    whole = (benign / "c.dcm").read_bytes()
    (benign / "truncated.dcm").write_bytes(whole[: len(whole) - 100])  # pixel data cut short
    with pytest.raises(DataError, match=r"3 images could not be read.*broken\.dcm.*empty\.dcm \(ValueError: not a DICOM file.*"
                                        r"truncated\.dcm.*--skip_bad_images"):  # fmt: skip
        load(root, tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipped 3 unreadable images"):
        data = load(root, tmp_path, skip_bad_images=True)
    assert data.info["skipped_bad_images"] == 3 and "broken.dcm" in data.info["bad_images"][0]
    assert data.info["counts"]["train"][0] == [3, 2]


def test_compressed_without_a_decoder_names_the_transfer_syntax(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(tmp_path / "img" / "jls.dcm", np.zeros((2, 2), dtype=np.uint16), bits_stored=12, syntax=JPEGLSLossless,
                       pixel_data=encapsulate([b"\xff\xd8\xff\xf7not really jpeg-ls\xff\xd9"]))  # fmt: skip
    with pytest.raises(DataError, match=r"jls\.dcm.*JPEG-LS Lossless.*1\.2\.840\.10008\.1\.2\.4\.80"):
        decode_images([path], 2, cache_dir=None, progress=False)
    result = decode_images([path], 2, cache_dir=None, progress=False, skip_bad=True)
    assert result.kept == [] and "JPEG-LS" in result.bad[0][1]


def test_missing_pydicom_names_the_file_and_the_install_command(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "img" / "scan.dcm", np.zeros((2, 2), dtype=np.uint16), bits_stored=12)
    png = tmp_path / "img" / "ok.png"
    Image.new("RGB", (2, 2)).save(png)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    monkeypatch.setitem(sys.modules, "pydicom.pixels", None)
    install = r'pip install "fedward\[dicom\]"'
    with pytest.raises(DataError, match=rf"scan\.dcm.*{install}"):
        decode_one(path, 2, "resize")
    for skip_bad in (False, True):  # a missing package is not a bad image: never skipped
        with pytest.raises(DataError, match=rf"1 DICOM file.*scan\.dcm.*{install}"):
            decode_images([png, path], 2, cache_dir=tmp_path / "cache", progress=False, skip_bad=skip_bad)
    # files that are not DICOM still decode without pydicom
    assert decode_images([png], 2, cache_dir=None, progress=False).images.shape == (1, 3, 2, 2)


def test_cache_key_follows_the_dicom_decoders(tmp_path, monkeypatch):
    dcm = write_dicom(tmp_path / "img" / "a.dcm", np.zeros((2, 2), dtype=np.uint16), bits_stored=12)
    png = tmp_path / "img" / "b.png"
    Image.new("RGB", (2, 2)).save(png)
    with_dicom, without = imagecache.cache_key([dcm, png], 8, "resize"), imagecache.cache_key([png], 8, "resize")
    monkeypatch.setattr(imagecache, "_dicom_signature", lambda: ["dicom", "0.0", []])
    assert imagecache.cache_key([dcm, png], 8, "resize") != with_dicom  # e.g. a JPEG 2000 decoder installed
    assert imagecache.cache_key([png], 8, "resize") == without  # caches without DICOM are unaffected

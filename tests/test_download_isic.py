"""``fedward data download isic2019`` against a real HTTP server on 127.0.0.1 serving a tiny ISIC 2019:
a zip of small JPEGs under ``ISIC_2019_Training_Input/``, the three CSVs and FLamby's split file with
their real columns, from the fake records of the Fed-ISIC2019 loader tests (54 images, six centres)."""

from __future__ import annotations

import csv
import functools
import io
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from test_fed_isic2019 import FLAMBY_HEADER, PALETTE, SIZES, TEST, TRAIN, records

from fedward.cli import main
from fedward.data import download_isic, fed_isic2019
from fedward.data.download_isic import download_isic2019
from fedward.download import DownloadError
from fedward.errors import DataError

RECORDS = records()
RAW = "ISIC_2019_Training_Input"
EXTRA = "ISIC_9999999"  # in the zip and the CSVs, not in the split (like the 2,084 images without a lesion_id)
ONE_HOT = FLAMBY_HEADER[1:10]  # MEL..UNK


def _jpeg(index: int, label: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", SIZES[index % len(SIZES)], tuple(int(c) for c in PALETTE[label])).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _csv(header: list[str], rows: list[list[object]], drop: str | None = None) -> bytes:
    keep = [k for k, column in enumerate(header) if column != drop]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in [header, *rows]:
        writer.writerow([row[k] for k in keep])
    return out.getvalue().encode()


def _one_hot(label: int) -> list[str]:
    return ["1.0" if k == label else "0.0" for k in range(len(ONE_HOT))]


@dataclass
class Site:
    """The served folder (``/2019/<ISIC file>``, ``/flamby/train_test_split``) and the paths requested."""

    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def publish(self, *, drop_image: str | None = None, member: str | None = None, zip_bytes: bytes | None = None,
                drop_column: tuple[str, str] | None = None, relabel: str | None = None,
                no_lesion: str | None = None) -> None:
        """Write the four files, with at most a few faults (the names say which)."""
        isic = self.root / "2019"
        isic.mkdir(parents=True, exist_ok=True)
        (self.root / "flamby").mkdir(exist_ok=True)
        table = [(name, label) for name, _, _, label in RECORDS] + [(EXTRA, 1)]
        if zip_bytes is None:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                archive.writestr(f"{RAW}/", b"")
                archive.writestr(f"{RAW}/LICENSE.txt", b"CC BY-NC 4.0\n")
                for index, (name, label) in enumerate(table):
                    if name != drop_image:
                        archive.writestr(f"{RAW}/{name}.jpg", _jpeg(index, label))
                if member:
                    archive.writestr(member, b"payload")
            zip_bytes = buffer.getvalue()
        (isic / "ISIC_2019_Training_Input.zip").write_bytes(zip_bytes)
        dropped = dict([drop_column]) if drop_column else {}
        metadata = [[name, 50, "torso", "" if name in (EXTRA, no_lesion) else f"BCN_{k:07d}", "male"]
                    for k, (name, _) in enumerate(table)]
        (isic / "ISIC_2019_Training_Metadata.csv").write_bytes(_csv(
            ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], metadata, dropped.get("metadata")))
        truth = [[name, *_one_hot((label + 1) % 8 if name == relabel else label)] for name, label in table]
        (isic / "ISIC_2019_Training_GroundTruth.csv").write_bytes(_csv(
            ["image", *ONE_HOT], truth, dropped.get("ground truth")))
        split = [[name, *_one_hot(label), label, client, fold, f"{fold}_{client}"]
                 for name, client, fold, label in RECORDS]
        (self.root / "flamby" / "train_test_split").write_bytes(_csv(FLAMBY_HEADER, split, dropped.get("split")))

    def fetch(self, folder: Path, **kwargs) -> Path:
        options = dict(accept_licence=True, progress=False, base_url=f"{self.url}/2019",
                       split_url=f"{self.url}/flamby/train_test_split", expected_images=len(RECORDS), workers=1)
        return download_isic2019(folder, **{**options, **kwargs})


@pytest.fixture
def site(tmp_path):
    """A tiny ISIC 2019 served over HTTP by the standard library's file server."""
    state = Site(tmp_path / "served")
    state.publish()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(state.root))) as httpd:
        state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        worker = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        worker.start()
        try:
            yield state
        finally:
            httpd.shutdown()
            worker.join(timeout=5)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_download_gives_the_flamby_layout_and_a_rerun_does_nothing(site, tmp_path, capsys):
    data_dir = tmp_path / "isic"
    assert site.fetch(data_dir, prepare=True) == data_dir
    assert sorted(site.requests) == ["/2019/ISIC_2019_Training_GroundTruth.csv", "/2019/ISIC_2019_Training_Input.zip",
                                     "/2019/ISIC_2019_Training_Metadata.csv", "/flamby/train_test_split"]
    for name in ("ISIC_2019_Training_Input.zip", "ISIC_2019_Training_Metadata.csv",
                 "ISIC_2019_Training_GroundTruth.csv"):
        assert (data_dir / name).read_bytes() == (site.root / "2019" / name).read_bytes()
    assert len(list((data_dir / RAW).glob("*.jpg"))) == len(RECORDS) + 1
    assert len(list((data_dir / "ISIC_2019_Training_Input_preprocessed").glob("*.jpg"))) == len(RECORDS) + 1
    assert not list(data_dir.rglob("*.part"))
    out = capsys.readouterr().out
    assert f"{len(RECORDS)} images" in out and "train 39, test 15" in out and "0 BCN 17" in out
    assert "zip kept" in out and f"ready: fedward run --dataset fed_isic2019 --data_dir {data_dir}" in out

    data = fed_isic2019.load(data_dir=data_dir, image_size=16, cache_dir=tmp_path / "cache", progress=False)
    assert data.info["layout"] == "flamby" and data.info["num_images"] == len(RECORDS)
    assert data.info["counts"]["test"] == TEST
    train = [[a + b for a, b in zip(r, v)] for r, v in zip(data.info["counts"]["train"], data.info["counts"]["val"])]
    assert train == TRAIN

    before, requests = _snapshot(data_dir), len(site.requests)
    site.fetch(data_dir, prepare=True)
    assert len(site.requests) == requests  # nothing downloaded again
    assert _snapshot(data_dir) == before  # nothing extracted or preprocessed again
    captured = capsys.readouterr()
    assert "0 files extracted" in captured.err and f"prepared 0 images, {len(RECORDS) + 1} already done" in captured.out


def test_interrupted_extraction_resumes(site, tmp_path, capsys):
    data_dir = tmp_path / "isic"
    site.fetch(data_dir)
    assert "next: fedward data prepare isic2019" in capsys.readouterr().out
    first, second = (data_dir / RAW / f"{name}.jpg" for name, *_ in RECORDS[:2])
    good = first.read_bytes(), second.read_bytes()
    first.unlink()
    (first.parent / (first.name + ".part")).write_bytes(b"half a jpeg")  # left by a killed extraction
    second.write_bytes(good[1][:100])  # a truncated file under the final name (e.g. copied by hand)
    requests = len(site.requests)
    site.fetch(data_dir)
    assert (first.read_bytes(), second.read_bytes()) == good
    assert not list(data_dir.rglob("*.part"))
    assert len(site.requests) == requests
    assert "2 files extracted" in capsys.readouterr().err


def test_deleted_zip_is_not_downloaded_again(site, tmp_path, capsys):
    data_dir = tmp_path / "isic"
    site.fetch(data_dir, delete_zip=True)
    assert not (data_dir / "ISIC_2019_Training_Input.zip").exists()
    assert "zip deleted" in capsys.readouterr().out
    requests = len(site.requests)
    site.fetch(data_dir)
    assert len(site.requests) == requests
    assert "is not needed" in capsys.readouterr().err


def test_missing_image_is_named(site, tmp_path):
    missing = RECORDS[5][0]
    site.publish(drop_image=missing)
    with pytest.raises(DataError, match=f"found {len(RECORDS) - 1}, expected {len(RECORDS)}") as caught:
        site.fetch(tmp_path / "isic")
    assert missing in str(caught.value) and RAW in str(caught.value)


def test_wrong_count_says_found_and_expected(site, tmp_path):
    with pytest.raises(DataError, match=f"lists {len(RECORDS)} images, expected 23247") as caught:
        site.fetch(tmp_path / "isic", expected_images=None)  # the real count
    assert "train_test_split" in str(caught.value)


@pytest.mark.parametrize("fault, text", [
    (dict(relabel=RECORDS[3][0]), "ISIC_2019_Training_GroundTruth.csv: 1 of 54 split images do not have the split"),
    (dict(no_lesion=RECORDS[4][0]), "ISIC_2019_Training_Metadata.csv: 1 of 54 split images have no lesion_id"),
])
def test_ground_truth_and_metadata_are_checked(site, tmp_path, fault, text):
    site.publish(**fault)
    with pytest.raises(DataError, match=text) as caught:
        site.fetch(tmp_path / "isic")
    assert next(iter(fault.values())) in str(caught.value)


@pytest.mark.parametrize("table, column, name", [
    ("metadata", "lesion_id", "ISIC_2019_Training_Metadata.csv"),
    ("ground truth", "VASC", "ISIC_2019_Training_GroundTruth.csv"),
    ("split", "fold", "train_test_split"),
])
def test_csv_missing_a_column_is_kept_as_corrupt(site, tmp_path, table, column, name):
    site.publish(drop_column=(table, column))
    data_dir = tmp_path / "isic"
    with pytest.raises(DownloadError, match=f"has no column '{column}'") as caught:
        site.fetch(data_dir)
    assert name in str(caught.value) and "found: image" in str(caught.value)
    assert (data_dir / f"{name}.corrupt").is_file() and not (data_dir / name).exists()
    assert "/2019/ISIC_2019_Training_Input.zip" not in site.requests  # stopped before the big file
    site.publish()
    site.fetch(data_dir)  # a rerun downloads it again


def test_not_a_zip_is_kept_as_corrupt(site, tmp_path):
    site.publish(zip_bytes=b"<Error><Code>AccessDenied</Code></Error>")
    data_dir = tmp_path / "isic"
    with pytest.raises(DownloadError, match="is not a zip file") as caught:
        site.fetch(data_dir)
    assert "ISIC_2019_Training_Input.zip" in str(caught.value) and ".corrupt" in str(caught.value)
    assert (data_dir / "ISIC_2019_Training_Input.zip.corrupt").is_file()
    assert not (data_dir / "ISIC_2019_Training_Input.zip").exists()


def test_damaged_zip_is_kept_as_corrupt(site, tmp_path):
    site.publish()
    body = bytearray((site.root / "2019" / "ISIC_2019_Training_Input.zip").read_bytes())
    start = body.index(b"\xff\xd8")  # the first JPEG's data (stored uncompressed by writestr's default)
    body[start + 50] ^= 0xFF
    site.publish(zip_bytes=bytes(body))
    with pytest.raises(DownloadError, match="fails its CRC check"):
        site.fetch(tmp_path / "isic")
    assert (tmp_path / "isic" / "ISIC_2019_Training_Input.zip.corrupt").is_file()


@pytest.mark.parametrize("member", ["../evil.jpg", "/tmp/evil.jpg", f"{RAW}/../../evil.jpg"])
def test_zip_slip_is_refused_before_extracting(site, tmp_path, member):
    site.publish(member=member)
    data_dir = tmp_path / "isic"
    with pytest.raises(DownloadError, match="outside the target folder") as caught:
        site.fetch(data_dir)
    assert repr(member) in str(caught.value)
    assert not (data_dir / RAW).exists() and not (tmp_path / "evil.jpg").exists()


def test_licence_not_accepted_downloads_nothing(site, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal
    with pytest.raises(DownloadError, match="--accept-licence"):
        site.fetch(tmp_path / "isic", accept_licence=False)
    assert site.requests == [] and not (tmp_path / "isic").exists()


def test_licence_is_asked_once(site, tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = []
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: answers.append(prompt) or "y")
    site.fetch(tmp_path / "isic", accept_licence=False)
    assert len(answers) == 1 and len(site.requests) == 4
    assert capsys.readouterr().err.count("CC BY-NC 4.0") == 1  # the licence is shown once too


def test_cli_download_prepare_then_check(site, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download_isic, "ISIC_BASE_URL", f"{site.url}/2019")
    monkeypatch.setattr(download_isic, "SPLIT_URL", f"{site.url}/flamby/train_test_split")
    monkeypatch.setattr(download_isic, "EXPECTED_IMAGES", len(RECORDS))
    data_dir = tmp_path / "isic"
    assert main(["data", "download", "isic2019", "--to", str(data_dir), "--accept-licence", "--no-progress",
                 "--prepare"]) == 0
    assert "ready: fedward run" in capsys.readouterr().out
    assert main(["data", "check", str(data_dir), "--image_size", "16"]) == 0
    out = capsys.readouterr().out
    assert "fed_isic2019: 6 clients, 8 classes" in out and "(flamby layout)" in out

    assert main(["data", "download", "isic2018", "--to", str(data_dir)]) == 2
    assert "unknown data set 'isic2018' to download; known: isic2019" in capsys.readouterr().err

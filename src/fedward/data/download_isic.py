"""Download ISIC 2019 and FLamby's split into the layout the Fed-ISIC2019 data set reads.

``fedward data download isic2019 --to DIR`` fetches, with the shared resumable downloader
(:mod:`fedward.download`), the three public ISIC 2019 training files (CC BY-NC 4.0, HAM10000
included) and FLamby's split file ``train_test_split`` (from FLamby's MIT-licensed repository;
fedward fetches it, it does not ship it)::

    DIR/ISIC_2019_Training_Metadata.csv      columns include image, lesion_id
    DIR/ISIC_2019_Training_GroundTruth.csv   image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK
    DIR/train_test_split                     image, MEL..UNK, target, center, fold, fold2
    DIR/ISIC_2019_Training_Input.zip         kept after extraction unless delete_zip / --delete-zip
    DIR/ISIC_2019_Training_Input/<image>.jpg extracted from the zip

No checksum is published for these files, so they are checked by content instead: every CSV must
have its columns, a freshly downloaded zip must pass ``ZipFile.testzip()``, and every member read
while extracting is CRC-checked by :mod:`zipfile`. A freshly downloaded file that fails is kept as
``<name>.corrupt`` (as the shared downloader does) so a rerun downloads it again; a file that was
already there is never replaced. Then the split file must list ``expected_images`` (23,247) unique
images, each extracted, each with the same label in the ground truth, each with a ``lesion_id`` in
the metadata (FLamby keeps exactly the images whose centre can be recovered).

Everything resumes: downloads continue their ``.part`` file, extraction skips members already
there with the right size and writes each file as ``<name>.part`` before renaming it, and the
preprocessing (``prepare=True``, :func:`fedward.data.prepare.prepare_isic2019`) skips finished
outputs. Once every split image is extracted the zip is not needed again: a rerun after
``delete_zip`` does not download it.
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from fedward.data.fed_isic2019 import (CLASS_NAMES, CLIENT_NAMES, FLAMBY_SPLIT_FILE, parse_centre, parse_label,
                                       read_csv)
from fedward.data.prepare import PREPROCESSED_DIR, RAW_DIR, prepare_isic2019
from fedward.download import DownloadError, RemoteFile, download
from fedward.errors import ConfigError, DataError

ISIC_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2019"
SPLIT_URL = ("https://raw.githubusercontent.com/owkin/FLamby/main/flamby/datasets/fed_isic2019/"
             "dataset_creation_scripts/train_test_split")
ZIP_NAME = f"{RAW_DIR}.zip"
METADATA_NAME = "ISIC_2019_Training_Metadata.csv"
GROUND_TRUTH_NAME = "ISIC_2019_Training_GroundTruth.csv"
EXPECTED_IMAGES = 23_247  # FLamby's images with a known lesion_id: 18,597 train + 4,650 test
LICENCE = ("ISIC 2019 challenge data (BCN_20000, HAM10000, MSK), CC BY-NC 4.0: non-commercial use only, "
           "with attribution; https://creativecommons.org/licenses/by-nc/4.0/")
ONE_HOT = (*CLASS_NAMES, "UNK")
COLUMNS = {  # what each CSV must have (the real files have these; the metadata has more)
    METADATA_NAME: ("image", "lesion_id"),
    GROUND_TRUTH_NAME: ("image", *ONE_HOT),
    FLAMBY_SPLIT_FILE: ("image", *ONE_HOT, "target", "center", "fold", "fold2"),
}
MAX_LISTED = 5  # offending image ids named in an error


def isic2019_files(base_url: str = ISIC_BASE_URL, split_url: str = SPLIT_URL) -> tuple[RemoteFile, ...]:
    """The four files, small ones first (so a bad CSV shows before the 9 GB zip), the zip last."""
    base = base_url.rstrip("/")
    isic = [RemoteFile(name, f"{base}/{name}", licence=LICENCE) for name in (METADATA_NAME, GROUND_TRUTH_NAME)]
    archive = RemoteFile(ZIP_NAME, f"{base}/{ZIP_NAME}", licence=LICENCE)
    return (*isic, RemoteFile(FLAMBY_SPLIT_FILE, split_url), archive)


ISIC2019_FILES = isic2019_files()


def _say(message: str) -> None:
    print(f"fedward: {message}", file=sys.stderr, flush=True)


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _reject(path: Path, fresh: bool, reason: str) -> DownloadError:
    """The error for a file that fails its content check; a fresh download is kept as ``.corrupt``."""
    if not fresh:
        return DownloadError(f"{reason}; {path} was already there before this download: move it away or delete "
                             f"it to download {path.name} again")
    corrupt = path.with_name(path.name + ".corrupt")
    os.replace(path, corrupt)
    return DownloadError(f"{reason}; kept as {corrupt}; rerun to download it again")


class _Fetcher:
    """Downloads into one folder, showing the ISIC licence and asking for it at most once."""

    def __init__(self, folder: Path, accept_licence: bool, progress: bool) -> None:
        self.folder, self.accept_licence, self.progress = folder, accept_licence, progress
        self.licence_accepted = False  # by the flag or a yes, for a file downloaded in this call

    def fetch(self, remote: RemoteFile) -> tuple[Path, bool]:
        """(path, fresh): ``fresh`` is whether it was downloaded now rather than already there."""
        fresh = not (self.folder / remote.name).exists()
        if remote.licence and self.licence_accepted:
            remote = replace(remote, licence=None)  # the ISIC files share one licence: shown and accepted once
        path = download(remote, self.folder, progress=self.progress, accept_licence=self.accept_licence)
        if fresh and remote.licence:
            self.licence_accepted = True
        return path, fresh


def _read_table(path: Path, fresh: bool) -> list[tuple[int, dict[str, str]]]:
    try:
        return read_csv(path, COLUMNS[path.name], path.name)
    except DataError as err:
        raise _reject(path, fresh, str(err)) from None


def _open_zip(path: Path, fresh: bool) -> zipfile.ZipFile:
    """The zip, opened; a fresh download is CRC-checked whole first (an old one is checked as it is read)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise _reject(path, fresh, f"{path} is not a zip file ({err})") from None
    try:
        bad = archive.testzip() if fresh else None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:  # RuntimeError: an encrypted member
        bad = f"? ({err})"
    if bad is not None:
        archive.close()
        raise _reject(path, fresh, f"{path} is damaged: member {bad} fails its CRC check")
    return archive


def _member_parts(archive_path: Path, name: str) -> tuple[str, ...]:
    """The path parts of a member, refusing names that would land outside the folder (zip slip)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DownloadError(f"{archive_path}: member {name!r} would be written outside the target folder; "
                            "refusing to extract this zip")
    return parts


def extract(archive: zipfile.ZipFile, archive_path: Path, folder: Path, *, progress: bool = True) -> dict[str, int]:
    """Extract every member into ``folder``, resumably; returns ``{"extracted": n, "skipped": m}``.

    A member already there with its size is skipped. Each file is written as ``<name>.part`` and
    renamed when complete, so an interrupted extraction never leaves a truncated file under its
    final name. Every member name is checked before anything is written.
    """
    members = [(info, folder.joinpath(*_member_parts(archive_path, info.filename))) for info in archive.infolist()]
    extracted = skipped = 0
    with tqdm(members, desc="extracting", unit="file", disable=not progress, leave=False) as bar:
        for info, target in bar:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.is_file() and target.stat().st_size == info.file_size:
                skipped += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(target.name + ".part")
            try:
                with archive.open(info) as source, open(temporary, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            except (zipfile.BadZipFile, EOFError, RuntimeError) as err:  # a CRC mismatch or a truncated zip
                temporary.unlink(missing_ok=True)
                raise DownloadError(f"{archive_path}: member {info.filename} is damaged ({err}); delete "
                                    f"{archive_path} and rerun to download it again") from None
            os.replace(temporary, target)
            extracted += 1
    return {"extracted": extracted, "skipped": skipped}


def _missing_images(raw: Path, images: list[str]) -> list[str]:
    return [image for image in images if not (raw / f"{image}.jpg").is_file()]


def _label(row: dict[str, str]) -> int | None:
    """The class of a one-hot row (index into MEL..UNK), or None unless exactly one column is 1."""
    try:
        hot = [k for k, column in enumerate(ONE_HOT) if float(row[column]) == 1.0]
    except ValueError:
        return None
    return hot[0] if len(hot) == 1 else None


def check_isic2019(folder: Path, tables: dict[str, list[tuple[int, dict[str, str]]]],
                   expected_images: int) -> dict[str, Counter]:
    """Check the split file against the images, the ground truth and the metadata (see the module doc).

    Returns the split's counts per centre (``"center"``) and per fold (``"fold"``).
    """
    split_path, raw = folder / FLAMBY_SPLIT_FILE, folder / RAW_DIR
    rows = tables[FLAMBY_SPLIT_FILE]
    images = [row["image"] for _, row in rows]
    if len(images) != expected_images:
        raise DataError(f"{split_path} lists {len(images)} images, expected {expected_images}")
    repeated = [image for image, count in Counter(images).items() if count > 1]
    if repeated:
        raise DataError(f"{split_path}: {len(repeated)} images are listed more than once "
                        f"({len(set(images))} unique, expected {expected_images}): {_listed(repeated)}")
    missing = _missing_images(raw, images)
    if missing:
        raise DataError(f"{raw}: {len(missing)} images of {split_path.name} are missing (found "
                        f"{len(images) - len(missing)}, expected {len(images)}): {_listed(missing)}")

    truth = {row["image"]: _label(row) for _, row in tables[GROUND_TRUTH_NAME]}
    wrong, centres, folds = [], Counter(), Counter()
    for line, row in rows:
        target = parse_label(row["target"], split_path, line, "target")
        centres[parse_centre(row["center"], split_path, line, "center")] += 1
        fold = row["fold"].lower()
        if fold not in ("train", "test"):
            raise DataError(f"{split_path}, line {line}, column 'fold': unknown fold {row['fold']!r}; "
                            "expected 'train' or 'test'")
        folds[fold] += 1
        if row["image"] not in truth:
            wrong.append(f"{row['image']} (not in the ground truth)")
        elif truth[row["image"]] != target:
            found = truth[row["image"]]
            wrong.append(f"{row['image']} ({'no single class' if found is None else ONE_HOT[found]} in the ground "
                         f"truth, {CLASS_NAMES[target]} in the split)")
    if wrong:
        raise DataError(f"{folder / GROUND_TRUTH_NAME}: {len(wrong)} of {len(rows)} split images do not have the "
                        f"split's label (found {len(rows) - len(wrong)} matching, expected {len(rows)}): "
                        f"{_listed(wrong)}")

    lesions = {row["image"]: row["lesion_id"] for _, row in tables[METADATA_NAME]}
    unknown = [image for image in images if not lesions.get(image)]
    if unknown:
        raise DataError(f"{folder / METADATA_NAME}: {len(unknown)} of {len(images)} split images have no lesion_id "
                        f"(found {len(images) - len(unknown)}, expected {len(images)}): {_listed(unknown)}")
    return {"center": centres, "fold": folds}


def download_isic2019(folder: str | Path, *, accept_licence: bool = False, progress: bool = True,
                      base_url: str | None = None, split_url: str | None = None, expected_images: int | None = None,
                      prepare: bool = False, delete_zip: bool = False, workers: int | None = None) -> Path:
    """Download, extract and check ISIC 2019 with FLamby's split into ``folder``; returns ``folder``.

    ``base_url`` and ``split_url`` default to the public locations (:data:`ISIC_BASE_URL`,
    :data:`SPLIT_URL`), ``expected_images`` to :data:`EXPECTED_IMAGES`. ``prepare`` then runs
    FLamby's preprocessing into ``folder/ISIC_2019_Training_Input_preprocessed`` (``workers``
    processes), after which ``fedward run --dataset fed_isic2019 --data_dir folder`` works.
    The ISIC licence (CC BY-NC 4.0) is shown, and must be accepted (``accept_licence`` or a yes at a
    terminal) once, before the first ISIC file that has to be downloaded. The zip is kept unless
    ``delete_zip``; once every split image is extracted a rerun does not need it. Prints a summary
    (images, train/test, images per centre) and the next command; raises a ``FedwardError`` that
    names the file, the first offending image ids and the counts found vs expected when a check fails.
    """
    expected = EXPECTED_IMAGES if expected_images is None else expected_images
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < 1:
        raise ConfigError(f"expected_images must be a positive integer, got {expected!r}")
    folder = Path(folder).expanduser()
    *tables_files, zip_file = isic2019_files(base_url or ISIC_BASE_URL, split_url or SPLIT_URL)
    fetcher = _Fetcher(folder, accept_licence, progress)
    tables = {}
    for remote in tables_files:
        tables[remote.name] = _read_table(*fetcher.fetch(remote))

    raw, zip_path = folder / RAW_DIR, folder / ZIP_NAME
    images = [row["image"] for _, row in tables[FLAMBY_SPLIT_FILE]]
    if zip_path.exists() or _missing_images(raw, images):
        with _open_zip(*fetcher.fetch(zip_file)) as archive:
            counts = extract(archive, zip_path, folder, progress=progress)
        _say(f"{counts['extracted']} files extracted, {counts['skipped']} already there")
    else:
        _say(f"every image of {FLAMBY_SPLIT_FILE} is already in {raw}: {ZIP_NAME} is not needed")

    counts = check_isic2019(folder, tables, expected)
    if not zip_path.exists():
        zip_note = "not kept"
    elif delete_zip:
        zip_path.unlink()
        zip_note = "deleted"
    else:
        zip_note = f"kept ({zip_path}; delete it to save space)"
    centres = ", ".join(f"{k} {CLIENT_NAMES[k]} {n}" for k, n in sorted(counts["center"].items()))
    folds = ", ".join(f"{fold} {n}" for fold, n in sorted(counts["fold"].items(), key=lambda item: item[0] != "train"))
    print(f"ISIC 2019 with FLamby's split: {len(images)} images in {raw} ({folds}); per centre: {centres}; "
          f"zip {zip_note}")
    preprocessed = folder / PREPROCESSED_DIR
    if prepare:
        done = prepare_isic2019(raw, preprocessed, workers=workers, progress=progress)
        print(f"prepared {done['done']} images, {done['skipped']} already done: {preprocessed}")
        print(f"ready: fedward run --dataset fed_isic2019 --data_dir {folder}")
    else:
        print(f"next: fedward data prepare isic2019 --src {raw} --dst {preprocessed}, then "
              f"fedward run --dataset fed_isic2019 --data_dir {folder} (or rerun with --prepare)")
    return folder

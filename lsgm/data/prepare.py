"""`lsgm prepare NAME`: turn raw dataset files into the prepared format (docs/algorithm.md §8).

Prepared format (``FORMAT_VERSION`` 1), in ``<out_dir>/<name>/``:

* ``train.npy``, ``valid.npy`` (only where the dataset has a validation split), ``test.npy``
  (only where it has a test split): ``uint8`` arrays of shape (N, C, H, W) in ``.npy`` format, so
  ``np.load(path, mmap_mode="r")`` maps them without reading them.
  Values are integer levels ``0..max_value`` (``max_value`` 16 for ``digits``, 255 otherwise).
* ``manifest.json``: dataset, format version, dtype, layout, max_value, per split the count, shape
  and sha256 of its file, a description of the split, the seed, and for every raw input its path,
  size, sha256 and the checksum it was verified against (if any).

Splits: ``digits`` train/valid/test (1,257 / 270 / 270, seeded permutation), ``mnist`` train/test
(60,000 / 10,000), ``omniglot`` train/test (24,345 / 8,070), ``cifar10`` train/test (50,000 /
10,000), ``celeba256`` train/valid (27,000 / 3,000).

Raw files live in ``<raw_dir>/<name>/`` (see :data:`RAW_FILES`). The output is written to a
temporary directory next to the target and renamed into place only once complete, so a failure
leaves no partial output and never destroys an existing good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsgm.data import formats
from lsgm.atomic import replace_dir
from lsgm.errors import LsgmError
from lsgm.data.formats import RawFormatError

FORMAT_VERSION = 1
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "omniglot", "cifar10", "celeba256")
#: Datasets dynamically binarised at load time (docs/algorithm.md §8).
BINARISED_DATASETS = ("digits", "mnist", "omniglot")
DIGITS_SPLIT = (1257, 270, 270)  # train / valid / test of the 1,797 scikit-learn digits
CELEBA_SPLIT = (27000, 3000)  # train / valid of CelebA-HQ-256 (GLOW release)


class DatasetError(LsgmError, RuntimeError):
    """Base class of dataset preparation errors."""


class RawFileMissingError(DatasetError, FileNotFoundError):
    """A raw file is absent and could not (or may not) be downloaded."""


class ChecksumMismatchError(DatasetError):
    """A raw file's checksum differs from the published one."""


@dataclass(frozen=True)
class RawFile:
    """One raw input file, where to get it and its published checksum.

    ``md5``/``sha256`` None means no published checksum is known: the file is then verified only
    by its format (the readers in :mod:`lsgm.data.formats`) and its sha256 is recorded in the
    manifest; a warning is printed. ``content_sha256`` (gzip files) is the digest of the decompressed
    bytes: a re-compressed copy of the same data (e.g. a Linux distribution's package) matches it although its
    md5 differs from the published one.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    checksum_source: str = ""
    content_sha256: str | None = None  # sha256 of the gzip-decompressed bytes (the same for any re-compression)
    content_source: str = ""


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _mnist(filename: str, md5: str) -> RawFile:
    return RawFile(filename, tuple(m + filename for m in _MNIST_MIRRORS), md5=md5,
                   checksum_source="MNIST md5 as published by torchvision")


_FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
#: Where Debian's ``dataset-fashion-mnist`` package installs the four files (``dpkg -L dataset-fashion-mnist``).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _fashion(filename: str, md5: str, content_sha256: str) -> RawFile:
    # md5: the gzip files' digests published in the dataset's README (Xiao, Rasul, Vollgraf 2017). content_sha256:
    # the decompressed IDX bytes, computed here from Debian's dataset-fashion-mnist package, whose gzip files are
    # re-compressed (their md5 differ from the published ones). That the upstream gzip files decompress to the same
    # bytes could not be checked on this machine (no access to the upstream URLs): the upstream side is unverified.
    return RawFile(filename, tuple(u + filename for u in _FASHION_URLS), md5=md5,
                   checksum_source="gzip md5 published in the Fashion-MNIST README",
                   content_sha256=content_sha256,
                   content_source="sha256 of the decompressed IDX file (Debian dataset-fashion-mnist package; the "
                                  "upstream files are expected to decompress to the same bytes, unverified here)")


#: Known raw files per dataset (``digits`` ships with scikit-learn and has none).
RAW_FILES: dict[str, tuple[RawFile, ...]] = {
    "digits": (),
    "mnist": (
        _mnist("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _mnist("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        _mnist("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        _mnist("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion_mnist": (
        _fashion("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        _fashion("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        _fashion("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                 "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        _fashion("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                 "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    "omniglot": (
        RawFile(
            "chardata.mat",
            ("https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat",),
            # Not published by the IWAE authors; this md5 is the one pinned by a third-party
            # loader (a tfsnippet-based OMNIGLOT dataset module) for the same URL.
            md5="21ecaf34373511aa7691cf2e0802aa3d",
            checksum_source="md5 pinned by a third-party loader for the IWAE URL (not by the IWAE authors)",
        ),
    ),
    "cifar10": (
        RawFile(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
            checksum_source="md5 published on the CIFAR-10 page",
        ),
    ),
    "celeba256": (
        RawFile(
            "celeba-tfr.tar",
            (
                "https://openaipublic.azureedge.net/glow-demo/data/celeba-tfr.tar",
                "https://storage.googleapis.com/glow-demo/data/celeba-tfr.tar",
            ),
            # No published checksum was found for the GLOW tarball: verified by format (TFRecord
            # CRC-32C of every record, Example layout, image shapes, split counts) only.
            checksum_source="none published",
        ),
    ),
}


# ----------------------------------------------------------------------------------------------
# Checksums, raw files and downloads
# ----------------------------------------------------------------------------------------------

def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class UnverifiedRawFileWarning(UserWarning):
    """A raw input has no published checksum; it is verified by its format only."""


def _warn_unverified(message: str) -> None:
    warnings.warn(message, UnverifiedRawFileWarning, stacklevel=3)


def _where_to_get(raw: RawFile, path: Path) -> str:
    checksum = f"md5 {raw.md5}" if raw.md5 else f"sha256 {raw.sha256}" if raw.sha256 else "no published checksum"
    return f"Download it from {' or '.join(raw.urls)} ({checksum}) and place it at {path.resolve()}"


def verify_raw_file(path: Path, raw: RawFile, verify_checksums: bool,
                    accepted_sha256: str | None = None) -> dict[str, Any]:
    """Check a raw file against its published checksum and return its manifest entry.

    ``accepted_sha256`` (``lsgm prepare --accept-sha256 FILE=HEX``): the user vouches for a file with another
    checksum (a mirror, a re-compressed copy); it is accepted only with exactly that sha256, recorded in the
    manifest as ``accepted_sha256`` with ``verified: false``, and a warning is printed.

    Raises:
        ChecksumMismatchError: the checksum differs (only with ``verify_checksums``), or differs from the accepted one.
    """
    sha256 = file_digest(path, "sha256")
    entry: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256,
                             "expected": {}, "verified": False}
    if raw.md5:
        entry["expected"]["md5"] = raw.md5
    if raw.sha256:
        entry["expected"]["sha256"] = raw.sha256
    if accepted_sha256 is not None:
        if sha256 != accepted_sha256.lower():
            raise ChecksumMismatchError(f"checksum mismatch for {path.resolve()}: sha256 is {sha256}, not the "
                                        f"{accepted_sha256} accepted with --accept-sha256")
        _warn_unverified(f"{path}: accepted by its sha256 {sha256} (--accept-sha256), not by the published "
                         f"checksum ({raw.checksum_source or 'none'}); recorded in the manifest")
        entry["accepted_sha256"] = sha256
        return entry
    if not entry["expected"]:
        _warn_unverified(f"{path}: no published checksum for {raw.filename}; verified by format only "
                         f"(sha256 {sha256} recorded in the manifest)")
        return entry
    if not verify_checksums:
        return entry
    mismatches = []
    for algorithm, expected in entry["expected"].items():
        actual = sha256 if algorithm == "sha256" else file_digest(path, algorithm)
        if actual != expected:
            mismatches.append(f"{algorithm} is {actual}, expected {expected} ({raw.checksum_source})")
    if not mismatches:
        entry["verified"], entry["verified_by"] = True, raw.checksum_source
        return entry
    if raw.content_sha256:  # a re-compressed copy of the same data: compare the decompressed bytes
        content = gzip_content_sha256(path)
        entry["content_sha256"], entry["expected"]["content_sha256"] = content, raw.content_sha256
        if content == raw.content_sha256:
            entry["verified"], entry["verified_by"] = True, raw.content_source
            return entry
        mismatches.append(f"decompressed content sha256 is {content}, expected {raw.content_sha256}")
    raise ChecksumMismatchError(
        f"checksum mismatch for {path.resolve()}: {'; '.join(mismatches)}. The file is corrupt, truncated or a "
        f"different release: delete it and download it again (or, if you trust this copy, pass "
        f"--accept-sha256 {raw.filename}={sha256}). {_where_to_get(raw, path)}"
    )


def gzip_content_sha256(path: Path) -> str:
    """sha256 of the decompressed bytes of a gzip file (RawFormatError if it is not a complete gzip stream)."""
    import gzip
    import zlib

    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError, zlib.error) as e:
        raise RawFormatError(f"{path}: not a complete gzip file ({type(e).__name__}: {e}); delete it and get it "
                             "again") from e
    return h.hexdigest()


def download_raw_file(raw: RawFile, path: Path, verify_checksums: bool = True) -> dict[str, Any]:
    """Download ``raw`` to a temporary name next to ``path``, verify it, then rename it.

    Returns:
        The manifest entry of the downloaded file (see :func:`verify_raw_file`).

    Raises:
        RawFileMissingError: every URL failed (network error), with where to put the file by hand.
        ChecksumMismatchError: the download does not match the published checksum.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in raw.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{raw.filename}.", suffix=".part", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            print(f"downloading {url} -> {path}")
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out, length=1 << 20)
            entry = verify_raw_file(tmp, raw, verify_checksums)
            os.replace(tmp, path)
            entry["file"] = path.name
            return entry
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise RawFileMissingError(
        f"could not download {raw.filename} ({'; '.join(errors)}). {_where_to_get(raw, path)}"
    )


def find_raw_file(name: str, raw: RawFile, folder: Path) -> Path | None:
    """Where a raw file is: ``<raw_dir>/<name>/`` first, then the system location of :data:`SYSTEM_RAW_DIRS`."""
    for d in (folder, *SYSTEM_RAW_DIRS.get(name, ())):
        if (d / raw.filename).is_file():
            return d / raw.filename
    return None


def ensure_raw_file(raw: RawFile, folder: Path, download: bool, verify_checksums: bool,
                    accepted_sha256: str | None = None, name: str = "") -> tuple[Path, dict]:
    """Return the path of a raw file (found in ``folder`` or a system location, else downloaded into ``folder``
    if allowed) and its manifest entry (which records where it was read from)."""
    found = find_raw_file(name, raw, folder)
    if found is not None and found.parent != folder:
        entry = verify_raw_file(found, raw, verify_checksums, accepted_sha256)
        entry["source"] = str(found)
        return found, entry
    path = folder / raw.filename
    if not path.is_file():
        if not download:
            raise RawFileMissingError(f"raw file missing: {path.resolve()}. {_where_to_get(raw, path)} "
                                      "(or run with downloading enabled).")
        return path, download_raw_file(raw, path, verify_checksums)
    return path, verify_raw_file(path, raw, verify_checksums, accepted_sha256)


def require_raw_files(name: str, folder: Path, download: bool) -> None:
    """Fail at once, listing EVERY missing raw file of ``name`` with where to get it, when downloading is off."""
    if download or name not in _FIXED_RAW_FILES:
        return
    missing = [raw for raw in RAW_FILES[name] if find_raw_file(name, raw, folder) is None]
    if missing:
        listed = "; ".join(f"{(folder / raw.filename).resolve()} from {raw.urls[0]}"
                           + (f" (md5 {raw.md5})" if raw.md5 else "") for raw in missing)
        system = "".join(f" (or {d}: `{SYSTEM_RAW_HINTS[name]}`)" for d in SYSTEM_RAW_DIRS.get(name, ()))
        raise RawFileMissingError(f"{len(missing)} of {len(RAW_FILES[name])} raw files of {name} are missing "
                                  f"(downloading is off): {listed}; place them there{system}, or run without "
                                  "--no-download")


# ----------------------------------------------------------------------------------------------
# Per-dataset builders: each takes a _Context and returns a _Built
# ----------------------------------------------------------------------------------------------

@dataclass
class _Built:
    """What a builder produced: split arrays (in memory or memmaps already in the temp dir),
    raw-input manifest entries (paths relative to ``<raw_dir>/<name>``) and a split description."""

    splits: dict[str, np.ndarray] = field(default_factory=dict)
    raw_inputs: list[dict] = field(default_factory=list)
    split_description: str = ""
    max_value: int = 255
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # class labels per split, where the data has them


@dataclass
class _Context:
    """Arguments of one ``prepare_dataset`` call; ``raw_folder`` is ``<raw_dir>/<name>``."""

    name: str
    raw_folder: Path
    tmp_dir: Path
    download: bool
    verify_checksums: bool
    seed: int
    image_size: int
    celeba_split: tuple[int, int]
    accept_sha256: dict[str, str] = field(default_factory=dict)

    def ensure(self, raw: RawFile) -> tuple[Path, dict]:
        """:func:`ensure_raw_file` with this call's download / verification / accepted-checksum settings."""
        return ensure_raw_file(raw, self.raw_folder, self.download, self.verify_checksums,
                               self.accept_sha256.get(raw.filename), self.name)


def _pad_to_32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 1, 32, 32) with 2 zero pixels on every side (docs/algorithm.md §8)."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]


def _build_digits(ctx: _Context) -> _Built:
    import importlib.resources

    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images  # (1797, 8, 8) floats with integer values 0..16
    if images.shape != (1797, 8, 8) or images.min() < 0 or images.max() > 16:
        raise RawFormatError(f"scikit-learn digits have shape {images.shape}, expected (1797, 8, 8) in 0..16")
    images = np.rint(images).astype(np.uint8)[:, None]
    perm = np.random.default_rng(ctx.seed).permutation(len(images))
    n_train, n_valid, _ = DIGITS_SPLIT
    built = _Built(max_value=16)
    parts = {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid], "test": perm[n_train + n_valid:]}
    built.splits = {split: images[idx] for split, idx in parts.items()}
    built.labels = {split: bunch.target[idx].astype(np.uint8) for split, idx in parts.items()}
    built.split_description = (
        f"scikit-learn load_digits (1,797 8x8 images, levels 0..16); permutation "
        f"numpy.random.default_rng({ctx.seed}).permutation(1797): first {n_train} train, "
        f"next {n_valid} valid, last {len(images) - n_train - n_valid} test"
    )
    csv = importlib.resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
    with importlib.resources.as_file(csv) as csv_path:
        built.raw_inputs.append({"file": f"sklearn/datasets/data/digits.csv.gz (scikit-learn {sklearn.__version__})",
                                 "bytes": csv_path.stat().st_size, "sha256": file_digest(csv_path),
                                 "expected": {}, "verified": False})
    return built


def _read_idx_pairs(ctx: _Context, name: str) -> tuple[_Built, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The four IDX files of an MNIST-format dataset: {"train": (images (N,28,28), labels), "test": ...}."""
    built = _Built()
    files = {}
    for raw in RAW_FILES[name]:
        path, entry = ctx.ensure(raw)
        files[raw.filename] = path
        built.raw_inputs.append(entry)
    pairs = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = formats.read_idx_gz(files[f"{prefix}-images-idx3-ubyte.gz"], formats.IDX_MAGIC_IMAGES)
        labels = formats.read_idx_gz(files[f"{prefix}-labels-idx1-ubyte.gz"], formats.IDX_MAGIC_LABELS)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
            raise RawFormatError(f"{files[f'{prefix}-images-idx3-ubyte.gz']}: images {images.shape} with "
                                 f"{len(labels)} labels; expected (N, 28, 28) and N labels")
        if labels.max(initial=0) > 9:
            raise RawFormatError(f"{files[f'{prefix}-labels-idx1-ubyte.gz']}: label {int(labels.max())} > 9; "
                                 "expected classes 0..9")
        pairs[split] = (images, labels)
    return built, pairs


def _build_mnist(ctx: _Context) -> _Built:
    built, pairs = _read_idx_pairs(ctx, "mnist")
    for split, (images, labels) in pairs.items():
        built.splits[split] = _pad_to_32(images)
        built.labels[split] = labels
    built.split_description = ("official MNIST split: train-* -> train, t10k-* -> test; 28x28 zero-padded "
                               "by 2 px to 32x32; no validation split")
    return built


FASHION_VALID = 5000  # validation images held out of Fashion-MNIST's 60,000 training images


def _build_fashion_mnist(ctx: _Context) -> _Built:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 8-bit 28x28 grey-scale, kept at 28x28 (no padding); a seeded
    validation split of 5,000 of the 60,000 training images; the official 10,000 test images."""
    built, pairs = _read_idx_pairs(ctx, "fashion_mnist")
    images, labels = pairs["train"]
    if len(images) <= FASHION_VALID:
        raise RawFormatError(f"fashion_mnist train-images: {len(images)} images, expected more than the "
                             f"{FASHION_VALID} held out for validation (60,000 in the real files)")
    perm = np.random.default_rng(ctx.seed).permutation(len(images))
    parts = {"train": perm[:-FASHION_VALID], "valid": perm[-FASHION_VALID:]}
    for split, idx in parts.items():
        built.splits[split], built.labels[split] = images[idx][:, None], labels[idx]
    built.splits["test"], built.labels["test"] = pairs["test"][0][:, None], pairs["test"][1]
    built.split_description = (
        f"Fashion-MNIST train-* ({len(images)} images): numpy.random.default_rng({ctx.seed}).permutation: all but "
        f"the last {FASHION_VALID} -> train, the last {FASHION_VALID} -> valid; t10k-* -> test; 28x28, 8-bit")
    return built


def _build_omniglot(ctx: _Context) -> _Built:
    built = _Built()
    path, entry = ctx.ensure(RAW_FILES["omniglot"][0])
    built.raw_inputs.append(entry)
    arrays = formats.read_omniglot_mat(path)
    built.splits = {split: _pad_to_32(images) for split, images in arrays.items()}
    built.split_description = ("chardata.mat: 'data' -> train, 'testdata' -> test; each column read in "
                               "column-major order into 28x28, intensity v stored as round(255 v), zero-padded "
                               "to 32x32; no validation split")
    return built


def _build_cifar10(ctx: _Context) -> _Built:
    built = _Built()
    path, entry = ctx.ensure(RAW_FILES["cifar10"][0])
    built.raw_inputs.append(entry)
    built.splits = formats.read_cifar10_tar(path)
    built.split_description = "official CIFAR-10 split: data_batch_1..5 (in order) -> train, test_batch -> test"
    return built


_TFR_SPLIT_DIRS = {"train": "train", "valid": "validation"}
_RES_TAG = re.compile(r"-r(\d\d)-")


def _select_shards(names: list[str], image_size: int) -> list[str]:
    """Keep the shards of resolution ``image_size`` when shard names carry GLOW's ``-rNN-`` tag."""
    tags = {n: _RES_TAG.search(Path(n).name) for n in names}
    if any(tags.values()):
        want = f"{int(np.log2(image_size)):02d}"
        return sorted(n for n, m in tags.items() if m and m.group(1) == want)
    return sorted(names)


def _iter_tfr_images(ctx: _Context, source: Path, split: str) -> Iterator[tuple[np.ndarray, str]]:
    """Yield (image (3,S,S), where) for one split from a celeba-tfr directory or tarball."""
    sub = _TFR_SPLIT_DIRS[split]
    if source.is_dir():
        shards = _select_shards([str(p) for p in (source / sub).glob("*.tfrecords")], ctx.image_size)
        if not shards:
            raise RawFormatError(f"{source / sub}: no *.tfrecords shards of {ctx.image_size}x{ctx.image_size} images")
        for shard in shards:
            with open(shard, "rb") as f:
                for i, payload in enumerate(formats.iter_tfrecords(f, shard)):
                    yield formats.example_to_image(payload, f"{shard} record {i}"), shard
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith(".tfrecords") and f"/{sub}/" in f"/{m.name}"}
            shards = _select_shards(list(members), ctx.image_size)
            if not shards:
                raise RawFormatError(f"{source}: no {sub}/*.tfrecords shards of {ctx.image_size}x{ctx.image_size}")
            for shard in shards:
                where = f"{source}:{shard}"
                for i, payload in enumerate(formats.iter_tfrecords(tar.extractfile(members[shard]), where)):
                    yield formats.example_to_image(payload, f"{where} record {i}"), where
    except (tarfile.TarError, EOFError) as e:
        raise RawFormatError(f"{source}: not a complete tar archive ({type(e).__name__}: {e})") from e


def _fill_split(ctx: _Context, split: str, count: int, images: Iterator[tuple[np.ndarray, str]]) -> np.ndarray:
    """Stream exactly ``count`` images of shape (3, S, S) into ``<tmp>/<split>.npy``."""
    s = ctx.image_size
    out = np.lib.format.open_memmap(ctx.tmp_dir / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(count, 3, s, s))
    n = 0
    for image, where in images:
        if image.shape != (3, s, s):
            raise RawFormatError(f"{where}: image has shape (C,H,W)={image.shape}, expected (3, {s}, {s})")
        if n >= count:
            raise RawFormatError(f"{where}: more than the expected {count} {split} images")
        out[n] = image
        n += 1
    if n != count:
        raise RawFormatError(f"{split} split has {n} images, expected {count} (missing or truncated shards/files?)")
    out.flush()
    return out


def _build_celeba256(ctx: _Context) -> _Built:
    built = _Built()
    n_train, n_valid = ctx.celeba_split
    tfr_dir, image_dir = ctx.raw_folder / "celeba-tfr", ctx.raw_folder / "images"
    if tfr_dir.is_dir() or not image_dir.is_dir():
        raw = RAW_FILES["celeba256"][0]
        if tfr_dir.is_dir():
            source = tfr_dir
            _warn_unverified(f"{tfr_dir}: extracted GLOW shards have no published checksum; verified by "
                             "TFRecord CRC-32C, Example layout and split counts (sha256 of each shard recorded)")
            for shard in sorted(tfr_dir.glob("*/*.tfrecords")):
                built.raw_inputs.append({"file": str(shard.relative_to(ctx.raw_folder)), "bytes": shard.stat().st_size,
                                         "sha256": file_digest(shard), "expected": {}, "verified": False})
        else:
            source, entry = ctx.ensure(raw)
            built.raw_inputs.append(entry)
        for split, count in (("train", n_train), ("valid", n_valid)):
            built.splits[split] = _fill_split(ctx, split, count, _iter_tfr_images(ctx, source, split))
        built.split_description = (f"GLOW celeba-tfr release: train/*.tfrecords -> train ({n_train}), "
                                   f"validation/*.tfrecords -> valid ({n_valid}); shards in name order, "
                                   "records in file order; every record's CRC-32C verified")
    else:
        files = formats.list_image_files(image_dir)
        _warn_unverified(f"{image_dir}: an image folder has no published checksum; verified by image size "
                         "and count (sha256 of each used image recorded)")
        if len(files) < n_train + n_valid:
            raise RawFormatError(f"{image_dir}: {len(files)} images, expected at least {n_train + n_valid} "
                                 f"({n_train} train + {n_valid} valid) PNG/JPEG files of "
                                 f"{ctx.image_size}x{ctx.image_size}")
        chosen = {"train": files[:n_train], "valid": files[n_train:n_train + n_valid]}
        for split, paths in chosen.items():
            for p in paths:
                built.raw_inputs.append({"file": str(p.relative_to(ctx.raw_folder)), "bytes": p.stat().st_size,
                                         "sha256": file_digest(p), "expected": {}, "verified": False})
            stream = ((formats.read_rgb_image(p, ctx.image_size), str(p)) for p in paths)
            built.splits[split] = _fill_split(ctx, split, len(paths), stream)
        built.split_description = (f"image folder images/ sorted by file name: first {n_train} -> train, "
                                   f"next {n_valid} -> valid ({len(files) - n_train - n_valid} ignored)")
    return built


#: datasets whose raw files are a fixed list (celeba256 accepts one of three layouts instead)
_FIXED_RAW_FILES = ("mnist", "fashion_mnist", "omniglot", "cifar10")
#: system folders searched after ``<raw_dir>/<name>/`` (Debian: ``apt-get install dataset-fashion-mnist``)
SYSTEM_RAW_DIRS: dict[str, tuple[Path, ...]] = {"fashion_mnist": (FASHION_MNIST_SYSTEM_DIR,)}
SYSTEM_RAW_HINTS = {"fashion_mnist": "apt-get install dataset-fashion-mnist"}

_BUILDERS: dict[str, Callable[[_Context], _Built]] = {
    "digits": _build_digits,
    "mnist": _build_mnist,
    "fashion_mnist": _build_fashion_mnist,
    "omniglot": _build_omniglot,
    "cifar10": _build_cifar10,
    "celeba256": _build_celeba256,
}


# ----------------------------------------------------------------------------------------------
# Output: temp dir -> atomic rename
# ----------------------------------------------------------------------------------------------

def _write_outputs(ctx: _Context, built: _Built) -> None:
    splits_meta = {}
    for split, array in built.splits.items():
        path = ctx.tmp_dir / f"{split}.npy"
        if not path.exists():  # streamed splits are already there
            np.save(path, np.ascontiguousarray(array, dtype=np.uint8))
        if array.dtype != np.uint8 or array.ndim != 4 or array.max(initial=0) > built.max_value:
            raise RawFormatError(f"{ctx.name}/{split}: produced {array.dtype} {array.shape}; expected uint8 "
                                 f"(N,C,H,W) with values <= {built.max_value}")
        splits_meta[split] = {"file": path.name, "count": int(array.shape[0]), "shape": list(array.shape),
                              "sha256": file_digest(path)}
        if split in built.labels:
            labels = np.ascontiguousarray(built.labels[split], dtype=np.uint8)
            if labels.shape != (array.shape[0],):
                raise RawFormatError(f"{ctx.name}/{split}: {labels.shape} labels for {array.shape[0]} images")
            label_path = ctx.tmp_dir / f"{split}_labels.npy"
            np.save(label_path, labels)
            splits_meta[split].update(labels_file=label_path.name, labels_sha256=file_digest(label_path),
                                      num_classes=int(labels.max()) + 1)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": ctx.name,
        "dtype": "uint8",
        "layout": "NCHW",
        "max_value": built.max_value,
        "dynamic_binarisation": ctx.name in BINARISED_DATASETS,
        "splits": splits_meta,
        "split_description": built.split_description,
        "seed": ctx.seed,
        "raw_inputs": built.raw_inputs,
        "checksums_verified": ctx.verify_checksums,
    }
    (ctx.tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


_OWNER_FILE = ".owner-pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path, name: str) -> list[Path]:
    """Remove the temp folders (``.NAME.tmp-*``, ``.NAME.old-*``) that a killed ``prepare`` left behind.

    A folder is stale when the process that made it (its ``.owner-pid``) no longer runs; one without an owner file
    (an older version, or a kill before it was written) is stale when older than an hour. Returns what was removed.
    """
    removed = []
    for d in list(out_dir.glob(f".{name}.tmp-*")) + list(out_dir.glob(f".{name}.old-*")):
        if not d.is_dir():
            continue
        owner = d / _OWNER_FILE
        try:
            stale = not _alive(int(owner.read_text().strip()))
        except (OSError, ValueError):
            stale = time.time() - d.stat().st_mtime > 3600
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            print(f"removed {d}, left by a killed `lsgm prepare {name}`")
    return removed


def prepare_dataset(
    name: str,
    raw_dir: str | Path = "data/raw",
    out_dir: str | Path = "data/prepared",
    download: bool = True,
    seed: int = 0,
    *,
    verify_checksums: bool = True,
    image_size: int = 256,
    celeba_split: tuple[int, int] = CELEBA_SPLIT,
    accept_sha256: dict[str, str] | None = None,
) -> Path:
    """Prepare dataset ``name`` into ``<out_dir>/<name>/`` (format in the module docstring).

    Args:
        name: one of :data:`DATASET_NAMES`.
        raw_dir: folder holding ``<name>/<raw files>`` (see :data:`RAW_FILES`). For ``celeba256``:
            ``celeba-tfr/{train,validation}/*.tfrecords``, else ``images/*.png|jpg``, else
            ``celeba-tfr.tar``.
        out_dir: parent of the prepared dataset folder.
        download: fetch a missing raw file from its URL (verified, then renamed into place);
            if False, a missing file raises an error saying where to put it.
        seed: seed of the ``digits`` train/valid/test permutation (recorded for every dataset).
        verify_checksums: compare raw files with their published checksums. Only tests of tiny
            generated files should turn this off; the sha256 of every input is recorded either way.
        image_size: ``celeba256`` image side (256 for the real data; smaller for tests).
        celeba_split: ``celeba256`` (train, valid) counts, (27000, 3000) for the real data.
        accept_sha256: raw file name -> sha256 the user vouches for (``--accept-sha256 FILE=HEX``): such a file
            is accepted with exactly that checksum instead of the published one, recorded in the manifest, with a
            warning.

    Temp folders of an earlier call that was killed (``.NAME.tmp-*``, ``.NAME.old-*`` whose writer is gone) are
    removed first.

    Returns:
        The prepared dataset folder.

    Raises:
        ValueError: unknown ``name`` or bad argument.
        RawFileMissingError: a raw file is missing (message: full path and URL).
        ChecksumMismatchError, RawFormatError: corrupt, truncated or wrong-format raw file.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name={name!r} is not a known dataset; allowed: {', '.join(DATASET_NAMES)}")
    if image_size < 1 or len(celeba_split) != 2 or min(celeba_split) < 1:
        raise ValueError(f"image_size={image_size}, celeba_split={celeba_split}: need positive values")
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    accept = dict(accept_sha256 or {})
    unknown = sorted(set(accept) - {raw.filename for raw in RAW_FILES.get(name, ())})
    if unknown:
        raise ValueError(f"--accept-sha256 names {unknown}, which are not raw files of {name}; allowed: "
                         f"{[raw.filename for raw in RAW_FILES.get(name, ())]}")
    require_raw_files(name, raw_dir / name, download)
    target = out_dir / name
    created_out_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir, name)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    (tmp_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    ctx = _Context(name, raw_dir / name, tmp_dir, download, verify_checksums, seed, image_size, tuple(celeba_split),
                   accept)
    try:
        built = _BUILDERS[name](ctx)
        _write_outputs(ctx, built)
        built.splits.clear()  # release memmaps before renaming
        (tmp_dir / _OWNER_FILE).unlink()
        replace_dir(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_out_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return target

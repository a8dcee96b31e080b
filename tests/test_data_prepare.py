"""`prepare_dataset` on tiny raw files written in the real formats (docs/algorithm.md §8)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    encode_example,
    tree_snapshot,
    write_celeba_tfr,
    write_cifar10,
    write_idx_gz,
    write_image_folder,
    write_mnist,
    write_omniglot,
)

from lsgm.data import (
    ChecksumMismatchError,
    RawFile,
    RawFileMissingError,
    RawFormatError,
    formats,
    load_split,
    prepare_dataset,
)
from lsgm.data.prepare import DIGITS_SPLIT, UnverifiedRawFileWarning, download_raw_file

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::lsgm.data.prepare.UnverifiedRawFileWarning")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_manifest(folder: Path, name: str, max_value: int, counts: dict[str, int]) -> dict:
    """Manifest matches the files: recomputed sha256, counts, shapes; nothing else in the folder."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dataset"] == name and manifest["format_version"] == 1
    assert manifest["dtype"] == "uint8" and manifest["max_value"] == max_value
    assert {s: m["count"] for s, m in manifest["splits"].items()} == counts
    labelled = [s for s, m in manifest["splits"].items() if m.get("labels_file")]
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{s}.npy" for s in counts] + ["manifest.json"]
                                                              + [f"{s}_labels.npy" for s in labelled])
    for split, meta in manifest["splits"].items():
        path = folder / meta["file"]
        assert meta["sha256"] == _sha256(path)
        if meta.get("labels_file"):  # class labels beside the images (classifier features for FD)
            labels = np.load(folder / meta["labels_file"])
            assert meta["labels_sha256"] == _sha256(folder / meta["labels_file"])
            assert labels.shape == (counts[split],) and labels.max() < meta["num_classes"]
        arr = np.load(path, mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint8
        assert list(arr.shape) == meta["shape"] and arr.shape[0] == counts[split]
        assert arr.max() <= max_value
    return manifest


def _check_raw_inputs(manifest: dict, raw_folder: Path) -> None:
    for entry in manifest["raw_inputs"]:
        assert entry["sha256"] == _sha256(raw_folder / entry["file"])


def _no_leftovers(out_dir: Path) -> None:
    if out_dir.exists():
        assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# Format primitives
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data, expected",
    [
        (b"123456789", 0xE3069283),  # the standard CRC-32C check value
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_matches_published_vectors(data, expected):
    assert formats.crc32c_reference(data) == expected
    assert formats.crc32c(data) == expected


@pytest.mark.parametrize("n", [4096, 4097, 64 * 1000 + 13, 196_608])
def test_crc32c_fast_path_equals_table_driven(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert formats.crc32c(data) == formats.crc32c_reference(data)
    assert formats._crc32c_register_blocks(0xFFFFFFFF, np.frombuffer(data, np.uint8))[1] >= 4096


def test_example_parser_reads_packed_unpacked_and_negative_ints():
    for packed in (True, False):
        payload = encode_example({"shape": [256, 256, 3], "neg": [-5, 7], "data": b"\x00\x01\xff"}, packed=packed)
        feats = formats.parse_example(payload)
        assert feats == {"shape": [256, 256, 3], "neg": [-5, 7], "data": [b"\x00\x01\xff"]}


# ---------------------------------------------------------------------------------------------
# Each dataset, happy path
# ---------------------------------------------------------------------------------------------

def test_digits_split_sizes_values_and_seed(tmp_path):
    from sklearn.datasets import load_digits

    folder = prepare_dataset("digits", tmp_path / "raw", tmp_path / "prep", download=False, seed=0)
    n_train, n_valid, n_test = DIGITS_SPLIT
    assert (n_train, n_valid, n_test) == (1257, 270, 270)
    manifest = _check_manifest(folder, "digits", 16, {"train": n_train, "valid": n_valid, "test": n_test})
    assert manifest["seed"] == 0 and manifest["dynamic_binarisation"] is True
    splits = {s: np.load(folder / f"{s}.npy") for s in ("train", "valid", "test")}
    assert all(a.shape[1:] == (1, 8, 8) for a in splits.values())
    # the three splits are a partition of the 1,797 digits (compare as sorted rows)
    ours = np.concatenate(list(splits.values())).reshape(1797, 64)
    ref = load_digits().images.reshape(1797, 64).astype(np.uint8)
    assert np.array_equal(np.unique(ours, axis=0, return_counts=True)[1].sum(), 1797)
    assert np.array_equal(ours[np.lexsort(ours.T)], ref[np.lexsort(ref.T)])
    assert ours.max() == 16 and ours.min() == 0
    # same seed -> same bytes; another seed -> another split
    again = prepare_dataset("digits", tmp_path / "raw", tmp_path / "prep2", download=False, seed=0)
    assert _sha256(again / "train.npy") == _sha256(folder / "train.npy")
    other = prepare_dataset("digits", tmp_path / "raw", tmp_path / "prep3", download=False, seed=1)
    assert _sha256(other / "train.npy") != _sha256(folder / "train.npy")


def test_mnist_idx_padded_to_32(tmp_path):
    images = write_mnist(tmp_path / "raw", np.random.default_rng(0))
    folder = prepare_dataset("mnist", tmp_path / "raw", tmp_path / "prep", download=False, verify_checksums=False)
    manifest = _check_manifest(folder, "mnist", 255, {"train": 5, "test": 3})
    _check_raw_inputs(manifest, tmp_path / "raw" / "mnist")
    assert len(manifest["raw_inputs"]) == 4 and not any(e["verified"] for e in manifest["raw_inputs"])
    assert manifest["raw_inputs"][0]["expected"] == {"md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873"}
    for split in ("train", "test"):
        out = np.load(folder / f"{split}.npy")
        assert out.shape == (len(images[split]), 1, 32, 32)
        assert np.array_equal(out[:, 0, 2:30, 2:30], images[split])
        border = out.copy()
        border[:, :, 2:30, 2:30] = 0
        assert not border.any()


def test_omniglot_column_major_and_rounding(tmp_path):
    images = write_omniglot(tmp_path / "raw", np.random.default_rng(1))
    folder = prepare_dataset("omniglot", tmp_path / "raw", tmp_path / "prep", download=False, verify_checksums=False)
    manifest = _check_manifest(folder, "omniglot", 255, {"train": 6, "test": 4})
    _check_raw_inputs(manifest, tmp_path / "raw" / "omniglot")
    for split in ("train", "test"):
        out = np.load(folder / f"{split}.npy")
        assert out.shape == (len(images[split]), 1, 32, 32)
        assert np.array_equal(out[:, 0, 2:30, 2:30], np.rint(255 * images[split]).astype(np.uint8))
        assert out[:, :, :2].max() == 0 and out[:, :, :, 30:].max() == 0


def test_cifar10_tarball(tmp_path):
    expected = write_cifar10(tmp_path / "raw", np.random.default_rng(2))
    folder = prepare_dataset("cifar10", tmp_path / "raw", tmp_path / "prep", download=False, verify_checksums=False)
    manifest = _check_manifest(folder, "cifar10", 255, {"train": 15, "test": 4})
    _check_raw_inputs(manifest, tmp_path / "raw" / "cifar10")
    for split in ("train", "test"):
        assert np.array_equal(np.load(folder / f"{split}.npy"), expected[split])
    assert load_split(tmp_path / "prep", "cifar10", "train").images.shape == (15, 3, 32, 32)


@pytest.mark.parametrize("as_tar", [False, True])
def test_celeba_tfrecords(tmp_path, as_tar):
    expected = write_celeba_tfr(tmp_path / "raw", np.random.default_rng(3), size=4, as_tar=as_tar)
    with pytest.warns(UnverifiedRawFileWarning, match="no published checksum"):
        folder = prepare_dataset("celeba256", tmp_path / "raw", tmp_path / "prep", download=False,
                                 image_size=4, celeba_split=(6, 2))
    manifest = _check_manifest(folder, "celeba256", 255, {"train": 6, "valid": 2})
    _check_raw_inputs(manifest, tmp_path / "raw" / "celeba256")
    for split in ("train", "valid"):
        assert np.array_equal(np.load(folder / f"{split}.npy"), expected[split])


def test_celeba_image_folder_sorted_by_name(tmp_path):
    images = write_image_folder(tmp_path / "raw", np.random.default_rng(4), size=4, count=9)
    folder = prepare_dataset("celeba256", tmp_path / "raw", tmp_path / "prep", download=False,
                             image_size=4, celeba_split=(6, 2))
    manifest = _check_manifest(folder, "celeba256", 255, {"train": 6, "valid": 2})
    _check_raw_inputs(manifest, tmp_path / "raw" / "celeba256")
    assert np.array_equal(np.load(folder / "train.npy"), images[:6])
    assert np.array_equal(np.load(folder / "valid.npy"), images[6:8])


def test_celeba_split_count_mismatch_is_an_error(tmp_path):
    write_celeba_tfr(tmp_path / "raw", np.random.default_rng(5), size=4)
    with pytest.raises(RawFormatError, match="train split has 6 images, expected 7"):
        prepare_dataset("celeba256", tmp_path / "raw", tmp_path / "prep", download=False,
                        image_size=4, celeba_split=(7, 2))
    assert not (tmp_path / "prep").exists()


def test_rerun_replaces_output_atomically(tmp_path):
    write_mnist(tmp_path / "raw", np.random.default_rng(6))
    kw = {"download": False, "verify_checksums": False}
    first = prepare_dataset("mnist", tmp_path / "raw", tmp_path / "prep", **kw)
    before = _sha256(first / "train.npy")
    write_mnist(tmp_path / "raw", np.random.default_rng(7))
    second = prepare_dataset("mnist", tmp_path / "raw", tmp_path / "prep", **kw)
    assert second == first and _sha256(second / "train.npy") != before
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["mnist"]


# ---------------------------------------------------------------------------------------------
# Malformed inputs: clear error, no partial output, existing output untouched
# ---------------------------------------------------------------------------------------------

def _truncate_gz(raw: Path) -> None:
    path = raw / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])


def _wrong_idx_magic(raw: Path) -> None:
    write_idx_gz(raw / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), magic=0x00000804)


def _mat_without_data(raw: Path) -> None:
    write_omniglot(raw, np.random.default_rng(0), keys=("images", "testdata"))


def _tar_missing_batch(raw: Path) -> None:
    write_cifar10(raw, np.random.default_rng(0), omit="data_batch_3")


def _tfrecord_bad_crc(raw: Path) -> None:
    shard = sorted((raw / "celeba256" / "celeba-tfr" / "train").glob("*-r02-*"))[1]
    blob = bytearray(shard.read_bytes())
    blob[40] ^= 0x01  # flip one bit inside the first record's payload
    shard.write_bytes(bytes(blob))


def _image_wrong_size(raw: Path) -> None:
    from PIL import Image

    Image.new("RGB", (5, 4)).save(raw / "celeba256" / "images" / "img_00003.png")


MALFORMED = {
    "truncated gz": ("mnist", write_mnist, _truncate_gz, {}, "not a complete gzip file"),
    "wrong IDX magic": ("mnist", write_mnist, _wrong_idx_magic, {}, "magic number is 0x00000804, expected 0x00000803"),
    ".mat without data": ("omniglot", write_omniglot, _mat_without_data, {}, "array 'data' not found"),
    "tar missing a batch": ("cifar10", write_cifar10, _tar_missing_batch, {}, "batch 'data_batch_3' not found"),
    "tfrecord bad CRC": ("celeba256", write_celeba_tfr, _tfrecord_bad_crc,
                         {"image_size": 4, "celeba_split": (6, 2)}, "data CRC-32C mismatch"),
    "image of wrong size": ("celeba256", write_image_folder, _image_wrong_size,
                            {"image_size": 4, "celeba_split": (6, 2)}, "image is 5x4, expected 4x4"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_raw_file_gives_clear_error_and_no_partial_output(tmp_path, case):
    name, write, corrupt, kwargs, message = MALFORMED[case]
    raw, out = tmp_path / "raw", tmp_path / "prep"
    # a fresh output directory: nothing is left behind
    write(raw, np.random.default_rng(0))
    corrupt(raw)
    with pytest.raises(RawFormatError, match=message):
        prepare_dataset(name, raw, out, download=False, verify_checksums=False, **kwargs)
    assert not out.exists()
    # an existing good output is left exactly as it was
    write(raw, np.random.default_rng(1))
    prepare_dataset(name, raw, out, download=False, verify_checksums=False, **kwargs)
    before = tree_snapshot(out)
    corrupt(raw)
    with pytest.raises(RawFormatError, match=message):
        prepare_dataset(name, raw, out, download=False, verify_checksums=False, **kwargs)
    assert tree_snapshot(out) == before
    _no_leftovers(out)


def test_checksum_mismatch_with_verification_on(tmp_path):
    write_cifar10(tmp_path / "raw", np.random.default_rng(0))
    (tmp_path / "prep").mkdir()
    with pytest.raises(ChecksumMismatchError) as info:
        prepare_dataset("cifar10", tmp_path / "raw", tmp_path / "prep", download=False)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "expected c58f30108f718f92721af3b95e74349a" in msg
    assert list((tmp_path / "prep").iterdir()) == []


def test_missing_cifar_tarball_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(RawFileMissingError) as info:
        prepare_dataset("cifar10", tmp_path / "raw", tmp_path / "prep", download=False)
    msg = str(info.value)
    assert str((tmp_path / "raw" / "cifar10" / "cifar-10-python.tar.gz").resolve()) in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert not (tmp_path / "prep").exists()


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="name='cifar100' is not a known dataset; allowed: digits, mnist"):
        prepare_dataset("cifar100", tmp_path / "raw", tmp_path / "prep")


# ---------------------------------------------------------------------------------------------
# Downloads (through file:// URLs: the real urllib path, no network)
# ---------------------------------------------------------------------------------------------

def _source(tmp_path: Path) -> Path:
    src = tmp_path / "mirror" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3000))
    return src


def test_download_verifies_then_renames(tmp_path):
    src = _source(tmp_path)
    raw = RawFile("blob.bin", (src.as_uri(),), md5=hashlib.md5(src.read_bytes()).hexdigest())
    target = tmp_path / "raw" / "x" / "blob.bin"
    entry = download_raw_file(raw, target)
    assert target.read_bytes() == src.read_bytes() and entry["verified"] and entry["sha256"] == _sha256(src)
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path):
    src = _source(tmp_path)
    raw = RawFile("blob.bin", (src.as_uri(),), md5="0" * 32)
    target = tmp_path / "raw" / "x" / "blob.bin"
    with pytest.raises(ChecksumMismatchError, match="expected 0{32}"):
        download_raw_file(raw, target)
    assert list(target.parent.iterdir()) == []


def test_download_failure_says_where_to_put_the_file(tmp_path):
    url = (tmp_path / "nowhere" / "blob.bin").as_uri()
    target = tmp_path / "raw" / "x" / "blob.bin"
    with pytest.raises(RawFileMissingError) as info:
        download_raw_file(RawFile("blob.bin", (url,), md5="0" * 32), target)
    assert str(target.resolve()) in str(info.value) and url in str(info.value)
    assert list(target.parent.iterdir()) == []


def test_celeba_tar_members_are_streamed(tmp_path):
    """The tarball path reads shards without extracting them (nothing written next to the tar)."""
    write_celeba_tfr(tmp_path / "raw", np.random.default_rng(8), as_tar=True)
    with tarfile.open(tmp_path / "raw" / "celeba256" / "celeba-tfr.tar") as tar:
        assert any(n.endswith("-r02-s-0001-of-0002.tfrecords") for n in tar.getnames())
    prepare_dataset("celeba256", tmp_path / "raw", tmp_path / "prep", download=False, image_size=4,
                    celeba_split=(6, 2))
    assert sorted(p.name for p in (tmp_path / "raw" / "celeba256").iterdir()) == ["celeba-tfr.tar"]

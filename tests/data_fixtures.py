"""Writers of tiny raw dataset files in the real formats (IDX gz, .mat, CIFAR pickle tarball,
image folder, TFRecord shards of tf.train.Example), used by the data tests.

They are written from the format descriptions, independently of the readers in
``lsgm.data.formats``; only the CRC-32C is shared (it is checked against published test vectors).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from lsgm.data.formats import masked_crc32c


def tree_snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (dirs as 'dir'); {} if absent."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- MNIST ---------------------------------------------------------------------------------

def write_idx_gz(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """IDX: >I magic (0x0800 | ndim for uint8), >I per dimension, raw bytes; gzip-compressed."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist(raw_dir: Path, rng: np.random.Generator, n_train: int = 5, n_test: int = 3) -> dict:
    folder = raw_dir / "mnist"
    images = {"train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images[split])
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, len(images[split])))
    return images


# ---- OMNIGLOT --------------------------------------------------------------------------------

def write_omniglot(raw_dir: Path, rng: np.random.Generator, n_train: int = 6, n_test: int = 4,
                   keys: tuple[str, str] = ("data", "testdata")) -> dict:
    """chardata.mat with (784, N) arrays; column n is image n flattened in column-major order."""
    import scipy.io

    folder = raw_dir / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    images = {"train": rng.random((n_train, 28, 28)), "test": rng.random((n_test, 28, 28))}
    columns = {split: np.stack([im.flatten(order="F") for im in ims], axis=1) for split, ims in images.items()}
    scipy.io.savemat(folder / "chardata.mat", {keys[0]: columns["train"], keys[1]: columns["test"],
                                              "target": np.zeros((50, n_train))})
    return images


# ---- CIFAR-10 --------------------------------------------------------------------------------

def write_cifar10(raw_dir: Path, rng: np.random.Generator, per_batch: int = 3, n_test: int = 4,
                  omit: str | None = None) -> dict:
    """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5,test_batch} pickles of
    {b'batch_label', b'labels', b'data' (N, 3072) uint8, b'filenames'}."""
    folder = raw_dir / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, data in batches.items():
            if name == omit:
                continue
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, len(data))),
                                 b"data": data, b"filenames": [b"x.png"] * len(data)}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    return {"train": train, "test": batches["test_batch"].reshape(-1, 3, 32, 32)}


# ---- TFRecord / tf.train.Example -------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | list[int]], packed: bool = True) -> bytes:
    """Serialise a tf.train.Example with bytes features (BytesList) and int64-list features."""
    entries = b""
    for key, value in features.items():
        if isinstance(value, bytes):
            feature = _len_field(1, _len_field(1, value))  # Feature.bytes_list{value}
        elif packed:
            feature = _len_field(3, _len_field(1, b"".join(_varint(v) for v in value)))
        else:
            feature = _len_field(3, b"".join(_varint(1 << 3) + _varint(v) for v in value))
        entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))
    return _len_field(1, entries)


def tfrecord_frame(payload: bytes) -> bytes:
    """uint64 length | uint32 masked crc32c(length) | payload | uint32 masked crc32c(payload)."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def write_tfrecord(path: Path, images_chw: np.ndarray) -> None:
    """GLOW-style records: features shape=[H, W, C] (int64), data=raw uint8 HWC, label (int64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for image in images_chw:
            hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
            f.write(tfrecord_frame(encode_example({"shape": list(hwc.shape), "data": hwc.tobytes(), "label": [0]})))


def write_celeba_tfr(raw_dir: Path, rng: np.random.Generator, size: int = 4, n_train: int = 6,
                     n_valid: int = 2, as_tar: bool = False) -> dict:
    """celeba-tfr/{train,validation}/<split>-rNN-s-XXXX-of-YYYY.tfrecords, two shards per split
    (plus a decoy shard of another resolution that must be ignored)."""
    folder = raw_dir / "celeba256"
    images = {"train": rng.integers(0, 256, (n_train, 3, size, size), dtype=np.uint8),
              "valid": rng.integers(0, 256, (n_valid, 3, size, size), dtype=np.uint8)}
    res = int(np.log2(size))
    root = folder / "celeba-tfr"
    for split, sub in (("train", "train"), ("valid", "validation")):
        half = (len(images[split]) + 1) // 2
        for s, part in enumerate((images[split][:half], images[split][half:])):
            write_tfrecord(root / sub / f"{sub}-r{res:02d}-s-{s:04d}-of-0002.tfrecords", part)
        decoy = rng.integers(0, 256, (1, 3, 2 * size, 2 * size), dtype=np.uint8)
        write_tfrecord(root / sub / f"{sub}-r{res + 1:02d}-s-0000-of-0001.tfrecords", decoy)
    if as_tar:
        with tarfile.open(folder / "celeba-tfr.tar", "w") as tar:
            tar.add(root, arcname="celeba-tfr")
        import shutil

        shutil.rmtree(root)
    return images


def write_image_folder(raw_dir: Path, rng: np.random.Generator, size: int = 4, count: int = 9) -> np.ndarray:
    """celeba256/images/img_XXXXX.png RGB images (written in shuffled order; names define order)."""
    from PIL import Image

    folder = raw_dir / "celeba256" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    for i in rng.permutation(count):
        Image.fromarray(images[i].transpose(1, 2, 0)).save(folder / f"img_{i:05d}.png")
    return images

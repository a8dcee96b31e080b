"""Readers for the raw dataset formats of docs/algorithm.md §8, written from the format descriptions.

Every reader returns ``uint8`` arrays (or an iterator of them) and raises :class:`RawFormatError`
naming the file and what was expected when the bytes do not have the expected format:

* IDX (MNIST): big-endian header ``0x00 0x00 <dtype> <ndim>``, ``ndim`` uint32 sizes, raw data.
* ``chardata.mat`` (OMNIGLOT): arrays ``data`` / ``testdata`` of shape (784, N), each column a
  28x28 image in column-major (Fortran) order, floats in [0, 1].
* CIFAR-10 python pickles inside ``cifar-10-python.tar.gz``: dicts with ``b"data"`` (N, 3072) uint8
  (channel-major R, G, B planes of 32x32) and ``b"labels"``.
* TFRecord (CelebA-HQ-256, GLOW release): records framed as ``uint64 length | uint32 masked
  crc32c(length) | data | uint32 masked crc32c(data)`` (little endian); each record a serialised
  ``tf.train.Example`` with features ``shape`` (int64 list, HWC) and ``data`` (raw uint8 HWC bytes).
* A folder of square RGB images (PNG/JPEG) read with Pillow.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from lsgm.errors import LsgmError


class RawFormatError(LsgmError, ValueError):
    """A raw dataset file is truncated, corrupt or not in the expected format."""


# ----------------------------------------------------------------------------------------------
# IDX (MNIST)
# ----------------------------------------------------------------------------------------------

#: IDX magic numbers (big-endian uint32): 0x08 = unsigned byte, last byte = number of dimensions.
IDX_MAGIC_IMAGES = 0x00000803
IDX_MAGIC_LABELS = 0x00000801


def read_idx_gz(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file (MNIST) into a uint8 array.

    Args:
        path: the ``*-idx?-ubyte.gz`` file.
        expected_magic: :data:`IDX_MAGIC_IMAGES` (N, 28, 28) or :data:`IDX_MAGIC_LABELS` (N,).

    Returns:
        uint8 array with the shape given in the IDX header.

    Raises:
        RawFormatError: truncated or invalid gzip stream, wrong magic number, or a payload whose
            length does not match the header.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise RawFormatError(
            f"{path}: not a complete gzip file ({type(e).__name__}: {e}); "
            "expected a gzip-compressed IDX file: delete it and download it again"
        ) from e
    if len(raw) < 4:
        raise RawFormatError(f"{path}: IDX payload has {len(raw)} bytes, expected at least a 4-byte header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise RawFormatError(
            f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images, uint8, 3 dims' if expected_magic == IDX_MAGIC_IMAGES else 'labels, uint8, 1 dim'})"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise RawFormatError(f"{path}: IDX header truncated ({len(raw)} bytes, need {header_len})")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise RawFormatError(
            f"{path}: IDX payload has {payload} bytes, header shape {tuple(shape)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


# ----------------------------------------------------------------------------------------------
# chardata.mat (OMNIGLOT)
# ----------------------------------------------------------------------------------------------

def read_omniglot_mat(path: Path) -> dict[str, np.ndarray]:
    """Read ``chardata.mat`` into uint8 images.

    Each column of ``data`` (train) and ``testdata`` (test) is a 784-vector holding a 28x28 image
    in column-major order (docs/algorithm.md §8); intensities v in [0, 1] are stored as ``round(255 v)``.

    Returns:
        ``{"train": (N_train, 28, 28) uint8, "test": (N_test, 28, 28) uint8}``.

    Raises:
        RawFormatError: unreadable .mat, missing array, wrong shape or values outside [0, 1].
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises ValueError / TypeError / MatReadError on garbage
        raise RawFormatError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from e
    out = {}
    for key, split in (("data", "train"), ("testdata", "test")):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise RawFormatError(f"{path}: array '{key}' not found (found {found}); expected 'data' and 'testdata'")
        arr = np.asarray(mat[key])
        if arr.ndim != 2 or arr.shape[0] != 784:
            raise RawFormatError(f"{path}: array '{key}' has shape {arr.shape}, expected (784, N)")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise RawFormatError(f"{path}: array '{key}' has values outside [0, 1]")
        # column n -> 28x28 in Fortran order == row-major reshape followed by a transpose.
        images = arr.T.reshape(-1, 28, 28).transpose(0, 2, 1)
        out[split] = np.rint(images * 255.0).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python pickles
# ----------------------------------------------------------------------------------------------

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays (no arbitrary code)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _cifar_batch_array(obj: Any, where: str) -> np.ndarray:
    if not isinstance(obj, dict):
        raise RawFormatError(f"{where}: expected a dict, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise RawFormatError(f"{where}: dict lacks b'data' or b'labels' (keys {sorted(map(str, obj))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise RawFormatError(f"{where}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(labels) != data.shape[0]:
        raise RawFormatError(f"{where}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32)


def read_cifar10_tar(path: Path) -> dict[str, np.ndarray]:
    """Read ``cifar-10-python.tar.gz``.

    Returns:
        ``{"train": (50000, 3, 32, 32) uint8 (data_batch_1..5 in order), "test": (10000, 3, 32, 32)}``
        (counts are whatever the batches hold).

    Raises:
        RawFormatError: unreadable archive, a missing batch, or a malformed batch.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            out = {}
            for split, names in (("train", CIFAR_TRAIN_BATCHES), ("test", CIFAR_TEST_BATCHES)):
                arrays = []
                for name in names:
                    if name not in members:
                        raise RawFormatError(
                            f"{path}: batch '{name}' not found in the archive; expected "
                            f"cifar-10-batches-py/{{{', '.join(CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES)}}}"
                        )
                    blob = tar.extractfile(members[name]).read()
                    where = f"{path}:{members[name].name}"
                    try:
                        obj = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
                    except Exception as e:
                        raise RawFormatError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e
                    arrays.append(_cifar_batch_array(obj, where))
                out[split] = np.concatenate(arrays, axis=0)
            return out
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise RawFormatError(f"{path}: not a complete tar.gz archive ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), table driven, with a numpy-vectorised path for long buffers
# ----------------------------------------------------------------------------------------------

_CRC32C_POLY_REFLECTED = 0x82F63B78


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY_REFLECTED if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


CRC32C_TABLE = _make_crc32c_table()
_CRC32C_TABLE_NP = np.array(CRC32C_TABLE, dtype=np.uint32)


def crc32c_reference(data: bytes) -> int:
    """CRC-32C of ``data``: byte-at-a-time table lookup (init and final xor 0xFFFFFFFF)."""
    crc = 0xFFFFFFFF
    table = CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# A linear map M on 32-bit CRC registers is stored as four 256-entry tables so that
# M(s) = t0[s & 255] ^ t1[(s >> 8) & 255] ^ t2[(s >> 16) & 255] ^ t3[s >> 24].

def _apply_columns(cols: tuple[int, ...], s: int) -> int:
    out = 0
    j = 0
    while s:
        if s & 1:
            out ^= cols[j]
        s >>= 1
        j += 1
    return out


@cache
def _zero_shift_columns(n_bytes: int) -> tuple[int, ...]:
    """Columns of the map s -> register after feeding ``n_bytes`` zero bytes (n a power of two)."""
    if n_bytes == 1:
        cols = []
        for j in range(32):
            s = 1 << j
            cols.append(CRC32C_TABLE[s & 0xFF] ^ (s >> 8))
        return tuple(cols)
    half = _zero_shift_columns(n_bytes // 2)
    return tuple(_apply_columns(half, c) for c in half)


@cache
def _zero_shift_tables(n_bytes: int) -> np.ndarray:
    cols = _zero_shift_columns(n_bytes)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for v in range(256):
            tables[k, v] = _apply_columns(cols, v << (8 * k))
    return tables


def _apply_tables(tables: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (
        tables[0][s & 0xFF] ^ tables[1][(s >> 8) & 0xFF] ^ tables[2][(s >> 16) & 0xFF] ^ tables[3][s >> 24]
    )


_ROW_BYTES = 64  # chunk length fed column-by-column across all chunks at once


def _crc32c_register_blocks(register: int, buf: np.ndarray) -> tuple[int, int]:
    """Feed the largest prefix of ``buf`` made of 2^k chunks of 64 bytes; return (register, used)."""
    n_rows = len(buf) // _ROW_BYTES
    n_rows = 1 << (n_rows.bit_length() - 1)
    used = n_rows * _ROW_BYTES
    rows = buf[:used].reshape(n_rows, _ROW_BYTES).T.copy()  # (64, n_rows), column j = byte j of every row
    r = np.zeros(n_rows, dtype=np.uint32)
    for j in range(_ROW_BYTES):
        r = _CRC32C_TABLE_NP[(r ^ rows[j]) & 0xFF] ^ (r >> 8)
    # r[i] = register after feeding row i from a zero register; combine pairwise, since
    # reg(s, A||B) = Z^{|B|} reg(s, A) ^ reg(0, B) with Z the "feed one zero byte" map (linear).
    length = _ROW_BYTES
    while len(r) > 1:
        r = _apply_tables(_zero_shift_tables(length), r[0::2]) ^ r[1::2]
        length *= 2
    shifted = int(_apply_tables(_zero_shift_tables(used), np.array([register], dtype=np.uint32))[0])
    return shifted ^ int(r[0]), used


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, as used by TFRecord framing) of ``data``.

    Uses the ``google_crc32c`` C extension when it is installed; otherwise the table-driven
    algorithm of :func:`crc32c_reference`, vectorised with numpy for long buffers (same result).
    """
    if _google_crc32c is not None:
        return int(_google_crc32c.value(bytes(data)))
    if len(data) < 4096:
        return crc32c_reference(data)
    buf = np.frombuffer(data, dtype=np.uint8)
    register, pos = 0xFFFFFFFF, 0
    while len(buf) - pos >= 4096:
        register, used = _crc32c_register_blocks(register, buf[pos:])
        pos += used
    table = CRC32C_TABLE
    for b in data[pos:]:
        register = table[(register ^ b) & 0xFF] ^ (register >> 8)
    return register ^ 0xFFFFFFFF


try:  # optional C accelerator; never required
    import google_crc32c as _google_crc32c  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _google_crc32c = None


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` modulo 2^32."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# TFRecord + tf.train.Example (protobuf wire format), no tensorflow
# ----------------------------------------------------------------------------------------------

def iter_tfrecords(stream: IO[bytes], name: str, verify_crc: bool = True) -> Iterator[bytes]:
    """Yield the payload of every record of a TFRecord stream.

    Args:
        stream: binary file object positioned at the first record.
        name: file name used in error messages.
        verify_crc: check both masked CRC-32C fields of every record.

    Raises:
        RawFormatError: truncated record or CRC mismatch (naming the record index).
    """
    index = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise RawFormatError(f"{name}: record {index} header truncated ({len(header)} of 12 bytes)")
        length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
        if verify_crc and masked_crc32c(length_bytes) != length_crc:
            raise RawFormatError(f"{name}: record {index}: length CRC-32C mismatch (corrupt file)")
        (length,) = struct.unpack("<Q", length_bytes)
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise RawFormatError(f"{name}: record {index} truncated (expected {length} data bytes + 4 CRC bytes)")
        if verify_crc and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise RawFormatError(f"{name}: record {index}: data CRC-32C mismatch (corrupt file)")
        yield data
        index += 1


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield field, wire, value


def _to_int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _parse_feature(buf: bytes) -> list:
    for field, wire, value in _iter_fields(buf):
        if field == 1 and wire == 2:  # BytesList
            return [v for f, w, v in _iter_fields(value) if f == 1 and w == 2]
        if field == 2 and wire == 2:  # FloatList (packed or not)
            floats: list[float] = []
            for f, w, v in _iter_fields(value):
                if f == 1 and w == 2:
                    floats.extend(struct.unpack(f"<{len(v) // 4}f", v))
                elif f == 1 and w == 5:
                    floats.append(struct.unpack("<f", v)[0])
            return floats
        if field == 3 and wire == 2:  # Int64List (packed or not)
            ints: list[int] = []
            for f, w, v in _iter_fields(value):
                if f == 1 and w == 2:
                    p = 0
                    while p < len(v):
                        u, p = _read_varint(v, p)
                        ints.append(_to_int64(u))
                elif f == 1 and w == 0:
                    ints.append(_to_int64(v))
            return ints
    return []


def parse_example(buf: bytes) -> dict[str, list]:
    """Parse a serialised ``tf.train.Example`` into ``{feature name: list of values}``.

    Example{features=1: Features{feature=1: map<string, Feature>}}; Feature is a oneof of
    bytes_list=1, float_list=2, int64_list=3, each a message with ``repeated value = 1``.
    """
    features: dict[str, list] = {}
    for field, wire, value in _iter_fields(buf):
        if field != 1 or wire != 2:
            continue
        for f2, w2, entry in _iter_fields(value):
            if f2 != 1 or w2 != 2:
                continue
            key, feat = None, b""
            for f3, w3, v3 in _iter_fields(entry):
                if f3 == 1 and w3 == 2:
                    key = v3.decode("utf-8")
                elif f3 == 2 and w3 == 2:
                    feat = v3
            if key is not None:
                features[key] = _parse_feature(feat)
    return features


def example_to_image(payload: bytes, where: str) -> np.ndarray:
    """Decode a GLOW CelebA Example (``shape`` = [H, W, C], ``data`` = raw uint8 HWC) to (C, H, W)."""
    try:
        feats = parse_example(payload)
    except ValueError as e:
        raise RawFormatError(f"{where}: not a valid tf.train.Example ({e})") from e
    shape, data = feats.get("shape"), feats.get("data")
    if not shape or not data or len(shape) != 3:
        raise RawFormatError(f"{where}: Example lacks an int64 'shape' [H, W, C] or a bytes 'data' feature")
    h, w, c = shape
    if len(data[0]) != h * w * c:
        raise RawFormatError(f"{where}: 'data' has {len(data[0])} bytes, shape {shape} needs {h * w * c}")
    return np.frombuffer(data[0], dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_image_files(folder: Path) -> list[Path]:
    """Image files (PNG/JPEG, case-insensitive suffix) directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb_image(path: Path, size: int) -> np.ndarray:
    """Read one image as uint8 (3, size, size); its size must already be ``size`` x ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.size != (size, size):
                raise RawFormatError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise RawFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return arr.transpose(2, 0, 1)

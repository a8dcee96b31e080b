"""Datasets (docs/algorithm.md §8): preparation of the raw formats and loading of the prepared arrays.

``prepare_dataset(name)`` writes ``data/prepared/<name>/{train,valid,test}.npy`` + ``manifest.json``
(see :mod:`lsgm.data.prepare` for the format); :mod:`lsgm.data.loader` maps them back, applies the
load-time preprocessing and orders batches reproducibly.
"""

from lsgm.data.formats import RawFormatError
from lsgm.data.loader import BatchIterator, PreparedSplit, load_split, preprocess, reduce_bits
from lsgm.data.prepare import (
    BINARISED_DATASETS,
    DATASET_NAMES,
    FORMAT_VERSION,
    RAW_FILES,
    ChecksumMismatchError,
    DatasetError,
    RawFile,
    RawFileMissingError,
    prepare_dataset,
)

__all__ = [
    "BINARISED_DATASETS",
    "DATASET_NAMES",
    "FORMAT_VERSION",
    "RAW_FILES",
    "BatchIterator",
    "ChecksumMismatchError",
    "DatasetError",
    "PreparedSplit",
    "RawFile",
    "RawFileMissingError",
    "RawFormatError",
    "load_split",
    "prepare_dataset",
    "preprocess",
    "reduce_bits",
]

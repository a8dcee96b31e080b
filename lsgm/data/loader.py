"""Loading prepared datasets: splits, load-time preprocessing (docs/algorithm.md §8, §1.6) and batch order.

* :func:`load_split` maps ``<prepared_root>/<name>/<split>.npy`` (written by
  :func:`lsgm.data.prepare.prepare_dataset`) as a uint8 (N, C, H, W) tensor without reading it.
* :func:`preprocess` turns a uint8 batch into floats in [0, 1]: random horizontal flip, then either
  dynamic binarisation ``x ~ Bernoulli(intensity)`` or the ``num_x_bits`` reduction.
  (The model maps [0, 1] to [-1, 1] itself, docs/algorithm.md §1.6.)
* :class:`BatchIterator` yields index batches: a seeded per-epoch permutation, sharded across ranks
  like ``DistributedSampler``, resumable mid-epoch through ``state_dict``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class PreparedSplit:
    """One split of a prepared dataset.

    Attributes:
        name: dataset name.
        split: ``train``, ``valid`` or ``test``.
        images: uint8 tensor (N, C, H, W), memory-mapped copy-on-write from the ``.npy`` file
            (pages are read on access; writes never reach the file).
        max_value: the level that means intensity 1 (16 for digits, 255 otherwise).
        manifest: the dataset's ``manifest.json``.
        labels: (N,) int64 class labels, or None.
    """

    name: str
    split: str
    images: torch.Tensor
    max_value: int
    manifest: dict[str, Any]
    labels: torch.Tensor | None = None  # (N,) class labels where the dataset has them (digits, MNIST, Fashion-MNIST)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) at ``indices`` (a 1-D integer tensor), copied into memory."""
        return self.images.index_select(0, indices.to(torch.long).cpu())


def load_split(prepared_root: str | Path, name: str, split: str) -> PreparedSplit:
    """Open ``<prepared_root>/<name>/<split>.npy`` and its manifest.

    Args:
        prepared_root: the ``out_dir`` given to ``prepare_dataset`` (``data/prepared``).
        name: dataset name, e.g. ``"mnist"``.
        split: ``"train"``, ``"valid"`` or ``"test"``; must exist for the dataset.

    Raises:
        FileNotFoundError: the dataset is not prepared (says to run ``lsgm prepare NAME``).
        ValueError: unknown split, or a file that does not match its manifest.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    folder = Path(prepared_root) / name
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"dataset '{name}' is not prepared: {manifest_path.resolve()} not found. "
            f"Run `lsgm prepare {name}` (writing into {Path(prepared_root).resolve()}) first."
        )
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest["splits"]:
        raise ValueError(f"split={split!r} does not exist for '{name}'; it has {', '.join(manifest['splits'])}")
    meta = manifest["splits"][split]
    # copy-on-write mapping: a writable view (torch needs one) that never modifies the file
    array = np.load(folder / meta["file"], mmap_mode="c")
    if array.dtype != np.uint8 or list(array.shape) != meta["shape"]:
        raise ValueError(f"{folder / meta['file']}: {array.dtype} {array.shape} does not match the manifest "
                         f"(uint8 {meta['shape']}); run `lsgm prepare {name}` again")
    labels = None
    if meta.get("labels_file"):
        raw_labels = np.load(folder / meta["labels_file"])
        if raw_labels.shape != (array.shape[0],):
            raise ValueError(f"{folder / meta['labels_file']}: {raw_labels.shape} labels for {array.shape[0]} images; "
                             f"run `lsgm prepare {name}` again")
        labels = torch.from_numpy(raw_labels.astype(np.int64))
    return PreparedSplit(name, split, torch.from_numpy(array), int(manifest["max_value"]), manifest, labels)


def reduce_bits(levels: torch.Tensor, num_x_bits: int) -> torch.Tensor:
    """docs/algorithm.md §1.6 bit reduction of 8-bit levels k: ``floor(255 x / 2^(8-b)) / (2^b - 1)`` with x = k/255.

    Computed on the integer levels (``floor(k / 2^(8-b))``) so that no float rounding can move a
    level across a bin edge. For b = 5: ``floor(k / 8) / 31``.

    Args:
        levels: uint8 tensor of 8-bit levels 0..255.
        num_x_bits: b in 1..8.

    Returns:
        float32 tensor in [0, 1] with ``2^b`` distinct possible values.
    """
    if not 1 <= num_x_bits <= 8:
        raise ValueError(f"num_x_bits={num_x_bits} is not allowed; allowed: 1..8")
    shifted = torch.bitwise_right_shift(levels.to(torch.uint8), 8 - num_x_bits)
    return shifted.to(torch.float32) / float(2**num_x_bits - 1)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (B, C, H, W) left-right with probability 1/2 (one uniform draw per image)."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(flip, images.flip(-1), images)


def preprocess(
    images_uint8: torch.Tensor,
    *,
    max_value: int,
    binarize: bool,
    num_x_bits: int,
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Load-time preprocessing of a batch (docs/algorithm.md §8 and §1.6).

    Order: optional random horizontal flip; then intensity ``x = k / max_value``; then either
    dynamic binarisation ``x ~ Bernoulli(x)`` (re-drawn on every call; digits, MNIST, OMNIGLOT) or
    the ``num_x_bits`` reduction (requires 8-bit data unless ``num_x_bits == 8``, which is the
    identity). Random numbers come only from ``generator``: first B uniforms for the flip (if
    ``flip``), then the Bernoulli draws (if ``binarize``).

    Args:
        images_uint8: uint8 levels (B, C, H, W), values in 0..max_value.
        max_value: level meaning intensity 1 (16 for digits, 255 otherwise).
        binarize: apply dynamic binarisation.
        num_x_bits: bits kept (8 for CIFAR-10, 5 for CelebA-HQ-256); ignored when binarising.
        flip: random horizontal flip (training only in the paper's setups).
        generator: torch.Generator on the device of ``images_uint8``.

    Returns:
        float32 tensor (B, C, H, W) in [0, 1] ({0, 1} when binarising).
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"images_uint8 must be a uint8 (B, C, H, W) tensor, got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    if not 1 <= max_value <= 255:
        raise ValueError(f"max_value={max_value} is not allowed; allowed: 1..255")
    if not 1 <= num_x_bits <= 8:
        raise ValueError(f"num_x_bits={num_x_bits} is not allowed; allowed: 1..8")
    x = random_hflip(images_uint8, generator) if flip else images_uint8
    if binarize:
        intensity = x.to(torch.float32) / float(max_value)
        return torch.bernoulli(intensity, generator=generator)
    if num_x_bits == 8:
        return x.to(torch.float32) / float(max_value)
    if max_value != 255:
        raise ValueError(f"num_x_bits={num_x_bits} needs 8-bit data (max_value=255), got max_value={max_value}; "
                         "use num_x_bits=8 or binarize=True")
    return reduce_bits(x, num_x_bits)


def dequantize_levels(images_uint8: torch.Tensor, *, max_value: int, flip: bool, generator: torch.Generator
                      ) -> torch.Tensor:
    """Uniformly dequantised intensities ``(k + u)/(max_value + 1)`` in [0, 1), ``u ~ U[0, 1)`` per element
    (random flip first, as :func:`preprocess`)."""
    x = random_hflip(images_uint8, generator) if flip else images_uint8
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    return (x.to(torch.float32) + u) / float(max_value + 1)


def to_model_input(split: PreparedSplit, idx: torch.Tensor, data: Any, generator: torch.Generator,
                   device: torch.device, *, channels_last: bool = False, flip: bool | None = None,
                   dequantize: bool = False) -> torch.Tensor:
    """Images ``idx`` of ``split`` as the VAE sees them: :func:`preprocess` (flip, binarisation or bit reduction,
    by the ``data`` config section), then ``x ↦ 2x − 1`` into [−1, 1] (docs/algorithm.md §1.6), on ``device``.

    Args:
        split: the prepared split.
        idx: item indices (1-D).
        data: the experiment's ``data`` section (:class:`lsgm.config.DataConfig`).
        generator: RNG of the flip and binarisation draws (CPU, like the uint8 images).
        device: where the model runs.
        channels_last: return NHWC memory format (the VAE's CPU fast path).
        flip: override ``data.flip`` (evaluation never flips).
        dequantize: uniform dequantisation for a density model on pixels (the data-space score model):
            ``x = (k + u)/L``, ``u ~ U[0, 1)``, with ``L = max_value + 1`` levels (docs/algorithm.md §7.1).
    """
    if dequantize:
        x = dequantize_levels(split.batch(idx), max_value=split.max_value, flip=data.flip if flip is None else flip,
                              generator=generator)
    else:
        x = preprocess(split.batch(idx), max_value=split.max_value, binarize=data.binarize,
                       num_x_bits=data.num_x_bits, flip=data.flip if flip is None else flip, generator=generator)
    x = (2.0 * x - 1.0).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that depends on both ``seed`` and ``epoch`` (no seed+epoch aliasing)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class BatchIterator:
    """Index batches for one rank; one ``iter()`` runs (the rest of) one epoch.

    The order of epoch e is ``randperm(num_items)`` drawn from a generator seeded by (seed, e)
    (identity order without ``shuffle``), so it is the same on every rank and every run. Rank r
    takes positions ``r, r + W, r + 2W, ...`` of that order (W = world_size), as DistributedSampler:

    * ``drop_last=True`` (training): the order is first cut to ``W * floor(N / W)`` items so every
      rank has the same count, and only full batches are yielded.
    * ``drop_last=False`` (evaluation): every item is seen exactly once across ranks (no padding
      with duplicates, unlike DistributedSampler); a rank's last batch may be partial and rank
      shares differ by at most one item.

    ``state_dict()`` holds (epoch, batches already yielded in that epoch); after
    ``load_state_dict`` the next ``iter()`` continues exactly where the saved one stopped.
    """

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1:
            raise ValueError(f"num_items={num_items} is not allowed; need >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not allowed; need >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise ValueError(f"batch_size={batch_size} with num_items={num_items}, world_size={world_size} and "
                             "drop_last=True gives no batch; use a smaller batch_size")

    def _rank_count(self) -> int:
        if self.drop_last:
            return self.num_items // self.world_size
        return len(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self._rank_count()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's item indices for ``epoch``, in order (int64, 1-D)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        if self.drop_last:
            order = order[: self.world_size * (self.num_items // self.world_size)]
        return order[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next ``iter()``."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} is not allowed; need >= 0")
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.epoch_indices(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            batch = indices[start : start + self.batch_size]
            self.position += 1  # counted as consumed once handed out
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int | bool]:
        """Resumable state: (epoch, position) plus the settings that define the order."""
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (epoch, position); the order-defining settings must match this iterator's."""
        for key in ("num_items", "batch_size", "shuffle", "drop_last", "seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state[{key!r}]={state[key]!r} does not match this iterator's {key}="
                                 f"{getattr(self, key)!r}; the batch order would differ")
        if not 0 <= int(state["position"]) <= len(self) or int(state["epoch"]) < 0:
            raise ValueError(f"state epoch={state['epoch']}, position={state['position']} is out of range "
                             f"(0 <= position <= {len(self)})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

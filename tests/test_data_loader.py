"""Loading prepared splits, load-time preprocessing (docs/algorithm.md §8, §1.6) and the resumable batch order."""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import pytest
import torch
from data_fixtures import write_mnist

from lsgm.data import BatchIterator, load_split, prepare_dataset, preprocess, reduce_bits

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# load_split
# ---------------------------------------------------------------------------------------------

def test_load_split_maps_the_prepared_array(tmp_path):
    write_mnist(tmp_path / "raw", np.random.default_rng(0))
    folder = prepare_dataset("mnist", tmp_path / "raw", tmp_path / "prep", download=False, verify_checksums=False)
    split = load_split(tmp_path / "prep", "mnist", "test")
    assert split.images.dtype == torch.uint8 and split.images.shape == (3, 1, 32, 32) and len(split) == 3
    assert split.max_value == 255 and split.manifest["dataset"] == "mnist"
    assert torch.equal(split.images, torch.from_numpy(np.load(folder / "test.npy")))
    batch = split.batch(torch.tensor([2, 0]))
    assert torch.equal(batch, split.images[[2, 0]])
    batch[0] += 1  # copies: neither the mapping nor the file changes
    assert torch.equal(split.images, torch.from_numpy(np.load(folder / "test.npy")))


def test_load_split_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run `lsgm prepare cifar10`"):
        load_split(tmp_path, "cifar10", "train")


def test_load_split_rejects_missing_or_unknown_split(tmp_path):
    write_mnist(tmp_path / "raw", np.random.default_rng(0))
    prepare_dataset("mnist", tmp_path / "raw", tmp_path / "prep", download=False, verify_checksums=False)
    with pytest.raises(ValueError, match="split='valid' does not exist for 'mnist'; it has train, test"):
        load_split(tmp_path / "prep", "mnist", "valid")
    with pytest.raises(ValueError, match="split='val' is not allowed; allowed: train, valid, test"):
        load_split(tmp_path / "prep", "mnist", "val")


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------

def test_dynamic_binarisation_statistics():
    """x ~ Bernoulli(k / max_value): values exactly {0, 1}, mean of many draws = intensity."""
    levels = torch.arange(17, dtype=torch.uint8)[torch.arange(64) % 17].view(1, 1, 8, 8)
    n_draws = 4000
    batch = levels.expand(n_draws, 1, 8, 8).contiguous()
    g = torch.Generator().manual_seed(0)
    x = preprocess(batch, max_value=16, binarize=True, num_x_bits=8, flip=False, generator=g)
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    p = levels[0, 0].double() / 16
    mean = x.double().mean(0)[0]
    sigma = torch.sqrt(p * (1 - p) / n_draws)
    assert torch.all((mean - p).abs() <= 5 * sigma + 1e-12)  # exact at p in {0, 1}
    assert torch.all(mean[p == 0] == 0) and torch.all(mean[p == 1] == 1)
    # dynamic: a second call draws anew; the same generator seed reproduces the draws
    x2 = preprocess(batch, max_value=16, binarize=True, num_x_bits=8, flip=False, generator=g)
    assert not torch.equal(x, x2)
    x3 = preprocess(batch, max_value=16, binarize=True, num_x_bits=8, flip=False,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x3)


def test_five_bit_levels_match_spec_formula():
    """docs/algorithm.md §1.6: floor(255 x / 2^(8-b)) / (2^b - 1); for b = 5 that is floor(k / 8) / 31."""
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = preprocess(k, max_value=255, binarize=False, num_x_bits=5, flip=False, generator=torch.Generator())
    k64 = np.arange(256, dtype=np.float64)
    expected = np.floor(k64 / 8) / 31
    assert np.array_equal(x.flatten().double().numpy(), expected.astype(np.float32).astype(np.float64))
    assert len(x.unique()) == 32 and x.min() == 0 and x.max() == 1
    # the same through the float formula on x = k/255 (a margin keeps float rounding off bin edges)
    assert np.array_equal(np.floor(255 * (k64 / 255) / 8 + 1e-9) / 31, expected)
    for bits in range(1, 9):
        levels = reduce_bits(k, bits).unique()
        assert len(levels) == 2**bits and torch.allclose(levels * (2**bits - 1), levels.mul(2**bits - 1).round())


def test_eight_bit_is_k_over_max_value():
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = preprocess(k, max_value=255, binarize=False, num_x_bits=8, flip=False, generator=torch.Generator())
    assert torch.equal(x.flatten(), torch.arange(256, dtype=torch.float32) / 255)
    d = torch.arange(17, dtype=torch.uint8).view(1, 1, 1, 17)
    assert torch.equal(preprocess(d, max_value=16, binarize=False, num_x_bits=8, flip=False,
                                  generator=torch.Generator()).flatten(), torch.arange(17.0) / 16)
    with pytest.raises(ValueError, match="num_x_bits=5 needs 8-bit data"):
        preprocess(d, max_value=16, binarize=False, num_x_bits=5, flip=False, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_x_bits=9 is not allowed; allowed: 1..8"):
        preprocess(k, max_value=255, binarize=False, num_x_bits=9, flip=False, generator=torch.Generator())


def test_random_flip_mirrors_about_half_of_the_images():
    images = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = preprocess(images, max_value=255, binarize=False, num_x_bits=8, flip=True,
                   generator=torch.Generator().manual_seed(2))
    ref = images.float() / 255
    same = (x == ref).flatten(1).all(1)
    mirrored = (x == ref.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # random images are never their own mirror image
    assert abs(mirrored.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 400)
    again = preprocess(images, max_value=255, binarize=False, num_x_bits=8, flip=True,
                       generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, again)


# ---------------------------------------------------------------------------------------------
# BatchIterator
# ---------------------------------------------------------------------------------------------

def _collect(it: BatchIterator, n_epochs: int) -> list[list[int]]:
    return [b.tolist() for _ in range(n_epochs) for b in it]


def test_lengths_and_unshuffled_order():
    it = BatchIterator(10, 3, shuffle=False, drop_last=False, seed=0)
    assert len(it) == 4 and _collect(it, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    it = BatchIterator(10, 3, shuffle=False, drop_last=True, seed=0)
    assert len(it) == 3 and _collect(it, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_permutation_is_a_function_of_seed_and_epoch():
    a, b = (BatchIterator(50, 50, shuffle=True, drop_last=False, seed=3) for _ in range(2))
    epochs_a, epochs_b = _collect(a, 3), _collect(b, 3)
    assert epochs_a == epochs_b
    assert all(sorted(e) == list(range(50)) for e in epochs_a)
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    c = BatchIterator(50, 50, shuffle=True, drop_last=False, seed=4)
    assert _collect(c, 1)[0] != epochs_a[0]
    d = BatchIterator(50, 50, shuffle=True, drop_last=False, seed=3)
    d.set_epoch(2)
    assert _collect(d, 1)[0] == epochs_a[2] and d.epoch_indices(1).tolist() == epochs_a[1]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 8, 11, 12])
def test_resume_continues_exactly(stop_after):
    kw = {"shuffle": True, "drop_last": True, "seed": 11, "rank": 1, "world_size": 2}
    reference = _collect(BatchIterator(37, 4, **kw), 3)  # 18 items per rank -> 4 batches per epoch
    first = BatchIterator(37, 4, **kw)
    seen = []
    while len(seen) < stop_after:
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == stop_after:
                break
    state = first.state_dict()
    resumed = BatchIterator(37, 4, **kw)
    resumed.load_state_dict(state)
    while len(seen) < len(reference):
        seen.extend(b.tolist() for b in resumed)
    assert seen == reference


def test_load_state_dict_rejects_other_settings():
    state = BatchIterator(20, 4, shuffle=True, drop_last=True, seed=0).state_dict()
    with pytest.raises(ValueError, match="state\\['seed'\\]=0 does not match this iterator's seed=1"):
        BatchIterator(20, 4, shuffle=True, drop_last=True, seed=1).load_state_dict(state)


@pytest.mark.parametrize("num_items, world_size", [(23, 3), (24, 4), (5, 2)])
def test_rank_sharding(num_items, world_size):
    kw = {"shuffle": True, "seed": 5, "world_size": world_size}
    for epoch in range(2):
        # training: equal shares, disjoint, W * floor(N / W) items in all
        shares = []
        for rank in range(world_size):
            it = BatchIterator(num_items, 1, drop_last=True, rank=rank, **kw)
            assert len(it) == num_items // world_size
            shares.append(it.epoch_indices(epoch).tolist())
        flat = functools.reduce(operator.iadd, shares, [])
        assert len(flat) == len(set(flat)) == world_size * (num_items // world_size)
        # evaluation: every item exactly once across ranks, no padding
        shares = [BatchIterator(num_items, 2, drop_last=False, rank=r, **kw).epoch_indices(epoch).tolist()
                  for r in range(world_size)]
        assert sorted(functools.reduce(operator.iadd, shares, [])) == list(range(num_items))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # all ranks derive their shares from the same permutation
    order = BatchIterator(num_items, 1, drop_last=False, shuffle=True, seed=5).epoch_indices(0)
    for rank in range(world_size):
        it = BatchIterator(num_items, 1, drop_last=False, rank=rank, **kw)
        assert torch.equal(it.epoch_indices(0), order[rank::world_size])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        BatchIterator(10, 2, shuffle=False, drop_last=True, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        BatchIterator(10, 0, shuffle=False, drop_last=True, seed=0)
    with pytest.raises(ValueError, match="gives no batch"):
        BatchIterator(10, 8, shuffle=False, drop_last=True, seed=0, world_size=2)

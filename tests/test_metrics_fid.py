"""FID / IS / KID through torch-fidelity's real code path, offline, with a random-weights Inception file.

The weights file has exactly the format torch-fidelity loads (its own extractor class's state dict), but random
Kaiming-normal convolutions with identity BatchNorm, so features neither vanish nor explode. Real numbers are
meaningless; identities are not: FID(set, its own statistics) = 0, FID(set, shifted set) > 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from lsgm import metrics
from lsgm.config import load_experiment

torch.set_num_threads(1)

N_IMAGES = 16
REPO = Path(__file__).resolve().parents[1]


def make_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save a random state dict in the format of torch-fidelity's ``inception-v3-compat`` extractor.

    Builds the library's own class with its weight loading stubbed out, re-initialises it (Kaiming-normal
    convs, identity BatchNorm, small fc), and saves ``state_dict()``: keys and shapes are exactly what
    ``load_state_dict(strict=True)`` expects when ``feature_extractor_weights_path`` points at the file.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    torch.manual_seed(seed)
    cls = fe_mod.FeatureExtractorInceptionV3
    with mock.patch.object(fe_mod, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(cls, "load_state_dict", lambda self, sd, *a, **k: None):
        model = cls("inception-v3-compat", ["2048"])
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            mod.reset_parameters()
    nn.init.normal_(model.fc.weight, std=4.0 / 2048 ** 0.5)
    nn.init.zeros_(model.fc.bias)
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _digit_like(n: int, seed: int, shift: int = 0) -> np.ndarray:
    """uint8 levels 0..16, (n, 1, 8, 8): blurry strokes; ``shift`` brightens (a different distribution)."""
    rng = np.random.default_rng(seed)
    base = np.zeros((n, 1, 8, 8))
    rows = rng.integers(1, 7, size=n)
    base[np.arange(n), 0, rows, 1:7] = 12
    base[np.arange(n), 0, 1:7, rng.integers(1, 7, size=n)] = 14
    img = base + rng.normal(0, 1.5, base.shape) + shift
    return np.clip(np.round(img), 0, 16).astype(np.uint8)


@pytest.fixture(scope="module")
def fid_env(tmp_path_factory):
    """A random-weights Inception file, a prepared fake 'digits' train split, and an FID-enabled config."""
    root = tmp_path_factory.mktemp("fid")
    weights = make_random_inception_weights(root / "weights-inception-random.pth")
    data_root = root / "prepared"
    (data_root / "digits").mkdir(parents=True)
    train = _digit_like(N_IMAGES, seed=0)
    np.save(data_root / "digits" / "train.npy", train)
    manifest = {"name": "digits", "max_value": 16,
                "splits": {"train": {"file": "train.npy", "shape": list(train.shape)}}}
    (data_root / "digits" / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_experiment("digits", root=REPO)
    cfg = dataclasses.replace(
        cfg,
        eval_fid=dataclasses.replace(cfg.eval_fid, enabled=True, weights_path=str(weights), isc=False, kid=False,
                                     kid_subset_size=8, batch_size=N_IMAGES),
        engine=dataclasses.replace(cfg.engine, device="cpu"))
    return {"root": root, "weights": weights, "data_root": data_root, "cfg": cfg, "train": train}


def _write_samples(run_root: Path, name: str, images_uint8: np.ndarray) -> None:
    out = run_root / name / "sample"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images_uint8)


def test_fid_of_a_set_against_its_own_statistics_is_zero_and_shifted_set_is_positive(fid_env):
    cfg, data_root = fid_env["cfg"], fid_env["data_root"]
    stats_path = metrics.default_reference_stats_path(cfg, data_root)
    metrics.reference_statistics(cfg, data_root=data_root, out=stats_path)
    stats = torch.load(stats_path, weights_only=False)
    assert set(stats) == {"mu", "sigma"}
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert np.isfinite(stats["sigma"]).all() and np.trace(stats["sigma"]) > 0  # features did not collapse

    # the same images (on the 0..255 scale) as "samples": FID against their own statistics is 0
    run_root = fid_env["root"] / "runs"
    same = metrics.levels_to_uint8(torch.from_numpy(fid_env["train"]), 16).numpy()
    _write_samples(run_root, cfg.name, same)
    res = metrics.eval_fid_experiment(cfg, run_root=run_root, data_root=data_root)
    assert abs(res["fid"]) < 1e-3 * np.trace(stats["sigma"])
    written = json.loads((run_root / cfg.name / "eval" / "fid.json").read_text())
    assert written["fid"] == res["fid"] and written["num_samples"] == N_IMAGES
    assert written["reference_stats_sha256"] == metrics.sha256_file(stats_path)
    assert written["weights_sha256"] == metrics.sha256_file(fid_env["weights"])
    assert written["weights_sha256_matches_official"] is False
    assert written["feature_extractor"] == "inception-v3-compat"

    # a shifted (brighter) set: FID > 0; IS and KID computed through the same call
    cfg_all = dataclasses.replace(cfg, eval_fid=dataclasses.replace(cfg.eval_fid, isc=True, kid=True))
    shifted = metrics.levels_to_uint8(torch.from_numpy(_digit_like(N_IMAGES, seed=1, shift=6)), 16).numpy()
    _write_samples(run_root, cfg.name, shifted)
    res2 = metrics.eval_fid_experiment(cfg_all, run_root=run_root, data_root=data_root)
    assert res2["fid"] > 100 * max(abs(res["fid"]), 1e-3)
    assert np.isfinite(res2["isc"]) and res2["isc"] >= 1.0 - 1e-6  # IS = exp(E KL) >= 1
    assert np.isfinite(res2["kid"]) and res2["kid"] > 0
    assert res2["kid_subset_size"] == 8 and res2["kid_reference_images"] == N_IMAGES


def test_missing_weights_error_says_how_to_obtain_and_place_the_file(fid_env, tmp_path):
    missing = tmp_path / "data" / "weights" / metrics.INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        metrics.require_inception_weights(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert metrics.INCEPTION_WEIGHTS_URL in msg and metrics.INCEPTION_WEIGHTS_SHA256 in msg
    cfg = dataclasses.replace(fid_env["cfg"], eval_fid=dataclasses.replace(fid_env["cfg"].eval_fid,
                                                                           weights_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="curl -L"):
        metrics.reference_statistics(cfg, data_root=fid_env["data_root"], out=tmp_path / "s.pt")

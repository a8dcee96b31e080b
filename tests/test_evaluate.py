"""Sampling and NLL evaluation on tiny random-weight models (docs/algorithm.md §6.1, §7.1).

A tiny NVAE + tiny NCSN++ are built from a params YAML written to tmp_path, saved with ``save_model`` as a
stage-1 (``vae``) and a prior-stage (``lsgm``) model sharing the same VAE weights. With the mixing logit at −30
(α ≈ 1e-13) the SGM prior is exactly the diffused N(0, I), whose probability-flow drift vanishes for a VPSDE
with σ0² = 0, so the ODE NLL must equal the VAE's analytic Normal-prior NLL image by image.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lsgm.checkpoint import sha256_file
from lsgm.config import config_to_dict, load_config, load_experiment
from lsgm.evaluate import eval_nll_experiment, sample_experiment
from lsgm.stats import bits_per_dim, mean_and_stderr
from lsgm.models import build_prior, build_vae, save_model

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
N_TEST = 10


def _tiny_params(tmp: Path, **eval_nll) -> Path:
    raw = config_to_dict(load_experiment("digits", root=REPO))
    raw["name"] = "tiny"
    raw["data"]["max_eval_images"] = N_TEST
    raw["vae"].update(num_channels_enc=8, num_channels_dec=8)
    raw["prior"]["lsgm"]["score_net"].update(nf=16, num_res_blocks=1, dropout=0.0)
    raw["sampling"].update(num_samples=6, batch_size=4, grid_size=2)
    raw["eval_nll"].update(batch_size=4, **eval_nll)
    raw["engine"]["device"] = "cpu"
    path = tmp / f"tiny_{len(list(tmp.glob('tiny*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Prepared fake digits test split, tiny config, and saved vae / lsgm models (mixing logit −30)."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    test = rng.integers(0, 17, size=(N_TEST + 3, 1, 8, 8)).astype(np.uint8)
    (root / "prepared" / "digits").mkdir(parents=True)
    np.save(root / "prepared" / "digits" / "test.npy", test)
    manifest = {"name": "digits", "max_value": 16, "splits": {"test": {"file": "test.npy", "shape": list(test.shape)}}}
    (root / "prepared" / "digits" / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(_tiny_params(root))
    torch.manual_seed(0)
    vae, prior = build_vae(cfg), build_prior(cfg, "lsgm")
    with torch.no_grad():
        prior.mixing_logit.fill_(-30.0)
    run_root = root / "runs"
    save_model(run_root / "tiny" / "vae" / "model.pt", cfg=cfg, stage="vae", vae=vae, prior=None, prior_ema=None,
               step=0, epoch=0)
    save_model(run_root / "tiny" / "lsgm" / "model.pt", cfg=cfg, stage="lsgm", vae=vae, prior=prior,
               prior_ema=prior.state_dict(), step=1, epoch=1)
    return {"root": root, "cfg": cfg, "run_root": run_root, "data_root": root / "prepared"}


@pytest.fixture(scope="module")
def nll_results(env):
    out = {m: eval_nll_experiment(env["cfg"], run_root=env["run_root"], data_root=env["data_root"], model=m)
           for m in ("vae", "lsgm")}
    return out


def test_nll_with_normal_prior_sgm_equals_vae_alone(nll_results):
    vae, lsgm = nll_results["vae"], nll_results["lsgm"]
    a, b = np.array(vae["per_image_nll_nats"]), np.array(lsgm["per_image_nll_nats"])
    assert a.shape == b.shape == (N_TEST,)
    assert np.all(np.isfinite(a)) and a.std() > 0
    # identical images and encoder samples; the ODE prior term equals -log N(z0; 0, I) up to solver error
    np.testing.assert_allclose(b, a, atol=1e-3, rtol=0)
    assert vae["terms_nats"]["recon"] == pytest.approx(lsgm["terms_nats"]["recon"], abs=1e-9)
    assert lsgm["nfe_mean"] > 0 and len(lsgm["nfe_per_batch"]) == math.ceil(N_TEST / 4)


def test_bits_per_dim_and_standard_error_closed_forms():
    assert bits_per_dim(64 * math.log(2.0), 64) == pytest.approx(1.0)
    assert bits_per_dim(78.47, 784) == pytest.approx(78.47 / (784 * math.log(2.0)))
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(1.0, 0)


def test_nll_json_protocol_fields(env, nll_results):
    for model in ("vae", "lsgm"):
        path = env["run_root"] / "tiny" / "eval" / f"nll_{model}.json"
        res = json.loads(path.read_text())
        per_image = np.array(res["per_image_nll_nats"])
        assert res["nll_nats"] == pytest.approx(per_image.mean())
        assert res["nll_nats_stderr"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(N_TEST))
        assert res["num_dims"] == 64 and res["num_images"] == N_TEST
        assert res["bits_per_dim"] == pytest.approx(res["nll_nats"] / (64 * math.log(2.0)))
        assert res["bits_per_dim_stderr"] == pytest.approx(res["nll_nats_stderr"] / (64 * math.log(2.0)))
        terms = res["terms_nats"]
        assert res["nelbo_nats"] == pytest.approx(terms["recon"] + terms["kl"])
        assert res["checkpoint"] == str(env["run_root"] / "tiny" / model / "model.pt")
        assert res["binarized"] is True and res["binarization_draws"] == 1 and res["num_iw_samples"] == 1
        assert res["data_manifest_sha256"] == sha256_file(env["data_root"] / "digits" / "manifest.json")
        assert re.fullmatch(r"[0-9a-f]{12}", res["params_hash"])
        assert res["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", res["commit"])
        assert res["command"].startswith(f"lsgm eval-nll tiny --model {model} ")
    lsgm = nll_results["lsgm"]
    assert (lsgm["ode_eps"], lsgm["tol"]) == (1e-5, 1e-5) and lsgm["use_ema"] is True
    assert (lsgm["trace"], lsgm["probe"], lsgm["num_probes"], lsgm["probe_mode"]) == \
        ("hutchinson", "gaussian", 1, "fixed")
    assert lsgm["nfe_mean"] == pytest.approx(np.mean(lsgm["nfe_per_batch"]))
    assert nll_results["vae"]["prior"].startswith("standard Normal")


def test_importance_weighted_bound_and_binarization_draws(env):
    cfg = load_config(_tiny_params(env["root"], num_iw_samples=3, binarization_draws=2))
    res = eval_nll_experiment(cfg, run_root=env["run_root"], data_root=env["data_root"], model="vae")
    assert res["num_iw_samples"] == 3 and res["binarization_draws"] == 2 and len(res["per_draw_nll_nats"]) == 2
    # Jensen: -log mean_k exp(-NELBO_k) <= mean_k NELBO_k (strict for a random encoder)
    assert res["nll_nats"] < res["nelbo_nats"]
    assert res["estimator"] == "importance-weighted bound"


def test_sample_outputs_and_protocol_fields(env):
    stats = sample_experiment(env["cfg"], run_root=env["run_root"])
    out = env["run_root"] / "tiny" / "sample"
    with np.load(out / "samples.npz") as npz:
        images = npz["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 1, 8, 8)
    assert Image.open(out / "grid.png").size == (2 * 9 + 1, 2 * 9 + 1)
    assert (out / "resolved_config.yaml").is_file()
    written = json.loads((out / "sample_stats.json").read_text())
    assert written == json.loads(json.dumps(stats))
    assert written["num_samples"] == 6 and written["num_batches"] == 2 and len(written["nfe_per_batch"]) == 2
    assert written["nfe_mean"] == pytest.approx(np.mean(written["nfe_per_batch"]))
    assert written["nfe_std"] == pytest.approx(np.std(written["nfe_per_batch"]))
    assert written["seconds_mean"] == pytest.approx(np.mean(written["seconds_per_batch"]))
    for key, value in {"ode_eps": 1e-5, "tol": 1e-5, "temperature": 1.0, "method": "dopri5", "seed": 0,
                       "use_ema": True, "checkpoint": str(env["run_root"] / "tiny" / "lsgm" / "model.pt")}.items():
        assert written[key] == value
    # same seed -> same samples (the seed fully determines the run)
    sample_experiment(env["cfg"], run_root=env["run_root"])
    with np.load(out / "samples.npz") as npz:
        np.testing.assert_array_equal(npz["images"], images)

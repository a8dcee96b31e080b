"""`lsgm report` on fixture metric files: every paper number of docs/algorithm.md §10, ours, differences, protocol, small-scale checks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsgm.cli import main
from lsgm.report import CSV_COLUMNS, write_report

# Every number of docs/algorithm.md §10's results table, as printed there (independent of lsgm.paper_results).
SPEC_10_NUMBERS = ["2.10", "3.43", "138", "9.87", "0.61", "6.89", "2.87", "2.17", "2.95", "7.22", "0.70", "23",
                   "4.15", "4000", "7.23", "87.79", "78.47", "7.60", "34.71", "5.19", "9.00", "147"]


def _json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _nll(model: str, per_image: list[float], d: int = 64, **extra) -> dict:
    v = np.asarray(per_image)
    nats, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))
    return {"model": model, "dataset": "digits", "nll_nats": nats, "nll_nats_stderr": se,
            "bits_per_dim": nats / (d * math.log(2)), "bits_per_dim_stderr": se / (d * math.log(2)), "num_dims": d,
            "per_image_nll_nats": per_image, "num_images": v.size, "binarized": True, "binarization_draws": 1,
            "num_iw_samples": 1, "seed": 0, "tol": 1e-5, "ode_eps": 1e-5, "checkpoint": f"data/runs/digits/{model}",
            "use_ema": model == "lsgm", "commit": "a" * 40, "params_hash": "0123456789ab",
            "experiment_hash": "e1e1e1e1e1e1", "params_hash_covers": "data, vae, train_vae, eval_nll",
            "data_manifest_sha256": "f" * 64, "command": f"lsgm eval-nll digits --model {model}",
            "trace": "hutchinson", "probe": "gaussian", "num_probes": 1, "probe_mode": "fixed", "nfe_mean": 20.0,
            "terms_nats": {"recon": 5.0, "log_q": -3.0, "prior_top": 8.0, "prior_rest": 0.0}, **extra}


def _fixture_runs(root: Path, lsgm_per_image: list[float]) -> Path:
    runs = root / "runs"
    _json(runs / "digits" / "eval" / "nll_vae.json", _nll("vae", [10.0, 12.0, 14.0, 16.0]))
    _json(runs / "digits" / "eval" / "nll_lsgm.json", _nll("lsgm", lsgm_per_image))
    _json(runs / "digits" / "sample" / "sample_stats.json",
          {"num_samples": 256, "batch_size": 128, "num_batches": 2, "nfe_mean": 41.0, "nfe_std": 3.0,
           "nfe_per_batch": [38, 44], "seconds_mean": 1.5, "tol": 1e-5, "ode_eps": 1e-5, "method": "dopri5",
           "checkpoint": "data/runs/digits/lsgm/model.pt", "use_ema": True, "commit": "b" * 40,
           "experiment_hash": "e1e1e1e1e1e1", "params_hash": "ba9876543210", "command": "lsgm sample digits"})
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(runs / "digits" / "sample" / "grid.png")
    tsv = runs / "digits" / "lsgm" / "dvclive" / "plots" / "metrics" / "train" / "nelbo_nats.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tnelbo_nats\n1\t0\t50.0\n2\t10\t40.0\n3\t20\t35.5\n")
    _json(runs / "cifar10_best_fid" / "eval" / "fid.json",
          {"fid": 3.10, "isc": 9.0, "isc_std": 0.1, "kid": 0.002, "kid_std": 0.0001, "num_samples": 50000,
           "sampling": {"tol": 1e-5, "ode_eps": 1e-6, "checkpoint": "data/runs/cifar10_best_fid/lsgm/model.pt",
                        "use_ema": True}, "commit": "c" * 40, "params_hash": "cccccccccccc",
           "experiment_hash": "c2c2c2c2c2c2",
           "data_manifest_sha256": "d" * 64, "command": "lsgm eval-fid cifar10_best_fid"})
    return runs


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_lists_every_paper_number_with_ours_and_protocol(tmp_path):
    runs = _fixture_runs(tmp_path, [9.0, 10.0, 13.0, 14.0])
    out = tmp_path / "reports"
    rc = main(["report", "--run-root", str(runs), "--out-dir", str(out),
               "--experiments", "digits", "cifar10_best_fid", "mnist"])
    assert rc == 0
    rows = _read_csv(out / "results.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    md = (out / "results.md").read_text()
    paper_values = {r["paper_value"] for r in rows}
    for number in SPEC_10_NUMBERS:
        assert number in paper_values, number
        assert f"| {number} |" in md or f"| ≤ {number} |" in md, number
    assert "44.6 min" in md  # the NCSN++ time, stored in seconds with the original in its note

    by_key = {(r["experiment"], r["metric"]): r for r in rows}
    fid = by_key[("cifar10_best_fid", "fid")]
    assert fid["status"] == "measured" and float(fid["ours"]) == pytest.approx(3.10)
    assert float(fid["difference"]) == pytest.approx(1.0) and fid["paper_table"] == "2"
    assert fid["paper_source"] == "P, A, T" and fid["samples"] == "50000" and fid["ode_eps"] == "1e-06"
    assert fid["commit"] == "c" * 40 and fid["params_hash"] == "cccccccccccc" and fid["data_manifest_hash"] == "d" * 64
    assert fid["command"] == "lsgm eval-fid cifar10_best_fid"
    isc = by_key[("cifar10_best_fid", "isc")]
    assert float(isc["difference"]) == pytest.approx(9.0 - 9.87)
    assert by_key[("cifar10_best_fid", "recall")]["status"] == "not measured"
    assert by_key[("cifar10_best_fid", "nll_bpd")]["status"] == "not run"
    assert by_key[("mnist", "nll_nats")]["status"] == "not run" and by_key[("mnist", "nll_nats")]["ours"] == ""
    assert by_key[("omniglot", "nll_nats")]["paper_value"] == "87.79"  # paper experiments always listed
    assert "not run" in md

    nll = by_key[("digits", "nll_nats")]
    assert nll["status"] == "measured" and float(nll["ours"]) == pytest.approx(11.5)
    assert float(nll["ours_stderr"]) == pytest.approx(np.std([9, 10, 13, 14], ddof=1) / 2, rel=1e-5)
    assert nll["samples"] == "4 images x 1 draws x K=1" and nll["ode_tol"] == "1e-05" and nll["ema"] == "True"
    assert float(by_key[("digits", "vae_nll_nats")]["ours"]) == pytest.approx(13.0)
    assert float(by_key[("digits", "nfe")]["ours"]) == pytest.approx(41.0)
    ablation = [r for r in rows if r["paper_value"] == "34.71"][0]
    assert ablation["status"] == "no experiment"

    for fig in ("samples/digits_samples.png", "training/digits_lsgm_training_1.png", "nfe/digits_nfe.png"):
        assert (out / "figures" / fig).stat().st_size > 0
        assert f"figures/{fig}" in md
        assert (out / "captions" / fig).with_suffix(".rst").read_text().startswith("**")

    # the paper cited, its tables and the source tags explained in the report itself; bounds marked in the CSV
    assert "Arash Vahdat, Karsten Kreis, Jan Kautz" in md and "arXiv:2106.05931" in md and "spec §" not in md
    assert "* **2**: Tab. 2 of the paper: CIFAR-10" in md and "* **DDGAN Tab. 1**: Tab. 1 of Xiao" in md
    assert "**S** a third-party summary of the paper, not verified" in md
    assert by_key[("digits", "nll_nats")]["bound"] == "≤" and by_key[("cifar10_best_fid", "nll_bpd")]["bound"] == "≤"
    assert fid["bound"] == "=" and by_key[("digits", "nfe")]["bound"] == "="
    assert "| ≤ 11.5 ± " in md  # ours is a bound too
    # one experiment hash per run, and what each stage's params hash covers
    assert "*experiment_hash*: hash of the whole resolved config" in md
    assert "* `digits`: every number comes from one run of the whole config, experiment hash `e1e1e1e1e1e1`." in md
    assert "`cifar10_best_fid`: every number comes from one run" in md
    assert nll["experiment_hash"] == "e1e1e1e1e1e1" and nll["params_hash_covers"] == "data, vae, train_vae, eval_nll"
    # readable in a browser: HTML copies with the tables and the figures embedded
    html = (out / "results.html").read_text()
    assert html.count("<table>") == 2 and html.count('src="data:image/png;base64,') == 3
    assert "<table>" in (out / "checks.html").read_text()


def test_checks_compare_vae_and_lsgm_nll_with_paired_standard_error(tmp_path):
    runs = _fixture_runs(tmp_path, [9.0, 10.0, 13.0, 14.0])  # diffs -1, -2, -1, -2: mean -1.5
    write_report(run_root=runs, out_dir=tmp_path / "r", experiments=["digits"])
    claims = (tmp_path / "r" / "checks.md").read_text()
    se = np.std([-1, -2, -1, -2], ddof=1) / 2
    assert f"**Yes: LSGM is lower** than the VAE alone by 1.50 ± {se:.2f} nats (paired over the same test" in claims
    assert "13.00 ± 1.29" in claims and "11.50 ± 1.19" in claims  # VAE and LSGM, nats ± stderr
    assert "NFE: **41.0 ± 3.0** per batch" in claims

    runs2 = _fixture_runs(tmp_path / "worse", [11.0, 12.5, 14.0, 17.0])
    write_report(run_root=runs2, out_dir=tmp_path / "r2", experiments=["digits"])
    claims2 = (tmp_path / "r2" / "checks.md").read_text()
    assert "**No: LSGM is not lower**" in claims2 and "+0.62" in claims2
    assert "prior_top" in claims2  # the terms are listed to find out why


@pytest.mark.parametrize("gain, gain_se, expect", [
    (0.06, 0.05, "no significant difference (within two standard errors)"),
    (0.80, 0.10, "the prior helps."),
    (-0.90, 0.10, "the SGM prior itself is worse than N(0, I)"),
])
def test_checks_split_the_difference_into_joint_training_and_sgm_prior(tmp_path, gain, gain_se, expect):
    """LSGM − VAE = (LSGM's VAE with a Normal prior − VAE alone) + (SGM prior − Normal prior) on LSGM's encoder."""
    runs = _fixture_runs(tmp_path, [9.0, 10.0, 13.0, 14.0])  # LSGM 11.50, VAE 13.00
    path = runs / "digits" / "eval" / "nll_lsgm.json"
    payload = json.loads(path.read_text())
    payload.update(normal_prior_nelbo_nats=11.5 + gain, normal_prior_nelbo_nats_stderr=1.2,
                   prior_gain_over_normal_nats=gain, prior_gain_over_normal_nats_stderr=gain_se)
    path.write_text(json.dumps(payload))
    write_report(run_root=runs, out_dir=tmp_path / "r", experiments=["digits"])
    claims = (tmp_path / "r" / "checks.md").read_text()
    assert expect in claims
    joint_part = 11.5 + gain - 13.0
    assert (f"Decomposition of LSGM − VAE (-1.50 nats): {joint_part:+.2f} from the end-to-end trained VAE"
            in claims), claims
    assert f"{-gain:+.2f} from replacing the Normal prior by the SGM prior" in claims
    assert "LSGM's VAE with a Normal prior (diagnostic)" in claims


def test_training_figures_show_every_metric_in_optimiser_steps(tmp_path):
    """All logged metrics (pages of PANELS_PER_PAGE, none dropped), x = optimiser step with the samples seen per
    step, y labelled with units, a smoothed curve over the raw one; a resumed run's repeated steps count once."""
    from lsgm.figures import PANELS_PER_PAGE, metric_label, read_history, training_figures

    live = tmp_path / "dvclive"
    names = ["loss", "nelbo_nats", "recon_nats", "kl_nats", "kl_group_0", "kl_group_1", "grad_norm_vae",
             "grad_norm_prior", "lr_vae", "lr_prior", "kl_coeff", "mixing_alpha_mean", "reg_vae", "p_loss"]
    for name in names:
        f = live / "plots" / "metrics" / f"{name}.tsv"
        f.parent.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{s}\t{1.0 / s}\n" for s in range(10, 580, 10))
        f.write_text(f"step\t{name}\n{rows}30\t99.0\n")  # step 30 again (resumed): the later value wins
    figs = training_figures("digits", "lsgm", live, tmp_path / "out", global_batch=64)
    assert len(figs) == math.ceil(len(names) / PANELS_PER_PAGE) == 3
    captions = " ".join(f.caption for f in figs)
    assert all(f"`{n}`" in captions for n in names), "a logged metric was dropped"
    assert "x: optimiser step up to 570; 1 step = 64 images (top axis: samples seen)" in figs[0].caption
    assert all(Image.open(f.path).size[0] >= 800 for f in figs)
    steps, vals = read_history(live / "plots" / "metrics" / "loss.tsv")
    assert steps[0] == 10 and steps[-1] == 570 and np.all(np.diff(steps) > 0) and vals[2] == 99.0
    assert metric_label("nelbo_nats") == "nelbo (nats per image)"
    assert metric_label("lr_vae") == "learning rate of vae"
    assert metric_label("grad_norm_prior") == "gradient L2 norm (prior)"
    assert metric_label("kl_group_1") == "KL of latent group 1 (nats per image)"
    assert metric_label("something_new") == "something_new (as logged)"


def test_sample_figure_is_upscaled_without_smoothing_beside_real_images(tmp_path):
    from lsgm.figures import MIN_GRID_PX, _upscale, image_grid, samples_figure

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8)
    grid = image_grid(samples, nrow=8)
    assert grid.shape == (73, 73, 1)
    big, k = _upscale(grid)
    assert k == 4 and big.shape[0] >= MIN_GRID_PX
    assert np.array_equal(big[::k, ::k], grid) and np.array_equal(big[1::k, 3::k], grid)  # pixel blocks: no smoothing
    stats = {"method": "dopri5", "ode_eps": 1e-5, "tol": 1e-5, "nfe_mean": 20.0, "nfe_std": 0.5, "batch_size": 128,
             "temperature": 1.0, "vae_temperature": 1.0, "use_ema": True, "checkpoint": "data/runs/digits/lsgm/model.pt",
             "checkpoint_step": 760, "seed": 0, "num_samples": 256, "grid_size": 8}
    real = rng.integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8)
    fig = samples_figure("digits", grid, stats, tmp_path / "s.png", real=real, real_note="the first 64 test images.")
    w, h = Image.open(fig.path).size
    assert w >= 2 * MIN_GRID_PX and h >= MIN_GRID_PX
    for text in ("dopri5", "eps = 1e-05", "rtol = atol = 1e-05", "NFE 20.0 ± 0.5 per batch of 128",
                 "prior temperature 1.0", "EMA prior weights", "(step 760)", "seed 0", "Right: the first 64 test images"):
        assert text in fig.caption, text
    alone = samples_figure("digits", grid, stats, tmp_path / "a.png", real=None, real_note="`data/prepared/digits` is "
                           "not prepared")
    assert "Real images not shown: `data/prepared/digits` is not prepared" in alone.caption

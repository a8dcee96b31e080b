"""Training engine: learning on digits, stage 2 in every mode, bit-identical kill-and-resume, NaN guard, DDP.

All runs use a tiny digits config on CPU (fp32). Subprocess runs go through the real `lsgm` CLI.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lsgm.checkpoint import CheckpointManager
from lsgm.config import load_config
from lsgm.engine import BatchPlan, lr_at
from lsgm.train import train_lsgm, train_vae

from train_helpers import REPO, assert_bit_identical, model_state, run_cli, tiny_config


# ------------------------------------------------------------------------------------------------ schedules
def test_lr_schedule_warmup_then_cosine_to_minimum():
    kw = dict(base=1e-2, minimum=1e-4, warmup_epochs=2, epochs=12, iters_per_epoch=10)
    assert lr_at(0, **kw) == pytest.approx(1e-2 / 20)
    assert lr_at(19, **kw) == pytest.approx(1e-2)
    assert lr_at(20, **kw) == pytest.approx(1e-2)  # first cosine epoch
    assert lr_at(119, **kw) == pytest.approx(1e-4)  # last epoch reaches the minimum
    mid = lr_at(20 + 10 * 4, **kw)  # half-way through the 9-epoch cosine span (4.5 -> epoch 4 of 9)
    assert 1e-4 < mid < 1e-2


def test_schedule_is_defined_in_samples_seen():
    """Same global batch on 1 or 8 processes: same iterations per epoch, so same LR/KL schedule (docs/algorithm.md §12.10)."""
    one = BatchPlan.make(batch_size=256, global_batch_size=256, world_size=1, num_items=50000, where="t")
    eight = BatchPlan.make(batch_size=32, global_batch_size=256, world_size=8, num_items=50000, where="t")
    acc = BatchPlan.make(batch_size=32, global_batch_size=256, world_size=4, num_items=50000, where="t")
    assert one.iters_per_epoch == eight.iters_per_epoch == acc.iters_per_epoch == 195
    assert acc.accumulation == 2 and eight.accumulation == 1
    with pytest.raises(ValueError, match="not a multiple"):
        BatchPlan.make(batch_size=48, global_batch_size=256, world_size=1, num_items=50000, where="t")


def test_micro_batches_partition_the_global_batch():
    from lsgm.data.loader import BatchIterator

    plan = BatchPlan.make(batch_size=4, global_batch_size=16, world_size=2, num_items=100, where="t")
    order = BatchIterator(100, 16, shuffle=True, drop_last=True, seed=3)
    got = [i for r in range(2) for _, b in plan.micro_batches(order, 7, r) for i in b.tolist()]
    epoch, pos = divmod(7, plan.iters_per_epoch)
    assert sorted(got) == sorted(order.epoch_indices(epoch)[pos * 16:(pos + 1) * 16].tolist())
    single = BatchPlan.make(batch_size=4, global_batch_size=16, world_size=1, num_items=100, where="t")
    assert [g for g, _ in single.micro_batches(order, 7, 0)] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ learning
def read_tsv(path: Path) -> list[float]:
    lines = path.read_text().splitlines()[1:]
    return [float(line.split("\t")[-1]) for line in lines]


def test_vae_then_lsgm_learn_on_digits(tmp_path, prepared):
    cfg = load_config(tiny_config(tmp_path, vae_epochs=12, every=1000), name="tiny")
    runs = tmp_path / "runs"
    model = train_vae(cfg, run_root=runs, data_root=prepared)
    assert model.exists()
    nelbo = read_tsv(runs / "tiny" / "vae" / "dvclive" / "plots" / "metrics" / "nelbo_nats.tsv")
    assert len(nelbo) >= 10 and sum(nelbo[-3:]) / 3 < sum(nelbo[:3]) / 3 - 3.0  # clearly lower, in nats
    metrics = json.loads((runs / "tiny" / "vae" / "metrics.json").read_text())
    assert metrics["steps"] == 12 * (256 // 32) and metrics["global_batch"] == 32
    assert (runs / "tiny" / "vae" / "resolved_config.yaml").exists()

    out = train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared)
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["stage"] == "lsgm" and payload["prior"] is not None and payload["prior_ema"] is not None
    m = json.loads((runs / "tiny" / "lsgm" / "metrics.json").read_text())["final"]
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert 0 < m["mixing_alpha_mean"] < 1


@pytest.mark.parametrize("mode", ["joint", "disjoint", "frozen"])
def test_stage2_modes_run_from_a_stage1_checkpoint(tmp_path, prepared, mode):
    extra = {"joint": "iw_sample_p: drop_all_iw, iw_sample_q: reweight_p_samples",
             "disjoint": "disjoint: true, iw_sample_p: drop_sigma2t_iw, iw_sample_q: ll_iw, update_q_ema: true",
             "frozen": "iw_sample_p: drop_sigma2t_iw, drop_inactive_var: true"}[mode]
    text = tiny_config(tmp_path, vae_epochs=1, extra=extra).read_text()
    if mode == "frozen":
        text = text.replace("    score_net:", "    train_vae: false\n    score_net:")
    path = tmp_path / "mode.yaml"
    path.write_text(text)
    cfg = load_config(path, name="tiny")
    runs = tmp_path / "runs"
    vae_model = train_vae(cfg, run_root=runs, data_root=prepared)
    out = train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=4)
    before = torch.load(vae_model, map_location="cpu", weights_only=True)["vae"]
    after = torch.load(out, map_location="cpu", weights_only=True)
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after["vae"][k])]
    weights_changed = [k for k in changed if "running" not in k]
    if mode == "frozen":
        assert weights_changed == [] and changed == []  # frozen and in eval mode: not even BN statistics drift
        assert "inactive_mask" in after["prior"]
    else:
        assert weights_changed, "the VAE must train in joint/disjoint mode"
    assert torch.isfinite(torch.cat([v.flatten().float() for v in after["prior"].values()])).all()


# ------------------------------------------------------------------------------------------------ resume
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=3, every=3)
    args = ["train-vae", str(cfg_path), "--data-root", str(prepared)]
    ref = tmp_path / "ref"
    run_cli(*args, "--run-root", str(ref))
    reference = model_state(ref / "tiny" / "vae" / "model.pt")

    runs = tmp_path / "killed"
    rng = random.Random(1234)
    total = 3 * (256 // 32)
    kill_steps = sorted(rng.sample(range(2, total - 1), 2))
    for k in kill_steps:  # the process SIGKILLs itself right after step k (checkpoint or not)
        res = run_cli(*args, "--run-root", str(runs), faults=("--kill-after-step", str(k)), check=False)
        assert res.returncode == -signal.SIGKILL
        assert not (runs / "tiny" / "vae" / "model.pt").exists()
    # and once from outside, at a random wall-clock moment after the first checkpoints exist
    proc = subprocess.Popen([sys.executable, "-m", "lsgm.cli", *args, "--run-root", str(runs)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(3.0, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run_cli(*args, "--run-root", str(runs))
    assert "resumed" in res.stderr
    assert_bit_identical(model_state(runs / "tiny" / "vae" / "model.pt"), reference)


def test_truncated_newest_checkpoint_is_skipped(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    mgr.save({"step": 1, "w": torch.ones(3)}, 1)
    p2 = mgr.save({"step": 2, "w": torch.full((3,), 2.0)}, 2)
    data = p2.read_bytes()
    p2.write_bytes(data[: len(data) // 2])  # a torn write
    step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["w"], torch.ones(3))
    assert "truncated or corrupt" in caplog.text
    mgr.save({"step": 3}, 3)
    mgr.save({"step": 4}, 4)
    assert [s for s, _ in mgr.paths()] == [1, 3, 4]  # keeps the newest K VALID ones; the torn one is removed


def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=40, every=10000)
    args = ["train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(tmp_path / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "lsgm.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "runs" / "tiny" / "vae" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("ckpt-000000000.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    steps = [s for s, _ in CheckpointManager(ckpts).paths()]
    assert max(steps) > 0, "SIGTERM must write a checkpoint at the current step"
    assert "rerun the same command to resume" in err


# ------------------------------------------------------------------------------------------------ NaN guard
def test_nan_batch_rolls_back_lowers_lr_and_finishes(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=4)
    runs = tmp_path / "runs"
    res = run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(runs),
                  faults=("--poison", "6:1"))
    assert "NaN guard" in res.stderr and "rolled back to step 4" in res.stderr
    metrics = json.loads((runs / "tiny" / "vae" / "metrics.json").read_text())
    assert metrics["nan_failures"] == 1 and metrics["lr_factor"] == 0.5
    # DVCLive: x = optimiser step (every 5th and the last of 16); the row of step 5 logged before the rollback to step
    # 4 is dropped, so the replayed step 5 appears once
    live = runs / "tiny" / "vae" / "dvclive" / "plots" / "metrics"
    header, *rows = (live / "loss.tsv").read_text().splitlines()
    assert header.split("\t")[0] == "step" and [int(r.split("\t")[0]) for r in rows] == [5, 10, 15, 16]
    assert [r.split("\t") for r in (live / "nan_rollback_to_step.tsv").read_text().splitlines()[1:]] == [["4", "4.0"]]
    for _, path in CheckpointManager(runs / "tiny" / "vae" / "checkpoints").paths():
        state = torch.load(path, map_location="cpu", weights_only=True)
        for v in state["modules"]["vae"].values():
            assert torch.isfinite(v.float()).all()


def test_persistent_nan_stops_with_remedies(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=4)
    res = run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(tmp_path / "runs"),
                  faults=("--poison", "6"), check=False)
    assert res.returncode != 0
    assert "giving up" in res.stderr and "spectral regularisation" in res.stderr and "lower the learning rate" in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "vae" / "model.pt").exists()


# ------------------------------------------------------------------------------------------------ precision, DDP
def test_bf16_autocast_runs_on_cpu(tmp_path, prepared):
    p = tiny_config(tmp_path, vae_epochs=1)
    p.write_text(p.read_text().replace("engine: {", "engine: {precision: bf16, "))
    cfg = load_config(p, name="tiny")
    out = train_vae(cfg, run_root=tmp_path / "runs", data_root=prepared, max_steps=3)
    state = torch.load(out, map_location="cpu", weights_only=True)["vae"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_ddp_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path, prepared):
    """torchrun with 2 CPU ranks (gloo, per-rank batch 16) vs 1 process accumulating 2 x 16: same update."""
    text = tiny_config(tmp_path, vae_epochs=1).read_text().replace(
        "train_vae: {epochs: 1, batch_size: 32", "train_vae: {epochs: 1, batch_size: 16, global_batch_size: 32")
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(text.replace("num_threads: 1", "num_threads: 1, device: cpu"))
    common = ["train-vae", str(cfg_path), "--data-root", str(prepared), "--max-steps", "2"]
    run_cli(*common, "--run-root", str(tmp_path / "single"))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + random.Random(os.getpid()).randint(0, 400)), "-m", "lsgm.cli", *common,
                          "--run-root", str(tmp_path / "ddp")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    single = model_state(tmp_path / "single" / "ddp" / "vae" / "model.pt")
    ddp = model_state(tmp_path / "ddp" / "ddp" / "vae" / "model.pt")
    for k in single:
        if "running" in k or "num_batches" in k:
            continue  # BN running statistics are per process (plain BN on gloo), parameters are shared
        assert torch.allclose(single[k].double(), ddp[k].double(), rtol=1e-5, atol=1e-6), k
    meta = json.loads((tmp_path / "ddp" / "ddp" / "vae" / "metrics.json").read_text())
    assert meta["processes"] == 2 and meta["accumulation"] == 1 and meta["global_batch"] == 32


def test_channels_last_fast_path_matches_up_to_rounding(tmp_path, prepared):
    """engine.channels_last (NHWC kernels for the VAE) changes only float rounding, in both stages."""
    states = {}
    for flag in (False, True):
        p = tiny_config(tmp_path, name=f"cl{int(flag)}", vae_epochs=1,
                        extra="iw_sample_p: drop_all_iw, iw_sample_q: reweight_p_samples")
        p.write_text(p.read_text().replace("engine: {", f"engine: {{channels_last: {str(flag).lower()}, "))
        cfg = load_config(p, name="cl")
        runs = tmp_path / f"runs{int(flag)}"
        train_vae(cfg, run_root=runs, data_root=prepared, max_steps=2)
        states[flag] = model_state(train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=2))
    for k, v in states[False].items():
        if v.is_floating_point():
            assert torch.allclose(v, states[True][k], rtol=1e-4, atol=1e-5), k


def test_one_backward_joint_step_matches_the_restricted_pair(tmp_path, prepared):
    """single_backward_joint (q's CE gradient through p's graph, rescaled per sample at z_t) changes only rounding.

    Runs the real train_lsgm with NCSN++ (GroupNorm, dropout) and the NVAE: drop_all_iw / reweight_p_samples,
    whose p and q weights differ per sample, so a wrong rescaling would move the VAE's weights.
    """
    states = {}
    for flag in (False, True):
        p = tiny_config(tmp_path, name=f"sb{int(flag)}", vae_epochs=1,
                        extra=f"iw_sample_p: drop_all_iw, iw_sample_q: reweight_p_samples, "
                              f"single_backward_joint: {str(flag).lower()}")
        cfg = load_config(p, name="sb")
        runs = tmp_path / f"runs{int(flag)}"
        train_vae(cfg, run_root=runs, data_root=prepared, max_steps=2)
        states[flag] = model_state(train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=3))
    moved = 0
    for k, v in states[False].items():
        if v.is_floating_point():
            assert torch.allclose(v, states[True][k], rtol=1e-4, atol=1e-5), k
            moved += int(k.startswith("vae.") and "running" not in k)
    assert moved > 0


def test_compiled_score_network_trains_like_eager(tmp_path, prepared):
    """engine.compile: torch.compile (inductor, CPU here) on the SGM backbone; same weights up to rounding.

    Dropout is off so both runs draw the same random numbers; the checkpoint keeps eager parameter names.
    """
    states = {}
    for flag in (False, True):
        p = tiny_config(tmp_path, name=f"co{int(flag)}", vae_epochs=1)
        p.write_text(p.read_text().replace("score_net: {nf: 16,", "score_net: {dropout: 0.0, nf: 16,")
                     .replace("engine: {", f"engine: {{compile: {str(flag).lower()}, "))
        cfg = load_config(p, name="co")
        assert cfg.engine.compile == flag and cfg.prior["lsgm"].score_net.dropout == 0.0
        runs = tmp_path / f"runs{int(flag)}"
        train_vae(cfg, run_root=runs, data_root=prepared, max_steps=1)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        states[flag] = model_state(train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=2))
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (compiled_graphs > 0) == flag, compiled_graphs
    assert states[False].keys() == states[True].keys()
    for k, v in states[False].items():
        if v.is_floating_point():
            assert torch.allclose(v, states[True][k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("fused", [False, True])
def test_weight_decay_modes_closed_form(fused):
    """One Adam step on a zero gradient: decoupled decay is θ(1 − lr·wd) exactly (AdamW, apex FusedAdam's default);
    the L2 term instead becomes a gradient wd·θ that Adam normalises to a step of ≈ lr·sign(θ)."""
    from lsgm.engine import make_adam

    lr, wd = 1e-2, 0.1
    theta = torch.tensor([0.5, -2.0, 3.0])
    out = {}
    for mode in ("decoupled", "l2"):
        p = torch.nn.Parameter(theta.clone())
        opt = make_adam([p], lr=lr, eps=1e-8, weight_decay=wd, weight_decay_mode=mode, fused=fused)
        p.grad = torch.zeros_like(p)
        opt.step()
        out[mode] = p.detach()
    torch.testing.assert_close(out["decoupled"], theta * (1 - lr * wd), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["l2"], theta - lr * torch.sign(theta), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_decay_mode='adamw' is not allowed"):
        make_adam([torch.nn.Parameter(theta.clone())], lr=lr, eps=1e-8, weight_decay=wd, weight_decay_mode="adamw")


def test_stage2_weight_decay_mode_reaches_both_optimisers(tmp_path, prepared):
    from lsgm.engine import TrainLoop

    seen = []
    real_init = TrainLoop.__init__

    def spy(self, **kw):
        seen.append({k: type(o).__name__ for k, o in kw["optimizers"].items()})
        real_init(self, **kw)

    for mode, cls in (("decoupled", "AdamW"), ("l2", "Adam")):
        p = tiny_config(tmp_path, f"wd_{mode}", vae_epochs=1, extra=f"weight_decay_mode: {mode}")
        cfg = load_config(p, name=f"wd_{mode}")
        runs = tmp_path / "runs"
        train_vae(cfg, run_root=runs, data_root=prepared, max_steps=1)
        TrainLoop.__init__ = spy
        try:
            train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=1)
        finally:
            TrainLoop.__init__ = real_init
        assert seen[-1] == {"prior": cls, "vae": cls}


def test_normal_prior_stage_trains_only_the_vae(tmp_path, prepared):
    """prior_kind: normal (the baseline "VAE alone for the same total steps"): no SGM in model.pt, the VAE trains with
    its N(0, I) prior, and its NLL is evaluated with that prior."""
    from lsgm.evaluate import eval_nll_experiment

    text = tiny_config(tmp_path, vae_epochs=1).read_text().replace("  lsgm:\n", "  lsgm:\n    prior_kind: normal\n")
    path = tmp_path / "normal.yaml"
    path.write_text(text)
    cfg = load_config(path, name="tiny")
    runs = tmp_path / "runs"
    vae_model = train_vae(cfg, run_root=runs, data_root=prepared)
    out = train_lsgm(cfg, "lsgm", run_root=runs, data_root=prepared, max_steps=3)
    payload = torch.load(out, map_location="cpu", weights_only=True)
    before = torch.load(vae_model, map_location="cpu", weights_only=True)["vae"]
    assert payload["prior"] is None and payload["prior_ema"] is None
    assert any(not torch.equal(before[k], payload["vae"][k]) for k in before if "running" not in k)
    metrics = json.loads((runs / "tiny" / "lsgm" / "metrics.json").read_text())["final"]
    assert metrics["nelbo_nats"] == pytest.approx(metrics["recon_nats"] + metrics["kl_nats"], rel=1e-5)
    assert "p_loss" not in metrics and "mixing_alpha_mean" not in metrics
    res = eval_nll_experiment(cfg, run_root=runs, data_root=prepared, model="lsgm")
    assert res["prior"] == "standard Normal (analytic)" and res["nfe_mean"] == 0.0

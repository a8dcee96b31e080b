"""The holes fault injection found (issue 13), each reproduced, and the rules behind their fixes.

1. NaN/±inf in a params file are rejected, naming the file that wrote them (fragment or experiment).
2. Weights that become non-finite never reach a checkpoint or ``model.pt``: the NaN guard rolls back.
3. Resume and rollback skip a checkpoint full of NaN even when its checksum matches.
4. Pruning keeps the newest VALID checkpoints: corrupt newer files never push a good one out.
5. A finished stage is idempotent; a kill between the last checkpoint and ``model.pt`` loses no metrics.
6. User-facing errors are one ``lsgm: error:`` line with exit 2 (checksum mismatch, NaN give-up, full disk,
   read-only file system, truncated model.pt).
7. A killed ``lsgm prepare`` leaves no temp folder behind after the next run.
8. A config error in the resolve step never empties ``params/resolved/EXP.yaml`` (see also tests/test_layout.py).
9. A bad value in a fragment is reported against the fragment; a broken experiment file stops only itself.
10. ``lsgm report --experiments foo`` fails with exit 2 and keeps the existing report.
11. ``lsgm prepare --no-download`` lists every missing raw file; ``--accept-sha256`` accepts a vouched-for copy.
12. (DVC cache) see tests/test_workflow.py.
13. ``lsgm launch --dry-run`` of a multi-node stage prints its command outside Slurm too.
Plus new kills: during a checkpoint write and between the last checkpoint and ``model.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lsgm.checkpoint import CheckpointManager, nonfinite_entries
from lsgm.config import ConfigError, load_config

from train_helpers import REPO, assert_bit_identical, model_state, run_cli, tiny_config


def lsgm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1")
    return subprocess.run([sys.executable, "-m", "lsgm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("lsgm: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# ------------------------------------------------------------------------------------------------ 1, 9
@pytest.mark.parametrize("key, value", [("train_vae", "learning_rate: .inf"), ("engine", "nan_lr_factor: .nan"),
                                        ("prior_lsgm_train", "ema_decay: .nan"), ("train_vae", "learning_rate: -.inf")])
def test_non_finite_numbers_are_rejected(tmp_path, key, value):
    body = {"train_vae": f"train_vae: {{{value}}}", "engine": f"engine: {{{value}}}",
            "prior_lsgm_train": f"prior: {{lsgm: {{train: {{{value}}}}}}}"}[key]
    p = tmp_path / "bad.yaml"
    p.write_text(f"extends: [{REPO / 'params' / 'digits.yaml'}]\n{body}\n")
    with pytest.raises(ConfigError, match=r"is not a finite number") as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}: ")


def test_bad_value_in_a_fragment_names_the_fragment(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    frag = params / "fragments" / "defaults.yaml"
    frag.write_text(frag.read_text().replace("adamax_eps: 1.0e-3", "adamax_eps: .nan"))
    with pytest.raises(ConfigError) as info:
        load_config(params / "digits.yaml")
    msg = str(info.value)
    assert msg.startswith(f"{frag}: train_vae.adamax_eps = nan") and f"inherited by {params / 'digits.yaml'}" in msg


def test_a_broken_experiment_file_stops_only_itself(tmp_path):
    """Snakemake skips an unselected broken experiment (one line naming it) and stops with one line when it is
    selected; the default experiment's DAG is unaffected."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".venv", "data", ".git", ".snakemake", "logs",
                                                              "benchmarks", "reports", "__pycache__"))
    (repo / "params" / "mnist.yaml").write_text((repo / "params" / "mnist.yaml").read_text()
                                                .replace("batch_size: 100", "batch_sise: 100"))
    snakemake = [sys.executable, "-m", "snakemake", "-n", "--cores", "1"]
    env = dict(os.environ, PYTHONPATH=str(repo))
    ok = subprocess.run(snakemake, cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    skipped = [line for line in ok.stderr.splitlines() if line.startswith("lsgm: skipping experiment mnist")]
    assert len(skipped) == 1 and "mnist.yaml: train_vae.batch_sise: unknown key" in skipped[0]
    assert "train_vae" in ok.stdout  # the default experiment's jobs are still planned
    bad = subprocess.run(snakemake + ["--config", "exps=mnist"], cwd=repo, capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("lsgm: config error:")]
    assert len(errors) == 1 and "mnist.yaml" in errors[0] and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------------ 2, 3, 4
def _all_checkpoints_finite(ckpt_dir: Path) -> None:
    for _, path in CheckpointManager(ckpt_dir).paths():
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert nonfinite_entries(state) == [], path


def test_weights_that_become_nan_are_never_saved(tmp_path, prepared):
    """The step's loss is finite but its update makes a weight NaN: the checkpoint of that step is refused, the run
    rolls back and finishes with finite checkpoints and model."""
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=2)
    runs = tmp_path / "runs"
    res = run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(runs),
                  faults=("--poison-weights", "5:1"))
    assert "NaN guard" in res.stderr and "non-finite state after step 6" in res.stderr
    _all_checkpoints_finite(runs / "tiny" / "vae" / "checkpoints")
    payload = torch.load(runs / "tiny" / "vae" / "model.pt", map_location="cpu", weights_only=True)
    assert nonfinite_entries(payload) == []
    assert json.loads((runs / "tiny" / "vae" / "metrics.json").read_text())["nan_failures"] == 1


def _poisoned_copy(mgr: CheckpointManager, src: Path, step: int) -> Path:
    """A checkpoint whose checksum matches but whose weights hold NaN (as an older version could write)."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    first = next(k for k, v in state["modules"]["vae"].items() if v.is_floating_point())
    state["modules"]["vae"][first].view(-1)[0] = float("nan")
    dst = mgr.directory / f"ckpt-{step:09d}.pt"
    torch.save(state, dst)
    from lsgm.provenance import sha256_file
    dst.with_name(dst.name + ".sha256").write_text(f"{sha256_file(dst)}  {dst.name}\n")
    return dst


def test_resume_skips_a_nan_checkpoint_with_a_matching_checksum(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=4)
    args = ["train-vae", str(cfg_path), "--data-root", str(prepared)]
    run_cli(*args, "--run-root", str(tmp_path / "ref"))
    reference = model_state(tmp_path / "ref" / "tiny" / "vae" / "model.pt")
    runs = tmp_path / "runs"
    res = run_cli(*args, "--run-root", str(runs), faults=("--kill-after-step", "8"), check=False)
    assert res.returncode == -signal.SIGKILL
    mgr = CheckpointManager(runs / "tiny" / "vae" / "checkpoints")
    (_, newest), = [p for p in mgr.paths() if p[0] == 8]
    _poisoned_copy(mgr, newest, 9)  # newer than every valid one, checksum fine, weights NaN
    res = run_cli(*args, "--run-root", str(runs))
    assert "holds non-finite values" in res.stderr and "resumed" in res.stderr and "from step 8" in res.stderr
    assert_bit_identical(model_state(runs / "tiny" / "vae" / "model.pt"), reference)


def test_rollback_skips_a_nan_checkpoint_too(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    good = mgr.save({"w": torch.ones(3)}, 4)
    _poisoned_copy_raw = {"w": torch.tensor([1.0, float("nan"), 0.0])}
    bad = mgr.directory / "ckpt-000000008.pt"
    torch.save(_poisoned_copy_raw, bad)
    from lsgm.provenance import sha256_file
    bad.with_name(bad.name + ".sha256").write_text(f"{sha256_file(bad)}  {bad.name}\n")
    assert mgr.verify(bad)  # the checksum alone would accept it
    step, state = mgr.load_latest()
    assert step == 4 and torch.equal(state["w"], torch.ones(3)) and good.exists()


def test_pruning_never_deletes_the_newest_valid_checkpoint(tmp_path):
    """Three corrupt files with higher step numbers (e.g. left by a diverged run) and a new good checkpoint: the
    good one is kept, the corrupt ones go."""
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    mgr.save({"w": torch.zeros(2)}, 1)
    for step in (10, 20, 30):
        p = mgr.save({"w": torch.full((2,), float(step))}, step)
        p.write_bytes(p.read_bytes()[:40])  # torn after the fact
    new = mgr.save({"w": torch.ones(2)}, 11)
    assert new.exists()
    assert [s for s, _ in mgr.paths()] == [1, 11]
    step, state = mgr.load_latest()
    assert step == 11 and torch.equal(state["w"], torch.ones(2))


def test_a_non_finite_state_is_never_written(tmp_path):
    from lsgm.checkpoint import NonFiniteStateError

    mgr = CheckpointManager(tmp_path / "checkpoints")
    with pytest.raises(NonFiniteStateError, match="refusing to write"):
        mgr.save({"w": torch.tensor([float("inf")])}, 1)
    assert mgr.paths() == []


# ------------------------------------------------------------------------------------------------ 5 + new kills
def test_rerunning_a_finished_stage_keeps_its_outputs(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=1, every=4)
    args = ["train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(tmp_path / "runs")]
    run_cli(*args)
    stage = tmp_path / "runs" / "tiny" / "vae"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (stage / "model.pt", stage / "metrics.json")}
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["final"]["nelbo_nats"] > 0 and metrics["step_seconds"] is not None
    res = run_cli(*args)
    assert "nothing to do" in res.stderr and "--retrain" in res.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    res = run_cli(*args, "--retrain")
    assert "moved" in res.stderr and (stage / "checkpoints-stale-retrain").is_dir()
    assert json.loads((stage / "metrics.json").read_text())["final"] == metrics["final"]  # same run, same numbers


@pytest.mark.parametrize("fault", [("--kill-before-model",), ("--kill-during-checkpoint", "3")],
                         ids=["between-last-checkpoint-and-model", "during-a-checkpoint-write"])
def test_kills_at_the_worst_moments_resume_bit_identical_with_full_metrics(tmp_path, prepared, fault):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=3)
    args = ["train-vae", str(cfg_path), "--data-root", str(prepared)]
    run_cli(*args, "--run-root", str(tmp_path / "ref"))
    ref_stage = tmp_path / "ref" / "tiny" / "vae"
    runs = tmp_path / "runs"
    res = run_cli(*args, "--run-root", str(runs), faults=fault, check=False)
    assert res.returncode == -signal.SIGKILL
    stage = runs / "tiny" / "vae"
    assert not (stage / "model.pt").exists()
    run_cli(*args, "--run-root", str(runs))
    assert_bit_identical(model_state(stage / "model.pt"), model_state(ref_stage / "model.pt"))
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (stage, ref_stage))
    assert got["final"] == want["final"] and got["steps"] == want["steps"]
    assert got["step_seconds"]["steps"] == want["step_seconds"]["steps"]
    assert not list((stage / "checkpoints").glob(".ckpt-*.tmp"))


# ------------------------------------------------------------------------------------------------ 6
def test_checksum_mismatch_is_one_line(tmp_path):
    raw = tmp_path / "raw" / "cifar10"
    raw.mkdir(parents=True)
    (raw / "cifar-10-python.tar.gz").write_bytes(b"not the CIFAR-10 tarball")
    res = lsgm("prepare", "cifar10", "--no-download", "--raw-dir", str(tmp_path / "raw"),
               "--out-dir", str(tmp_path / "prep"))
    assert_one_line_error(res, "checksum mismatch", "cifar-10-python.tar.gz", "--accept-sha256")


def test_giving_up_after_nans_is_one_line(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=4)
    res = run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(tmp_path / "runs"),
                  faults=("--poison", "6"), check=False)
    assert_one_line_error(res, "giving up", "spectral regularisation")


def test_truncated_model_file_is_one_line(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path, vae_epochs=1, every=100)
    runs = tmp_path / "runs"
    run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(runs))
    run_cli("train-lsgm", str(cfg_path), "--data-root", str(prepared), "--run-root", str(runs), "--max-steps", "2")
    model = runs / "tiny" / "lsgm" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    res = lsgm("sample", str(cfg_path), "--run-root", str(runs), "--num-samples", "4")
    assert_one_line_error(res, str(model), "truncated or corrupt", "dvc checkout")


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    if not _mount(mnt, "size=600k"):
        pytest.skip("needs root and mount(8) for a 600 KB tmpfs (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_naming_the_file(tmp_path, prepared, small_disk):
    cfg_path = tiny_config(tmp_path, vae_epochs=2, every=1)
    res = run_cli("train-vae", str(cfg_path), "--data-root", str(prepared), "--run-root", str(small_disk),
                  check=False)
    assert_one_line_error(res, "No space left on device", str(small_disk), "the disk is full")


def test_read_only_file_system_is_one_line(tmp_path, prepared):
    ro = tmp_path / "ro"
    if not _mount(ro, "size=1m,ro"):
        pytest.skip("needs root and mount(8) for a read-only tmpfs (CI runs as root)")
    try:
        res = lsgm("train-vae", str(tiny_config(tmp_path)), "--data-root", str(prepared), "--run-root", str(ro))
        assert_one_line_error(res, "Read-only file system", str(ro))
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ------------------------------------------------------------------------------------------------ 7
def test_a_killed_prepare_leaves_nothing_after_the_next_run(tmp_path):
    out = tmp_path / "prepared"
    code = ("import os, signal; import lsgm.data.prepare as P; real = P._write_outputs\n"
            "def dying(ctx, built):\n    real(ctx, built); os.kill(os.getpid(), signal.SIGKILL)\n"
            "P._write_outputs = dying\n"
            f"P.prepare_dataset('digits', out_dir={str(out)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == -signal.SIGKILL
    assert list(out.glob(".digits.tmp-*")), "the kill leaves its temp folder"
    res = lsgm("prepare", "digits", "--out-dir", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["digits"]
    assert "left by a killed" in res.stdout


def test_a_running_prepare_keeps_its_temp_folder(tmp_path):
    from lsgm.data.prepare import remove_stale_temp_dirs

    live = tmp_path / ".digits.tmp-live"
    live.mkdir()
    (live / ".owner-pid").write_text(f"{os.getpid()}\n")
    assert remove_stale_temp_dirs(tmp_path, "digits") == [] and live.is_dir()


# ------------------------------------------------------------------------------------------------ 10
def test_report_with_an_unknown_experiment_keeps_the_report(tmp_path):
    out = tmp_path / "reports"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "digits_samples.png").write_bytes(b"png")
    (out / "results.md").write_text("old report\n")
    res = lsgm("report", "--experiments", "foo", "--run-root", str(tmp_path / "runs"), "--out-dir", str(out))
    assert_one_line_error(res, "unknown experiment 'foo'", "allowed:")
    assert (out / "results.md").read_text() == "old report\n" and (out / "figures" / "digits_samples.png").exists()


# ------------------------------------------------------------------------------------------------ 11
def test_prepare_lists_every_missing_raw_file(tmp_path):
    res = lsgm("prepare", "mnist", "--no-download", "--raw-dir", str(tmp_path / "raw"),
               "--out-dir", str(tmp_path / "prep"))
    assert_one_line_error(res, "4 of 4 raw files of mnist are missing")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in res.stderr
    assert not (tmp_path / "prep").exists()


def test_accept_sha256_prepares_a_vouched_copy_and_records_it(tmp_path):
    from data_fixtures import write_mnist

    from lsgm.provenance import sha256_file

    write_mnist(tmp_path / "raw", np.random.default_rng(0))  # tiny files: their md5 are not the published ones
    folder = tmp_path / "raw" / "mnist"
    args = ["prepare", "mnist", "--no-download", "--raw-dir", str(tmp_path / "raw"), "--out-dir",
            str(tmp_path / "prep")]
    assert_one_line_error(lsgm(*args), "checksum mismatch")
    accepted = [f"--accept-sha256={p.name}={sha256_file(p)}" for p in sorted(folder.iterdir())]
    res = lsgm(*args, *accepted)
    assert res.returncode == 0, res.stderr
    assert "accepted by its sha256" in res.stderr
    manifest = json.loads((tmp_path / "prep" / "mnist" / "manifest.json").read_text())
    assert all(e["accepted_sha256"] == e["sha256"] and e["verified"] is False for e in manifest["raw_inputs"])
    wrong = accepted[:-1] + [accepted[-1][:-4] + "0000"]
    assert_one_line_error(lsgm(*args, *wrong), "not the", "accepted with --accept-sha256")


# ------------------------------------------------------------------------------------------------ 13
def test_launch_dry_run_outside_slurm_prints_the_command():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", "launch", "--dry-run", "train-lsgm", "cifar10_best_fid",
                          "--stage", "lsgm"], cwd=REPO, capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip().splitlines()[-1]
    assert cmd.startswith("srun ") and "--nnodes 2 --nproc_per_node 8" in cmd and "train-lsgm cifar10_best_fid" in cmd
    assert "outside a Slurm allocation" in res.stdout

"""benchmarks/gpu_check.py --dry-run (issue 17): the prepared GPU check runs its whole code at tiny sizes on the CPU.

One subprocess run of the real script (< 1 minute on 2 cores); the assertions read its JSON: every section is
present and ok, or skipped for a reason the CPU explains (TF32, SyncBatchNorm on gloo, fp16 loss scaling if this
torch cannot do it on the CPU); the resume checks are within their tolerances; throughput numbers are positive;
and the --out file holds exactly what was printed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "train_fp16", "train_bf16", "ddp_torchrun", "train_tf32", "train_fp32", "throughput",
            "flops", "sample_cifar10", "sample_data_space", "compile", "sample_celeba256"]
# sections the CPU may skip, with a word their reason must contain
CPU_SKIPS = {"train_tf32": "TF32", "train_fp16": "fp16"}


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == doc  # the --out file is what was printed
    assert doc["dry_run"] is True and doc["complete"] is True and doc["failures"] == []
    for key in ("device", "torch", "cuda", "budget_s", "elapsed_s", "summary"):
        assert key in doc
    sections = doc["sections"]
    assert list(sections) == SECTIONS
    for name, rec in sections.items():
        if rec["ok"] is None:
            assert name in CPU_SKIPS and CPU_SKIPS[name] in rec["skipped"], (name, rec)
        else:
            assert rec["ok"] is True, (name, rec.get("error"), rec.get("checks"))

    # correctness: no NaN rollback, finite losses, resume within tolerance (fp32 on the CPU: 1e-6 relative)
    resumed = 0
    for case in ("fp32", "bf16", "fp16"):
        sec = sections[f"train_{case}"]
        if sec["ok"] is None:
            continue
        for stage in ("vae", "joint"):
            r = sec[stage]
            assert r["nan_failures"] == 0 and r["steps"] == sec["steps"]
            assert r["images_per_s"] > 0 and r["step_seconds"]["median"] > 0
            rc = r["resume"]
            assert rc["resumed"] and rc["within_tolerance"], rc
            assert rc["max_rel_diff"] <= rc["tolerance_rel"] == (1e-6 if case == "fp32" else 1e-2)
            resumed += 1
            if case == "fp16":
                assert r["scaler_checks"]["enabled"] and r["scaler_checks"]["evolves"]
            else:
                assert not r["scaler_checks"]["enabled"]
    assert resumed >= 4  # fp32 and bf16, both stages

    # torchrun: gloo process group all-reduces; SyncBatchNorm is skipped on CPU with the reason; train_vae ran
    ddp = sections["ddp_torchrun"]
    assert ddp["process_group"]["backend"] == "gloo" and ddp["all_reduce"]["value"] == ddp["all_reduce"]["expected"]
    assert "gloo" in ddp["syncbn"]["skipped"]
    assert ddp["train_vae"]["processes"] == 1 and ddp["train_vae"]["nan_failures"] == 0

    # throughput, FLOPs, compile, sampling: positive numbers (peak unknown on the CPU)
    table = sections["throughput"]["images_per_s"]
    assert set(table) == {"vae", "joint"} and all(v > 0 for t in table.values() for v in t.values())
    assert {"fp32", "bf16"} <= set(table["vae"]) and {"fp32", "bf16"} <= set(table["joint"])
    flops = sections["flops"]
    assert flops["flops_fwd_bwd"] > flops["flops_fwd"] > 0 and flops["achieved_tflops"] > 0
    assert flops["peak_dense_tflops"] is None
    comp = sections["compile"]
    assert comp["compile_first_call_s"] > 0 and comp["compiled_s_median"] > 0 and comp["eager_s_median"] > 0
    for name in ("sample_cifar10", "sample_data_space", "sample_celeba256"):
        s = sections[name]
        assert s["nfe"] > 0 and s["seconds_per_nfe"] > 0 and s["shape"][0] == 16
    assert sections["sample_data_space"]["shape"][1:] == [3, 32, 32]

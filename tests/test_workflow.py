"""The DAG: Snakemake rules, the slurm profile and the generated dvc.yaml agree and resolve (real tools).

Fast tests: generated files current; `snakemake -n` (with `--profile slurm`) over every experiment; lint;
the Snakemake job list and DVC's stage index give the same stages, commands, inputs and outputs; params per key.
Slow tests (``-m slow``): a tiny digits pipeline through real Snakemake, real ``dvc repro`` and a real local
Slurm (``.ci/slurm/start_local_slurm.sh``) including ``scancel`` of training and a resuming rerun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lsgm import pipeline as P

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
DVC = str(BIN / "dvc")
LOG_REDIRECT = re.compile(r"\s+(?:>\s*logs/\S+\s+2>&1|2>\s*logs/\S+)$")


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def parse_dry_run(text: str) -> dict[str, dict]:
    """Snakemake `-n -p` output -> {first output: {rule, inputs, outputs, cmd, resources}} (jobs with a shell)."""
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M))
        cmd = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        if not cmd or "output" not in fields:
            continue  # rule all
        outputs = fields["output"].split(", ")
        jobs[outputs[0]] = {
            "rule": m.group(1),
            "inputs": set(fields.get("input", "").split(", ")) - {""},
            "outputs": set(outputs),
            "cmd": LOG_REDIRECT.sub("", cmd.group(1).strip()),
            "resources": dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if "=" in kv),
        }
    return jobs


def dvc_stages(root: Path) -> dict[str, dict]:
    """DVC's own view of dvc.yaml + workflow/dvc.yaml -> {first non-persist output: stage facts}."""
    from dvc.repo import Repo

    from dvc.dependency.param import ParamsDependency

    out = {}
    with Repo(str(root)) as repo:
        for st in repo.index.stages:
            rel = lambda o: os.path.relpath(o.fs_path, root)  # noqa: E731
            outs = [o for o in st.outs if not o.persist]
            deps = [d for d in st.deps if not isinstance(d, ParamsDependency)]
            params = {k for d in st.deps if isinstance(d, ParamsDependency) for k in d.params}
            out[rel(outs[0])] = {
                "name": st.addressing, "cmd": st.cmd, "inputs": {rel(d) for d in deps},
                "outputs": {rel(o) for o in outs}, "persist": {rel(o) for o in st.outs if o.persist},
                "params": params,
                "params_files": {rel(d) for d in st.deps if isinstance(d, ParamsDependency)},
            }
    return out


@pytest.fixture(scope="module")
def dry_run_all() -> dict[str, dict]:
    proc = _run([SNAKEMAKE, "-n", "-F", "-p", "--config", "exps=all", "--cores", "8"])
    return parse_dry_run(proc.stdout)


# ------------------------------------------------------------------------------------------------ fast
def test_generated_files_are_current():
    stale = [rel for rel, text in P.expected_files(ROOT).items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text() != text]
    assert not stale, f"stale generated files {stale}: run `python -m lsgm.pipeline write`"


def test_default_target_through_slurm_profile_dry_run():
    """`snakemake -n --profile slurm` from the repo root finds ./slurm and plans the default experiments."""
    proc = _run([SNAKEMAKE, "-n", "-F", "-p", "--profile", "slurm", "--cores", "8"])
    jobs = parse_dry_run(proc.stdout)
    assert "Using profile slurm" in proc.stdout
    rules = sorted(j["rule"] for j in jobs.values())
    assert rules == sorted(["resolve_config", "prepare", "train_vae", "train_lsgm", "sample", "eval_nll",
                            "eval_nll", "report"])
    assert jobs["reports/results.md"]["cmd"] == "lsgm report --experiments digits"
    dvc = dvc_stages(ROOT)
    assert jobs["reports/results.md"]["inputs"] == dvc["reports/results.md"]["inputs"]
    assert jobs["reports/results.md"]["outputs"] == dvc["reports/results.md"]["outputs"]


def test_all_experiments_resolve_and_match_the_stage_table(dry_run_all):
    pipe = P.build_pipeline(root=ROOT)
    want = {st.outputs[0]: st for st in pipe.stages if st.kind != "report"}
    got = {k: v for k, v in dry_run_all.items() if v["rule"] != "report"}
    assert set(got) == set(want)
    for key, job in got.items():
        assert job["rule"] == want[key].kind
        assert job["cmd"] == want[key].cmd
    # the CelebA qualitative third stage starts from the second one's model
    frozen = got["data/runs/celeba256_qualitative/frozen_vae/model.pt"]
    assert "data/runs/celeba256_qualitative/lsgm/model.pt" in frozen["inputs"]
    assert got["data/runs/celeba256_qualitative/sample/samples.npz"]["inputs"] >= {
        "data/runs/celeba256_qualitative/frozen_vae/model.pt"}
    assert {j["rule"] for j in got.values() if "cifar10" in j["cmd"]} >= {"fid_stats", "eval_fid"}


def test_snakemake_and_dvc_graphs_agree(dry_run_all):
    """Same stages, commands, inputs and outputs for every experiment (report: see the default-target test)."""
    dvc = {k: v for k, v in dvc_stages(ROOT).items() if v["name"] != "report"}
    smk = {k: v for k, v in dry_run_all.items() if v["rule"] != "report"}
    assert set(dvc) == set(smk)
    for key in smk:
        s, d = smk[key], dvc[key]
        assert d["name"].split(":")[-1].split("@")[0] == s["rule"], key
        assert d["cmd"] == s["cmd"], key
        assert d["inputs"] == s["inputs"], (key, d["inputs"] ^ s["inputs"])
        assert d["outputs"] == s["outputs"], (key, d["outputs"] ^ s["outputs"])
        assert not (d["persist"] & s["outputs"]), "persistent run state must not be a Snakemake output"


def test_dvc_params_per_key_match_the_table():
    pipe = P.build_pipeline(root=ROOT)
    dvc = dvc_stages(ROOT)
    for st in pipe.stages:
        d = dvc[st.outputs[0]]
        assert d["params"] == set(st.params), st.dvc_name
        if st.params:
            assert d["params_files"] == {f"params/resolved/{st.exp}.yaml"}


def test_resources_reach_snakemake(dry_run_all):
    cifar = dry_run_all["data/runs/cifar10_best_fid/lsgm/model.pt"]["resources"]
    assert cifar["nodes"] == "2" and cifar["gres"] == "gpu:8" and cifar["mpi"] == "srun"
    assert cifar["cpus_per_task"] == str(8 * 8) and cifar["runtime"] == "4320"
    assert dry_run_all["data/runs/cifar10_best_fid/lsgm/model.pt"]["cmd"].startswith("lsgm launch train-lsgm ")
    vae = dry_run_all["data/runs/cifar10_best_fid/vae/model.pt"]
    assert vae["cmd"].startswith("lsgm launch train-vae ")  # layout resolved in the job (tests/test_multinode.py)
    assert "mpi" not in vae["resources"]
    digits = dry_run_all["data/runs/digits/vae/model.pt"]
    assert digits["cmd"] == "lsgm train-vae digits"
    assert digits["resources"]["gres"] == "" and digits["resources"]["mem_mb"] == "2000"


def test_lint_is_clean_apart_from_conda_advice():
    proc = _run([SNAKEMAKE, "--lint"], check=False)
    lints = re.findall(r"^\s+\* (.*)$", proc.stdout, flags=re.M)
    assert lints, "expected at least the known conda/container advice"
    other = [l for l in lints if not l.startswith("Specify a conda environment or container")]
    assert not other, other


def test_params_per_key_rerun_only_sampling_branch(tmp_path):
    """Changing sampling.ode_tol changes the params of `sample` only; with the graph that is sample + report."""
    shutil.copytree(ROOT / "params", tmp_path / "params")
    shutil.copytree(ROOT / "lsgm", tmp_path / "lsgm")
    before = P.build_pipeline(["digits"], ["digits"], root=tmp_path)
    path = tmp_path / "params" / "digits.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["sampling"]["ode_tol"] = 1e-3
    path.write_text(yaml.safe_dump(raw))
    after = P.build_pipeline(["digits"], ["digits"], root=tmp_path)
    changed = {a.dvc_name for a, b in zip(after.stages, before.stages)
               if P.section_values(after.config(a), a.params) != P.section_values(before.config(b), b.params)}
    assert changed == {"sample@digits"}
    # downstream closure through the stage table's own edges
    todo, rerun = list(changed), set(changed)
    by_name = {s.dvc_name: s for s in after.stages}
    while todo:
        outs = set(by_name[todo.pop()].outputs)
        for s in after.stages:
            if s.dvc_name not in rerun and outs & set(s.deps):
                rerun.add(s.dvc_name)
                todo.append(s.dvc_name)
    assert rerun == {"sample@digits", "report"}


def test_launcher_and_slurm_resources():
    from lsgm.config import ResourceConfig

    assert P.launcher(ResourceConfig()) == "lsgm"
    assert P.launcher(ResourceConfig(gpus_per_node=1)) == "lsgm"
    assert P.launcher(ResourceConfig(gpus_per_node=4)) == "lsgm launch"
    assert P.launcher(ResourceConfig(nodes=2, gpus_per_node=8)) == "lsgm launch"
    res = P.slurm_resources(ResourceConfig(gpus_per_node=2, gpu_model="a100", cpus_per_task=4, partition="gpu"))
    assert res["gres"] == "gpu:a100:2" and res["cpus_per_task"] == 8 and res["slurm_partition"] == "gpu"
    assert res["mpi"] is None and P.slurm_resources(ResourceConfig(nodes=3))["mpi"] == "srun"


def test_module_deps_follow_lsgm_imports(tmp_path):
    pkg = tmp_path / "lsgm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom . import b\nfrom lsgm.sub import c\nfrom lsgm import missing\n")
    (pkg / "b.py").write_text("def f():\n    import lsgm.sub.d\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..b import f\n")
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "unused.py").write_text("")
    assert P.module_deps("lsgm.a", tmp_path) == ["lsgm/__init__.py", "lsgm/a.py", "lsgm/b.py", "lsgm/sub/__init__.py",
                                                 "lsgm/sub/c.py", "lsgm/sub/d.py"]


def test_reserved_stage_name_is_rejected(tmp_path):
    shutil.copytree(ROOT / "params", tmp_path / "params")
    path = tmp_path / "params" / "digits.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["prior"] = {"sample": raw["prior"]["lsgm"]}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="'sample' is reserved"):
        P.build_pipeline(["digits"], ["digits"], root=tmp_path)


def test_profiles():
    prof = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and "cpus_per_task" not in (prof.get("default-resources") or {})
    ci = yaml.safe_load((ROOT / ".ci" / "slurm-profile" / "config.yaml").read_text())
    assert ci["executor"] == "slurm" and ci["slurm-status-command"] == "squeue"
    assert "cpus_per_task" not in ci["default-resources"]
    dvc_cfg = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"type\s*=\s*\"?hardlink", dvc_cfg) and re.search(r"analytics\s*=\s*false", dvc_cfg)


# ------------------------------------------------------------------------------------------------ slow
TINY = {  # a digits run that takes seconds per stage on a CPU
    "data": {"max_train_images": 128, "max_eval_images": 32},
    "train_vae": {"epochs": 1, "batch_size": 32},
    "prior": {"lsgm": {"train": {"epochs": 1, "batch_size": 32}}},
    "sampling": {"num_samples": 16, "batch_size": 16, "ode_tol": 1.0e-3},
    "eval_nll": {"batch_size": 32, "ode_tol": 1.0e-3},
    "engine": {"checkpoint_every_steps": 1},
}


def _deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = _deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def _set_params(repo: Path, update: dict, regenerate: bool = True) -> None:
    """Edit params/digits.yaml; `regenerate`: also rewrite the generated files (else the pipeline must)."""
    path = repo / "params" / "digits.yaml"
    path.write_text(yaml.safe_dump(_deep_update(yaml.safe_load(path.read_text()), update), sort_keys=False))
    if regenerate:
        _run([sys.executable, "-m", "lsgm.pipeline", "write", "--root", str(repo)], cwd=repo, env=_env(repo))


def _env(repo: Path) -> dict:
    return {"PYTHONPATH": str(repo), "PATH": f"{BIN}:{os.environ['PATH']}", "LSGM_ROOT": str(repo)}


def _copy_repo(dest: Path, update: dict = TINY) -> Path:
    """A clean copy of the working tree (tracked + untracked, not ignored) with a tiny digits config."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"]).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _set_params(dest, update)
    return dest


def _lsgm_works() -> bool:
    try:
        import lsgm.evaluate  # noqa: F401
        import lsgm.report  # noqa: F401
        import lsgm.train  # noqa: F401
    except ImportError:
        return False
    return True


needs_pipeline = pytest.mark.skipif(not _lsgm_works(), reason="lsgm.train / lsgm.evaluate / lsgm.report not written yet")


@pytest.mark.slow
@needs_pipeline
def test_snakemake_end_to_end_and_param_rerun(tmp_path):
    repo = _copy_repo(tmp_path)
    env = _env(repo)
    t0 = time.time()
    _run([SNAKEMAKE, "--cores", "2"], cwd=repo, env=env, timeout=900)
    print(f"snakemake end to end: {time.time() - t0:.0f} s")
    for rel in ("reports/results.md", "data/runs/digits/sample/grid.png",
                "data/runs/digits/eval/nll_lsgm.json", "benchmarks/out/digits/train_vae.tsv"):
        assert (repo / rel).exists(), rel
    assert "Nothing to be done" in _run([SNAKEMAKE, "-n", "--cores", "2"], cwd=repo, env=env).stdout
    _set_params(repo, {"sampling": {"ode_tol": 2.0e-3}}, regenerate=False)  # as a user would
    jobs = parse_dry_run(_run([SNAKEMAKE, "-n", "-p", "--cores", "2"], cwd=repo, env=env).stdout)
    assert sorted(j["rule"] for j in jobs.values()) == ["report", "resolve_config", "sample"]
    _run([SNAKEMAKE, "--report", "reports/report.html"], cwd=repo, env=env)
    assert (repo / "reports" / "report.html").stat().st_size > 10_000


def _ran_stages(text: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", text))


@pytest.mark.slow
@needs_pipeline
def test_dvc_repro_noop_and_param_rerun(tmp_path):
    repo = _copy_repo(tmp_path)
    env = _env(repo)
    _run(["git", "init", "-q"], cwd=repo)
    _run(["git", "add", "-A"], cwd=repo)
    _run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "init"], cwd=repo)
    first = _run([DVC, "repro"], cwd=repo, env=env, timeout=900)
    assert {"train_vae@digits", "train_lsgm@digits-lsgm", "sample@digits", "report"} <= _ran_stages(first.stdout)
    assert (repo / "reports" / "results.md").exists()
    second = _run([DVC, "repro"], cwd=repo, env=env)
    assert _ran_stages(second.stdout) == set(), second.stdout
    _set_params(repo, {"sampling": {"ode_tol": 2.0e-3}}, regenerate=False)  # resolve_config@digits rewrites it
    third = _run([DVC, "repro"], cwd=repo, env=env, timeout=600)
    assert _ran_stages(third.stdout) == {"resolve_config@digits", "sample@digits", "report"}, third.stdout
    # the cache links keep mtimes: Snakemake sees the DVC-built outputs as up to date
    assert os.stat(repo / "data/runs/digits/vae/model.pt").st_nlink >= 2


@pytest.mark.slow
@needs_pipeline
def test_slurm_profile_scancel_and_resume(tmp_path, local_slurm):
    """Jobs go through Slurm; a training job cancelled mid-way resumes from its checkpoint on the rerun."""
    repo = _copy_repo(tmp_path, _deep_update(json.loads(json.dumps(TINY)), {"train_vae": {"epochs": 30}}))
    env = {**_env(repo), **local_slurm}
    cmd = [SNAKEMAKE, "--cores", "2", "--profile", ".ci/slurm-profile"]
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpts = repo / "data/runs/digits/vae/checkpoints"
    job_id = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and job_id is None:
            time.sleep(0.5)
            if len(list(ckpts.glob("*.pt"))) >= 3:  # checkpoints after step 0 exist
                q = _run(["squeue", "-h", "-o", "%i %k"], env=env).stdout
                job_id = next((ln.split()[0] for ln in q.splitlines() if "train_vae" in ln), None)
        assert job_id, "train_vae never wrote a checkpoint under Slurm"
        _run(["scancel", job_id], env=env)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    assert proc.returncode != 0, out
    assert not (repo / "data/runs/digits/vae/model.pt").exists()
    rerun = _run(cmd, cwd=repo, env=env, timeout=900)
    slurm_ids = re.findall(r"submitted with SLURM jobid (\d+)", rerun.stdout)
    assert len(slurm_ids) >= 6, rerun.stdout[-3000:]  # train_vae (resumed) ... report, each a Slurm job
    assert (repo / "reports/results.md").exists()
    resumed = re.findall(r"resumed \S+ from step (\d+)", (repo / "logs/digits/train_vae.log").read_text())
    assert resumed and int(resumed[0]) > 0, "the rerun started over instead of resuming"
    assert list((repo / ".snakemake" / "slurm_logs").rglob("*.log"))

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
import torch
import yaml

from lsgm import pipeline as P

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
DVC = str(BIN / "dvc")
LOG_REDIRECT = re.compile(r"\s+2>&1 \| tee logs/\S+ \| .*$")  # lsgm.pipeline.SNAKEMAKE_LOG with {log} filled in


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
    proc = _run([SNAKEMAKE, "-n", "-F", "-p", "--config", "exps=all", "--cores", "8", "all", "claims"])
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
    assert rules == sorted(["resolve_config", "prepare", "train_classifier", "train_vae", "train_lsgm", "sample",
                            "eval_nll", "eval_nll", "eval_fd", "report"])
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
    """Same stages, commands, inputs and outputs for every experiment (report: see the default-target test).

    Snakemake's inputs are DVC's deps plus the files that carry what DVC tracks as params: the stage's
    params/resolved/stages/STAGE.json (DVC: the same keys of params/resolved/EXP.yaml) and, for resolve_config,
    params.yaml (DVC: its EXP key)."""
    pipe = {st.outputs[0]: st for st in P.build_pipeline(root=ROOT).stages}
    dvc = {k: v for k, v in dvc_stages(ROOT).items() if v["name"] != "report"}
    smk = {k: v for k, v in dry_run_all.items() if v["rule"] != "report"}
    assert set(dvc) == set(smk)
    for key in smk:
        s, d, st = smk[key], dvc[key], pipe[key]
        assert d["name"].split(":")[-1].split("@")[0] == s["rule"], key
        assert d["cmd"] == s["cmd"], key
        params_inputs = {f for f in (st.params_file, "params.yaml" if st.kind == "resolve_config" else None) if f}
        assert d["inputs"] | params_inputs == s["inputs"], (key, (d["inputs"] | params_inputs) ^ s["inputs"])
        assert (st.params_file is not None) == bool(st.params), key
        assert d["outputs"] == s["outputs"], (key, d["outputs"] ^ s["outputs"])
        assert not (d["persist"] & s["outputs"]), "persistent run state must not be a Snakemake output"


def test_dvc_params_per_key_match_the_table():
    pipe = P.build_pipeline(root=ROOT)
    dvc = dvc_stages(ROOT)
    for st in pipe.stages:
        d = dvc[st.outputs[0]]
        if st.kind == "resolve_config":  # the experiment's entry of params.yaml (what `dvc exp run -S` edits)
            assert d["params"] == {st.exp} and d["params_files"] == {"params.yaml"}, st.dvc_name
            continue
        assert d["params"] == set(st.params), st.dvc_name
        if st.params:
            assert d["params_files"] == {f"params/resolved/{st.exp}.yaml"}
            assert (ROOT / st.params_file).read_text() == P.stage_params_text(pipe, st), st.dvc_name


def test_dvc_metrics_and_plots_are_declared_where_git_and_dvc_see_them():
    """Headline metrics: the folder metrics/ (only experiments that ran have files there), kept in git; the JSONs
    under data/ are cached outputs, not metrics; the DVCLive logs of the default experiments are plots (x = step)."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert doc["metrics"] == ["metrics"]
    assert not re.search(r"^\s*(metrics|plots):\s*$", (ROOT / "workflow" / "dvc.yaml").read_text(), flags=re.M)
    plots = {k: v for p in doc["plots"] for k, v in p.items()}
    assert set(plots) == {"data/runs/digits/vae/dvclive/plots/metrics", "data/runs/digits/lsgm/dvclive/plots/metrics",
                          "reports/figures"}
    assert plots["data/runs/digits/vae/dvclive/plots/metrics"]["x"] == "step"
    assert "global batch 64" in plots["data/runs/digits/vae/dvclive/plots/metrics"]["x_label"]
    stages = dvc_stages(ROOT)
    nll = stages["data/runs/digits/eval/nll_lsgm.json"]
    assert nll["outputs"] == {"data/runs/digits/eval/nll_lsgm.json", "metrics/digits/nll_lsgm.json"}
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        outs = {os.path.relpath(o.fs_path, ROOT): o for st in repo.index.stages for o in st.outs}
    assert outs["data/runs/digits/eval/nll_lsgm.json"].use_cache and not outs["metrics/digits/nll_lsgm.json"].use_cache
    assert outs["data/runs/digits/vae/dvclive"].persist and outs["data/runs/digits/vae/dvclive"].use_cache
    assert not any(o.metric or o.plot for o in outs.values())
    ignored = _run(["git", "check-ignore", "-q", "metrics/digits/nll_lsgm.json"], check=False)
    assert ignored.returncode == 1, "metrics/ must not be git-ignored: DVC experiments commit it"


def test_params_yaml_has_an_entry_for_every_experiment():
    from lsgm.config import list_experiments, read_overrides

    assert set(read_overrides(ROOT)) == set(list_experiments(ROOT))
    assert P.overrides_text(ROOT) == (ROOT / "params.yaml").read_text()


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
    """Changing sampling.ode_tol changes the params of `sample` only; with the graph that is sample, the FD of its
    samples and the report."""
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
    assert rerun == {"sample@digits", "eval_fd@digits-default", "report"}


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
    assert re.search(r"^\s*type\s*=\s*\"?copy\"?\s*$", dvc_cfg, flags=re.M) and re.search(r"analytics\s*=\s*false", dvc_cfg)
    assert ".snakemake_timestamp" in (ROOT / ".dvcignore").read_text().split()


# ------------------------------------------------------------------------------------------------ slow
TINY = {  # a digits run that takes seconds per stage on a CPU
    "data": {"max_train_images": 128, "max_eval_images": 32},
    "train_vae": {"epochs": 1, "batch_size": 32},
    "prior": {"lsgm": {"train": {"epochs": 1, "batch_size": 32}}},
    "sampling": {"num_samples": 16, "batch_size": 16, "ode_tol": 1.0e-3},
    "eval_nll": {"batch_size": 32, "ode_tol": 1.0e-3},
    "eval_fd": {"classifier_epochs": 1, "max_reference_images": 128, "kid_subset_size": 16, "subset_size": 16},
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


def _git_commit_all(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], cwd=repo)
    _run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", message], cwd=repo)


def _git_repo(tmp_path: Path) -> Path:
    """A tiny-config copy of the working tree as a git repository with one commit (a fresh clone)."""
    repo = _copy_repo(tmp_path)
    _run(["git", "init", "-q"], cwd=repo)
    _git_commit_all(repo, "init")
    return repo


@pytest.fixture(scope="module")
def smk_run(tmp_path_factory):
    """A fresh clone after the main job: `snakemake --cores 2` on the tiny digits config (its terminal output kept)."""
    if not _lsgm_works():
        pytest.skip("lsgm.train / lsgm.evaluate / lsgm.report not written yet")
    repo = _git_repo(tmp_path_factory.mktemp("smk"))
    env = _env(repo)
    t0 = time.time()
    out = _run([SNAKEMAKE, "--cores", "2"], cwd=repo, env=env, timeout=900).stdout
    print(f"snakemake end to end: {time.time() - t0:.0f} s")
    return repo, env, out


@pytest.mark.slow
def test_snakemake_end_to_end_progress_and_dvc_record(smk_run):
    """The main job's outputs; each job's progress in the terminal (about every 10 %, with ETA) while the full log
    goes to logs/; afterwards DVC knows the outputs (the Snakefile's `dvc commit`): nothing to redo in either tool."""
    repo, env, out = smk_run
    for rel in ("reports/results.md", "reports/results.html", "reports/checks.html", "reports/checks.md",
                "data/runs/digits/sample/grid.png", "data/runs/digits/eval/nll_lsgm.json", "metrics/digits/nll_lsgm.json",
                "metrics/digits/sample.json", "metrics/digits/train_vae.json", "metrics/digits/fd_default.json",
                "dvc.lock"):
        assert (repo / rel).exists(), rel
    assert "Sample quality: **FD in digits-classifier features" in (repo / "reports/checks.md").read_text()
    lines = re.findall(r"^progress: digits/vae: +(\d+)% (\d+)/(\d+) step \[.* elapsed, ETA .*\]$", out, flags=re.M)
    assert [int(p) for p, _, _ in lines] == [0, 25, 50, 75, 100], out[-3000:]  # 4 steps: one line per step here
    for job in ("digits/lsgm", r"sample digits", r"eval-nll digits \(lsgm\)", r"eval-nll digits \(vae\)",
                "classifier digits"):
        assert re.search(rf"^progress: {job}: 100% ", out, flags=re.M), job
    log = (repo / "logs/digits/train_vae.log").read_text()
    assert "progress: digits/vae: 100%" in log and "global batch 32" in log  # the log keeps everything
    assert "global batch 32" not in out  # ... the terminal only progress and errors
    assert "lsgm: recorded 10 stages in dvc.lock" in out
    assert "Nothing to be done" in _run([SNAKEMAKE, "-n", "--cores", "2"], cwd=repo, env=env).stdout
    assert "Data and pipelines are up to date" in _run([DVC, "status", "dvc.yaml"], cwd=repo, env=env).stdout
    assert _ran_stages(_run([DVC, "repro"], cwd=repo, env=env).stdout) == set()
    headline = json.loads((repo / "metrics/digits/nll_lsgm.json").read_text())
    full = json.loads((repo / "data/runs/digits/eval/nll_lsgm.json").read_text())
    assert headline["nll_nats"] == pytest.approx(full["nll_nats"], rel=1e-5) and "commit" not in headline
    metrics_show = _run([DVC, "metrics", "show"], cwd=repo, env=env)
    assert "failed" not in metrics_show.stdout.lower() and "mnist" not in metrics_show.stdout
    assert re.search(r"^metrics/digits/nll_lsgm\.json\s+\S+", metrics_show.stdout, flags=re.M), metrics_show.stdout


@pytest.mark.slow
def test_snakemake_report_in_headless_chromium(smk_run, tmp_path):
    """`snakemake --report`: results, claims and every figure of reports/ with a caption and a category; shown in a
    real browser (headless Chromium): each figure's <img> decodes at its size, the HTML pages render."""
    from browser import chromium, data_uri_bytes, ink_fraction, report_data, show_result

    browser = chromium()
    repo, env, _ = smk_run
    _run([SNAKEMAKE, "--report", "reports/report.html"], cwd=repo, env=env, timeout=300)
    results, categories = report_data(repo / "reports" / "report.html")
    figures = sorted(p.relative_to(repo).as_posix() for p in (repo / "reports" / "figures").rglob("*.png"))
    assert {f.split("/")[2] for f in figures} == {"samples", "training", "nfe"}
    assert set(figures) | {"reports/results.html", "reports/checks.html"} == set(results)
    assert set(categories) == {"1. Results", "2. Checks", "3. Figures"}
    assert set(categories["3. Figures"]) == {"samples", "training", "nfe"}
    from PIL import Image

    for path, entry in results.items():
        assert entry["caption"].strip(), f"{path} has no caption"
        assert data_uri_bytes(entry["data_uri"]) == (repo / path).read_bytes(), path
        shown = show_result(browser, repo / "reports" / "report.html", path, tmp_path)
        assert shown.check["found"] and shown.check["caption"], (path, shown.check)
        if path.endswith(".png"):
            assert shown.check["img"] == list(Image.open(repo / path).size), (path, shown.check)
        else:
            assert shown.check["iframe"], (path, shown.check)
        assert ink_fraction(shown.screenshot, (600, 50, 1550, 950)) > 0.01, f"{path}: the content area is blank"
        assert ink_fraction(shown.screenshot, (0, 0, 560, 950)) > 0.05, f"{path}: no caption panel"
    html = data_uri_bytes(results["reports/results.html"]["data_uri"]).decode()
    assert "<table>" in html and "Tab. 2 of the paper" in html and "spec §" not in html
    sample = Image.open(repo / "reports/figures/samples/digits_samples.png")
    assert sample.size[0] >= 2 * 256  # two grids (samples, real images), each upscaled to >= 256 px wide


@pytest.mark.slow
def test_cli_set_override_in_a_run(smk_run):
    """`lsgm sample digits --set sampling.ode_tol=...` runs, and its resolved config, hashes and command record it;
    a bad override gets the params-file error; Snakemake and DVC then see the changed outputs."""
    repo, env, _ = smk_run
    bad = _run(["lsgm", "sample", "digits", "--set", "sampling.ode_tol=-1"], cwd=repo, env=env, check=False)
    assert bad.returncode == 2 and bad.stdout.strip().splitlines()[-1] == (
        f"lsgm: config error: --set sampling.ode_tol=-1: sampling.ode_tol = -1.0 is out of range; allowed: > 0 "
        f"(overriding {repo / 'params' / 'digits.yaml'})")
    before = json.loads((repo / "data/runs/digits/sample/sample_stats.json").read_text())
    samples = repo / "data/runs/digits/sample/samples.npz"
    samples_before = samples.read_bytes()
    _run(["lsgm", "sample", "digits", "--set", "sampling.ode_tol=3e-3"], cwd=repo, env=env, timeout=300)
    # Snakemake compares the content of a small input whose mtime changed: the FD of the samples reruns only if
    # the uint8 samples changed (a small tolerance change can leave them equal)
    fd = ["eval_fd"] if samples.read_bytes() != samples_before else []
    resolved = yaml.safe_load((repo / "data/runs/digits/sample/resolved_config.yaml").read_text())
    assert resolved["sampling"]["ode_tol"] == 3e-3 and resolved["cli_overrides"] == ["sampling.ode_tol=3e-3"]
    stats = json.loads((repo / "data/runs/digits/sample/sample_stats.json").read_text())
    assert stats["tol"] == 3e-3 and stats["command"].endswith("--set sampling.ode_tol=3e-3")
    assert stats["params_hash"] != before["params_hash"] and stats["experiment_hash"] != before["experiment_hash"]
    status = _run([DVC, "status", "dvc.yaml"], cwd=repo, env=env).stdout
    assert re.search(r"sample@digits:\s+changed outs:\s+modified:\s+data/runs/digits/sample/sample_stats.json",
                     status), status
    jobs = parse_dry_run(_run([SNAKEMAKE, "-n", "-p", "--cores", "2"], cwd=repo, env=env).stdout)
    assert sorted(j["rule"] for j in jobs.values()) == fd + ["report"]  # downstream of the new samples
    # the pipeline's way: a value in the params: only the stages that read it rerun
    _set_params(repo, {"sampling": {"ode_tol": 2.0e-3}}, regenerate=False)  # as a user would
    jobs = parse_dry_run(_run([SNAKEMAKE, "-n", "-p", "--cores", "2"], cwd=repo, env=env).stdout)
    assert sorted(j["rule"] for j in jobs.values()) == ["eval_fd", "report", "resolve_config", "sample"]  # (planned)


def _ran_stages(text: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", text))


def _table_width(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


EXP_SHOW = ["exp", "show", "--no-pager", "--only-changed", "--drop", "Created|data/|lsgm/|.*wall_seconds",
            "--keep", r"Experiment|.*/nll_lsgm\.json:nll_nats$|.*/sample\.json:nfe_mean$"]  # as README, "Running with DVC"


@pytest.mark.slow
def test_dvc_repro_experiments_metrics_plots(tmp_path):
    """`dvc repro` on a fresh clone; then `snakemake -n` has nothing to do; `dvc exp run -S` changes exactly one value
    (and one line group of params.yaml) and reruns exactly the stages that read it; `dvc exp show` (README flags)
    fits 200 columns with the NLL and NFE of both runs; metrics and plots show without errors; diffs work."""
    repo = _git_repo(tmp_path)
    env = _env(repo)
    first = _run([DVC, "repro"], cwd=repo, env=env, timeout=900)
    assert {"train_vae@digits", "train_lsgm@digits-lsgm", "sample@digits", "report"} <= _ran_stages(first.stdout)
    assert (repo / "reports" / "results.md").exists()
    assert _ran_stages(_run([DVC, "repro"], cwd=repo, env=env).stdout) == set()
    smk = _run([SNAKEMAKE, "-n", "--cores", "2"], cwd=repo, env=env).stdout
    assert "Nothing to be done" in smk, smk[-3000:]
    _git_commit_all(repo, "baseline")  # dvc.lock and metrics/, as the README says

    params_before = (repo / "params.yaml").read_text()
    resolved_before = yaml.safe_load((repo / "params/resolved/digits.yaml").read_text())
    samples = repo / "data/runs/digits/sample/samples.npz"
    samples_before = samples.read_bytes()
    exp = _run([DVC, "exp", "run", "-S", "++digits.sampling.ode_tol=2e-3"], cwd=repo, env=env, timeout=600)
    # the FD of the samples reruns only if the uint8 samples changed: the tiny run's prior is so close to N(0, I)
    # that its ODE barely moves, and even ode_tol 1e-2 leaves the uint8 samples bit-identical (measured)
    same_samples = samples.read_bytes() == samples_before
    fd_rerun = set() if same_samples else {"eval_fd@digits-default"}
    assert _ran_stages(exp.stdout) == {"resolve_config@digits", "sample@digits", "report"} | fd_rerun, exp.stdout
    resolved_after = yaml.safe_load((repo / "params/resolved/digits.yaml").read_text())
    assert resolved_after["sampling"]["ode_tol"] == 2e-3
    resolved_after["sampling"]["ode_tol"] = resolved_before["sampling"]["ode_tol"]
    assert resolved_after == resolved_before, "exactly one value changed"
    assert (repo / "params.yaml").read_text() == params_before.replace(
        "digits: {}\n", "digits:\n  sampling:\n    ode_tol: 0.002\n"), "only the changed entry was rewritten"
    smk = _run([SNAKEMAKE, "-n", "-p", "--cores", "2"], cwd=repo, env=env).stdout
    if same_samples:  # where the tools differ: DVC compares content and skipped the FD; Snakemake compares the mtime
        # (content only for small outputs it produced itself) and plans the FD and the report again: extra work on the
        # same bytes, never a stale result (README "Running with DVC")
        assert sorted(j["rule"] for j in parse_dry_run(smk).values()) == ["eval_fd", "report"], smk[-4000:]
        assert "reason: Updated input files: data/runs/digits/sample/samples.npz" in smk, smk[-4000:]
    else:
        assert "Nothing to be done" in smk, smk[-4000:]

    show = _run([DVC, *EXP_SHOW], cwd=repo, env={**env, "COLUMNS": "400"}).stdout
    assert _table_width(show) <= 200, show
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo).stdout.strip()
    lines = show.splitlines()
    base_row = next(line for line in lines if line.split()[:1] == [branch])
    exp_row = next(line for line in lines if re.search(r"\[[a-z]+-[a-z]+\]", line))
    nll = json.loads((repo / "metrics/digits/nll_lsgm.json").read_text())["nll_nats"]
    nfe_exp = json.loads((repo / "metrics/digits/sample.json").read_text())["nfe_mean"]
    nfe_base = json.loads(_run(["git", "show", "HEAD:metrics/digits/sample.json"], cwd=repo).stdout)["nfe_mean"]
    for row, tol, nfe in ((base_row, 0.001, nfe_base), (exp_row, 0.002, nfe_exp)):
        numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", row)]
        assert any(abs(x - nll) < 1e-3 * nll for x in numbers), (row, show)  # the NLL of both runs, as a number
        assert nfe in numbers and tol in numbers, (row, nfe, tol, show)  # the NFE and the changed value
    csv_show = _run([DVC, "exp", "show", "--csv"], cwd=repo, env=env).stdout
    assert "metrics/digits/sample.json:nfe_mean" in csv_show.splitlines()[0]
    diff = _run([DVC, "exp", "diff"], cwd=repo, env=env).stdout
    assert re.search(r"params/resolved/digits\.yaml\s+sampling\.ode_tol\s+0\.001\s+0\.002", diff), diff
    mdiff = _run([DVC, "metrics", "diff", "HEAD"], cwd=repo, env=env)
    assert mdiff.returncode == 0 and "failed" not in mdiff.stdout.lower(), mdiff.stdout

    metrics_show = _run([DVC, "metrics", "show"], cwd=repo, env=env).stdout
    assert "failed" not in metrics_show.lower() and "cifar10" not in metrics_show, metrics_show
    plots = _run([DVC, "plots", "show"], cwd=repo, env=env)
    assert "failed" not in plots.stdout.lower(), plots.stdout
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert page.count("optimiser step (global batch 32") >= 4 and "nelbo_nats" in page and "grad_norm" in page
    pdiff = _run([DVC, "plots", "diff", "HEAD"], cwd=repo, env=env)
    assert "failed" not in pdiff.stdout.lower(), pdiff.stdout

    # a named (non-default) experiment: the same form changes exactly its value, for exactly the stages reading it
    _run([DVC, "exp", "run", "-S", "++mnist.sampling.ode_tol=1e-3", "workflow/dvc.yaml:resolve_config@mnist"],
         cwd=repo, env=env, timeout=300)
    mnist = yaml.safe_load((repo / "params/resolved/mnist.yaml").read_text())
    mnist_before = yaml.safe_load(_run(["git", "show", "HEAD:params/resolved/mnist.yaml"], cwd=repo).stdout)
    assert mnist["sampling"]["ode_tol"] == 1e-3 != mnist_before["sampling"]["ode_tol"]
    mnist["sampling"]["ode_tol"] = mnist_before["sampling"]["ode_tol"]
    assert mnist == mnist_before, "exactly one value changed"
    # (mnist never ran here, so `dvc status` calls all its stages new; which ones read the key is the table's:
    # test_dvc_params_per_key_match_the_table)
    reading = {name for name, st in dvc_stages(repo).items() if "mnist" in name and "sampling" in st["params"]}
    assert reading == {"data/runs/mnist/sample/samples.npz"}

    # an output corrupted in place (issue 13 item 12): detected, and `dvc repro` rebuilds it. The stage has persistent
    # outputs (its checkpoints), so DVC has no run cache for it and reruns it; the engine finds its own final
    # checkpoint and writes model.pt again without a training step: the same weights and step. (The bytes differ only
    # in the embedded config, which now carries the experiment's ode_tol=2e-3 above.)
    model = repo / "data/runs/digits/lsgm/model.pt"
    good = torch.load(model, map_location="cpu", weights_only=True)
    _corrupt_in_place(model)
    status = _run([DVC, "status", "dvc.yaml"], cwd=repo, env=env).stdout
    assert re.search(r"train_lsgm@digits-lsgm:\s+changed outs:\s+modified:\s+data/runs/digits/lsgm/model.pt", status)
    rebuilt = _run([DVC, "repro"], cwd=repo, env=env, timeout=600)
    assert "train_lsgm@digits-lsgm" in _ran_stages(rebuilt.stdout)
    new = torch.load(model, map_location="cpu", weights_only=True)
    assert new["step"] == good["step"] and new["run_hash"] == good["run_hash"]
    for part in ("vae", "prior", "prior_ema"):
        assert new[part].keys() == good[part].keys()
        assert all(torch.equal(new[part][k], good[part][k]) for k in good[part]), part
    good["config"]["sampling"]["ode_tol"] = 2e-3
    assert new["config"] == good["config"]
    assert "Data and pipelines are up to date" in _run([DVC, "status", "dvc.yaml"], cwd=repo, env=env).stdout


def _corrupt_in_place(path: Path, size: int = 1000) -> None:
    """Another tool or a user editing an output in place (as root the read-only mode does not stop it; chmod first
    so that the same happens for any user)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.truncate(size)


@pytest.mark.slow
def test_dvc_cache_cannot_be_corrupted_through_an_output(tmp_path):
    """Issue 13 item 12, reproduced with the cache types the repository used before (hardlinks): an output edited in
    place edits its cache entry too (DVC 3.67 then reports the output "not in cache" and cannot restore it; a checkout
    of another revision sharing the entry restores the broken file). With the repository's cache (`copy`) the entry
    stays good: `dvc status` reports the output as modified and `dvc checkout` restores it."""
    seen = {}
    for cache in ("hardlink,symlink", "copy"):
        repo = tmp_path / cache.split(",")[0]
        repo.mkdir()
        _run(["git", "init", "-q"], cwd=repo)
        _run([DVC, "init", "-q"], cwd=repo)
        _run([DVC, "config", "cache.type", cache], cwd=repo)
        (repo / "dvc.yaml").write_text(
            "stages:\n  train:\n    cmd: python -c \"open('model.pt', 'wb').write(bytes(range(256)) * 40)\"\n"
            "    outs: [model.pt]\n")
        _run([DVC, "repro", "-q"], cwd=repo)
        good = (repo / "model.pt").read_bytes()
        _corrupt_in_place(repo / "model.pt")
        status = _run([DVC, "status"], cwd=repo).stdout
        _run([DVC, "checkout", "--force", "model.pt"], cwd=repo, check=False)  # the documented way back
        seen[cache] = (status, (repo / "model.pt").is_file() and (repo / "model.pt").read_bytes() == good)
    assert "not in cache:       model.pt" in seen["hardlink,symlink"][0] and not seen["hardlink,symlink"][1], \
        "hardlinks no longer pass an in-place edit on to the cache: update the note in .dvc/config"
    assert "modified:           model.pt" in seen["copy"][0] and seen["copy"][1]
    assert re.search(r'^\s*type\s*=\s*"?copy"?\s*$', (ROOT / ".dvc" / "config").read_text(), flags=re.M)


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

"""One home for each structural fact: the run layout, the stage list and the device rule.

* Every run path comes from :class:`lsgm.runs.RunLayout`; no other library module spells a run-directory name.
* Every list of stages (config ``resources:`` keys, launcher verbs, pipeline kinds, CLI verbs, Snakemake rules)
  derives from :data:`lsgm.stages.STAGES`.
* ``engine.device: cuda`` without CUDA stops every stage at start with the same one-line error.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsgm.config import RESOURCE_STAGES, ConfigError, config_from_dict, config_to_dict, load_config, load_experiment
from lsgm.device import DeviceError, resolve_device
from lsgm.runs import HeadlineLayout, RunLayout, fid_stats_file
from lsgm.stages import LAUNCHABLE, STAGES, verb_of

REPO = Path(__file__).resolve().parents[1]
RUN_NAMES = {"model.pt", "metrics.json", "checkpoints", "dvclive", "samples.npz", "grid.png", "sample_stats.json",
             "resolved_config.yaml", "nll_lsgm.json", "nll_vae.json", "fid.json", "data/runs", "eval"}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_only_the_layout_spells_run_paths():
    offenders = []
    for path in sorted((REPO / "lsgm").rglob("*.py")):
        if path.name == "runs.py":
            continue
        for line, text in _string_constants(path):
            if text in RUN_NAMES or "data/runs" in text:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not offenders, "run paths built outside lsgm/runs.py:\n" + "\n".join(offenders)


def test_layout_paths_and_templates(tmp_path):
    lay = RunLayout(tmp_path, "exp")
    assert lay.model("vae") == tmp_path / "exp" / "vae" / "model.pt"
    assert lay.nll("lsgm") == tmp_path / "exp" / "eval" / "nll_lsgm.json"
    assert lay.samples.parent == lay.sample_dir == lay.sample_config.parent
    tmpl = RunLayout("data/runs", "{exp}")
    assert tmpl.model("{stage}").as_posix().format(exp="digits", stage="lsgm") == "data/runs/digits/lsgm/model.pt"
    assert fid_stats_file("celeba256", "train+valid").as_posix() == "data/fid_stats/celeba256-train_valid.pt"


def test_the_pipeline_reads_its_paths_from_the_layout():
    import lsgm.pipeline as P

    pipe = P.build_pipeline(["digits"])
    lay = RunLayout("data/runs", "digits")
    assert pipe.find("train_lsgm", exp="digits", stage="lsgm").outs == (lay.model("lsgm").as_posix(),
                                                                     lay.metrics("lsgm").as_posix())
    assert pipe.find("eval_nll", exp="digits", model="vae").outs == (lay.nll("vae").as_posix(),)
    assert lay.grid.as_posix() in pipe.find("sample", exp="digits").outs
    head = HeadlineLayout("metrics", "digits")
    assert pipe.find("eval_nll", exp="digits", model="vae").headline == (head.nll("vae").as_posix(),)
    assert pipe.find("train_lsgm", exp="digits", stage="lsgm").headline == (head.train("lsgm").as_posix(),)


def test_fid_stats_written_where_eval_fid_reads_them():
    """fid_stats --out and eval-fid's default reference path are one function (they disagreed for train+valid)."""
    import lsgm.pipeline as P
    from lsgm.metrics import default_reference_stats_path

    cfg = load_experiment("celeba256_quantitative")
    pipe = P.build_pipeline(["celeba256_quantitative"], report_experiments=[])
    (st,) = pipe.of_kind("fid_stats")
    assert st.outs == (default_reference_stats_path(cfg, "data/prepared").as_posix(),)
    assert st.outs[0] in pipe.find("eval_fid", exp="celeba256_quantitative").deps


def test_every_stage_list_derives_from_the_one_stage_list():
    import lsgm.launch as L
    import lsgm.pipeline as P
    from lsgm.cli import build_parser

    assert tuple(P.KINDS) == STAGES == tuple(RESOURCE_STAGES)
    assert set(L.STAGE_VERBS) == set(LAUNCHABLE) and all(L.STAGE_VERBS[s] == verb_of(s) for s in LAUNCHABLE)
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert {verb_of(s) for s in STAGES} <= set(sub.choices), "every stage has its `lsgm` verb"
    rules = {m for f in (REPO / "workflow" / "rules").glob("*.smk")
             for m in re.findall(r"^\s*rule (\w+):", f.read_text(), flags=re.M)}
    assert rules == set(STAGES), f"Snakemake rules {sorted(rules)} != stages {list(STAGES)}"


def test_resolve_config_writes_atomically_and_keeps_the_file_on_error(tmp_path):
    out = tmp_path / "digits.yaml"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", "resolve-config", "digits", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    good = out.read_text()
    assert load_config(out, name="digits") == load_experiment("digits")
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "params" / "digits.yaml").read_text().replace("extends: [fragments/defaults.yaml]",
                   f"extends: [{REPO / 'params' / 'fragments' / 'defaults.yaml'}]") + "\nsampling: {ode_tol: -1}\n")
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", "resolve-config", str(bad), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "sampling.ode_tol" in res.stderr
    assert out.read_text() == good


# ------------------------------------------------------------------------------------------------ device rule
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_device_rule_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(DeviceError, match="engine.device = 'cuda' but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="allowed: auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("verb", ["train-vae", "sample", "eval-nll", "eval-fid"])
def test_every_stage_applies_the_device_rule_at_start(tmp_path, verb):
    cfg = tmp_path / "cuda.yaml"
    cfg.write_text(f"extends: [{REPO / 'params' / 'digits.yaml'}]\nengine: {{device: cuda}}\n"
                   "eval_fid: {enabled: true}\n")
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", verb, str(cfg), "--run-root", str(tmp_path / "runs"),
                          *(["--data-root", str(tmp_path / "none")] if verb != "sample" else [])],
                         cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "engine.device = 'cuda' but no CUDA device is available" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------ removed keys
def test_removed_keys_are_named_in_params_files_and_dropped_from_stored_configs(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text(f"extends: [{REPO / 'params' / 'digits.yaml'}]\nprior: {{lsgm: {{train: {{train_ode_eps: 0.01}}}}}}\n")
    with pytest.raises(ConfigError, match=r"prior\.lsgm\.train\.train_ode_eps: removed key: nothing read it"):
        load_config(p)
    stored = config_to_dict(load_experiment("digits"))
    stored["prior"]["lsgm"]["train"].update(train_ode_eps=1e-2, train_ode_tol=1e-4)  # an older model.pt's config
    assert config_from_dict(stored) == load_experiment("digits")

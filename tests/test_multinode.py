"""Multi-node training (issue 8): `lsgm launch` layouts, Slurm host lists, sbatch/srun options, and real runs.

* Two torchrun "nodes" on this machine (c10d rendezvous on loopback, gloo, 2 ranks each) train the digits model
  to the same parameters as one process accumulating the same global batch, and a restart of both resumes.
* The sbatch line of snakemake-executor-plugin-slurm for the paper's 2 x 8-GPU stage, and the srun + torchrun
  line `lsgm launch` builds inside that allocation (with and without `scontrol`).
* On the local test cluster (the session's `local_slurm` fixture): a 1-node x 2-task job runs `lsgm launch` for real.
"""

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lsgm.config import ResourceConfig, load_config, load_experiment
from lsgm.launch import (SlurmAllocation, expand_nodelist, find_allocation, launch_command, rendezvous_port,
                         slurm_hostnames)
from lsgm.engine import BatchPlan
from lsgm.train import train_vae

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# per-process batch 8, global batch 32: 4 ranks x 1, or 1 process x 4 accumulation steps
TINY = """
extends: [{digits}]
data: {{max_train_images: 256}}
train_vae: {{epochs: 1, batch_size: 8, global_batch_size: 32, warmup_epochs: 1}}
prior:
  lsgm:
    score_net: {{nf: 16, num_res_blocks: 1}}
    train: {{epochs: 1, batch_size: 32, warmup_epochs: 1}}
engine: {{device: cpu, checkpoint_every_steps: 2, keep_checkpoints: 3, num_threads: 1, log_every_steps: 1}}
resources:
  train_vae: {{nodes: 1, gpus_per_node: 0, cpus_per_task: 1, mem_mb: 1500, runtime_min: 5}}
"""


def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "mn.yaml"
    p.write_text(TINY.format(digits=REPO / "params" / "digits.yaml"))
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vae_params(state: dict) -> dict:
    """Trainable VAE tensors (BN running statistics are per process on gloo and are left out)."""
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k


# ------------------------------------------------------------------------------------------------ host lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("n[08-10,3],login1", ["n08", "n09", "n10", "n3", "login1"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a-b.c", ["a-b.c"]),
])
def test_expand_nodelist_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    scontrol = shutil.which("scontrol")
    if scontrol:  # `scontrol show hostnames` needs no controller: the fallback must agree with it
        assert slurm_hostnames(nodelist, scontrol) == hosts
    assert slurm_hostnames(nodelist, scontrol="") == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n[3-1]", "n[a-b]", "n]1[", ""])
def test_bad_nodelist_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(bad)


def fake_scontrol(tmp_path: Path) -> Path:
    """A stand-in `scontrol` that knows job 4242 on hosts gpu[07-08] (as a real controller would report)."""
    path = tmp_path / "bin" / "scontrol"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n"
                    'if [ "$1 $2" = "show job" ]; then echo "JobId=4242 JobName=x NumNodes=2 NodeList=gpu[07-08] '
                    'BatchHost=gpu07"; exit 0; fi\n'
                    'if [ "$1 $2" = "show hostnames" ]; then echo gpu07; echo gpu08; exit 0; fi\nexit 1\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_find_allocation_from_env_or_scontrol(tmp_path):
    assert find_allocation({}) is None
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert find_allocation(env, scontrol="") == SlurmAllocation("4242", ("gpu07", "gpu08"))
    # inside a Snakemake jobstep only SLURM_JOB_ID survives: the node list comes from `scontrol show job`
    sc = str(fake_scontrol(tmp_path))
    assert find_allocation({"SLURM_JOB_ID": "4242"}, scontrol=sc) == SlurmAllocation("4242", ("gpu07", "gpu08"))
    with pytest.raises(ValueError, match="node list is unknown"):
        find_allocation({"SLURM_JOB_ID": "4242"}, scontrol="")
    assert rendezvous_port("4242") == 29500 + 242 and rendezvous_port("4242_3") == 29742


# ------------------------------------------------------------------------------------------------ layouts
def test_launch_layouts():
    one = launch_command("train_vae", "e", ["--max-steps", "2"], resources=ResourceConfig(), python="py")
    assert one == ["py", "-m", "lsgm.cli", "train-vae", "e", "--max-steps", "2"]
    node = launch_command("train-lsgm", "e", ["--stage", "lsgm"], resources=ResourceConfig(gpus_per_node=4),
                          python="py")
    assert node[node.index("--standalone"):] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "4", "-m",
                                                 "lsgm.cli", "train-lsgm", "e", "--stage", "lsgm"]
    rehearsal = launch_command("train_vae", "e", resources=ResourceConfig(), tasks_per_node=2, python="py",
                               allocation=SlurmAllocation("9", ("localhost",)), port=1234)
    srun, torchrun, verb = parse_launch(rehearsal)
    assert srun["--nodes"] == "1" and srun["--ntasks"] == "2" and srun["--ntasks-per-node"] == "2"
    assert torchrun["--nnodes"] == "2" and torchrun["--nproc_per_node"] == "1"
    assert torchrun["--rdzv_endpoint"] == "localhost:1234" and verb == ["train-vae", "e"]
    with pytest.raises(ValueError, match="needs a Slurm allocation"):
        launch_command("train_lsgm", "e", resources=ResourceConfig(nodes=2, gpus_per_node=8))
    with pytest.raises(ValueError, match="has 1 host"):
        launch_command("train_lsgm", "e", resources=ResourceConfig(nodes=2),
                       allocation=SlurmAllocation("7", ("n1",)))
    with pytest.raises(ValueError, match="not a launchable stage"):
        launch_command("train", "e", resources=ResourceConfig())


def parse_launch(argv: list[str]) -> tuple[dict, dict, list[str]]:
    """Split `srun OPTS torchrun OPTS -m lsgm.cli VERB...` into option dicts and the verb."""
    def opts(tokens):
        out, i = {}, 0
        while i < len(tokens):
            t = tokens[i]
            if "=" in t:
                k, v = t.split("=", 1)
                out[k] = v
                i += 1
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[t] = tokens[i + 1]
                i += 2
            else:
                out[t] = True
                i += 1
        return out
    assert argv[0] == "srun"
    t = next(i for i, a in enumerate(argv) if a.endswith("torchrun") or a == "torch.distributed.run")
    m = argv.index("-m", t)
    return opts(argv[1:t]), opts(argv[t + 1:m]), argv[m + 2:]


def dry_run(*args: str, env: dict) -> list[str]:
    res = subprocess.run([PY, "-m", "lsgm.cli", "launch", "--dry-run", *args], cwd=REPO, capture_output=True,
                         text=True, env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **env},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout.strip())


@pytest.mark.parametrize("with_scontrol", [True, False])
def test_paper_layout_inside_slurm_renders_srun_and_torchrun(tmp_path, with_scontrol):
    """params/cifar10_best_fid.yaml: 2 nodes x 8 GPUs; rendezvous on the allocation's first host."""
    bindir = fake_scontrol(tmp_path).parent if with_scontrol else tmp_path / "empty"
    bindir.mkdir(exist_ok=True)
    env = {"PATH": str(bindir), "SLURM_JOB_ID": "4242"}  # only the fake scontrol (or none) is on PATH
    if not with_scontrol:
        assert shutil.which("scontrol", path=env["PATH"]) is None
        env["SLURM_JOB_NODELIST"] = "gpu[07-08]"
    argv = dry_run("train_lsgm", "cifar10_best_fid", "--stage", "lsgm", env=env)
    srun, torchrun, verb = parse_launch(argv)
    assert srun == {"--jobid": "4242", "--nodes": "2", "--ntasks": "2", "--ntasks-per-node": "1",
                    "--cpus-per-task": "64", "--kill-on-bad-exit": "1"}
    assert torchrun == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                        "--rdzv_endpoint": f"gpu07:{29500 + 242}", "--rdzv_id": "4242"}
    assert verb == ["train-lsgm", "cifar10_best_fid", "--stage", "lsgm"]
    # the VAE stage is one node x 8 GPUs: torchrun --standalone, no srun
    vae = dry_run("train_vae", "cifar10_best_fid", env=env)
    assert "srun" not in vae and vae[vae.index("--standalone"):][:5] == ["--standalone", "--nnodes", "1",
                                                                        "--nproc_per_node", "8"]


class _Res(dict):
    __getattr__ = dict.__getitem__


def test_plugin_sbatch_for_the_two_node_stage():
    """The plugin's own sbatch builder, fed the rule resources of cifar10_best_fid's train_lsgm."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    from lsgm.pipeline import slurm_resources

    res = load_experiment("cifar10_best_fid").resource("train_lsgm")
    resources = _Res({k: v for k, v in slurm_resources(res).items() if v is not None})
    job = SimpleNamespace(resources=resources, threads=resources["cpus_per_task"])
    params = {"run_uuid": "u", "slurm_logfile": "l/%j.log", "comment_str": "rule_train_lsgm", "account": "",
              "partition": "", "workdir": "/w"}
    call = get_submit_command(job, params) + set_gres_string(job)
    tokens = shlex.split(call)
    assert tokens[0] == "sbatch"
    for want in ["--nodes=2", "--ntasks=2", "--cpus-per-task=64", "--gres=gpu:8", "-t", "4320", "--mem", "256000"]:
        assert want in tokens, (want, call)
    assert not any(t.startswith("--ntasks-per-gpu") for t in tokens), call
    # the jobstep runs an `mpi` job's command in the batch step (no `srun -n1` wrapper), so srun sees both nodes
    assert resources.get("mpi")


def test_one_line_layout_change_keeps_the_global_batch(tmp_path):
    """One node of 4 GPUs: one line changes the layout; the global batch (256) comes from accumulation 4."""
    over = tmp_path / "cifar10_best_fid_1x4.yaml"
    over.write_text(f"extends: [{REPO / 'params' / 'cifar10_best_fid.yaml'}]\n"
                    "resources: {train_lsgm: {nodes: 1, gpus_per_node: 4}}\n")
    paper, mine = load_experiment("cifar10_best_fid"), load_config(over)
    a, b = paper.resource("train_lsgm"), mine.resource("train_lsgm")
    assert (a.nodes, a.gpus_per_node, a.world_size) == (2, 8, 16) and (b.nodes, b.gpus_per_node) == (1, 4)
    assert (b.cpus_per_task, b.mem_mb, b.runtime_min) == (a.cpus_per_task, a.mem_mb, a.runtime_min)
    t = paper.prior["lsgm"].train
    plans = [BatchPlan.make(batch_size=t.batch_size, global_batch_size=t.global_batch_size, world_size=r.world_size,
                            num_items=50000, where="t") for r in (a, b)]
    assert [p.global_batch for p in plans] == [256, 256] and [p.accumulation for p in plans] == [1, 4]
    assert plans[0].iters_per_epoch == plans[1].iters_per_epoch  # same schedule in samples seen
    argv = dry_run("train_lsgm", str(over), "--stage", "lsgm", env={})  # outside Slurm: torchrun on one node
    assert "srun" not in argv and argv[argv.index("--nproc_per_node") + 1] == "4"


# ------------------------------------------------------------------------------------------------ two nodes
def start_node(cfg: Path, prepared: Path, runs: Path, port: int, steps: int) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lsgm-test", "-m", "lsgm.cli", "train-vae",
           str(cfg), "--data-root", str(prepared), "--run-root", str(runs), "--max-steps", str(steps)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_two_nodes(cfg: Path, prepared: Path, runs: Path, steps: int) -> str:
    port = free_port()
    nodes = [start_node(cfg, prepared, runs, port, steps) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-3000:]
    return "\n".join(outs)


def test_two_torchrun_nodes_equal_one_process_and_resume(tmp_path, prepared):
    cfg_path = tiny_config(tmp_path)
    cfg = load_config(cfg_path, name="mn")
    # reference: one process, 8 per micro-batch x 4 accumulation = 32, 4 steps uninterrupted (checkpoints at 2, 4)
    ref = tmp_path / "single"
    train_vae(cfg, run_root=ref, data_root=prepared, max_steps=4)
    ckpts = {p.name: p for p in (ref / "mn" / "vae" / "checkpoints").glob("ckpt-*.pt")}
    at2 = torch.load(ckpts["ckpt-000000002.pt"], map_location="cpu", weights_only=True)["modules"]["vae"]
    at4 = torch.load(ref / "mn" / "vae" / "model.pt", map_location="cpu", weights_only=True)["vae"]

    runs = tmp_path / "multi"
    log = run_two_nodes(cfg_path, prepared, runs, steps=2)
    assert "global batch 32 = 8 per process x 4 processes x 1 accumulation" in log
    got2 = torch.load(runs / "mn" / "vae" / "model.pt", map_location="cpu", weights_only=True)["vae"]
    assert_close(vae_params(got2), vae_params(at2))
    assert json.loads((runs / "mn" / "vae" / "metrics.json").read_text())["processes"] == 4

    log = run_two_nodes(cfg_path, prepared, runs, steps=4)  # both nodes restarted with a longer run
    assert "resumed" in log and "from step 2" in log
    got4 = torch.load(runs / "mn" / "vae" / "model.pt", map_location="cpu", weights_only=True)["vae"]
    assert_close(vae_params(got4), vae_params(at4))
    assert not torch.equal(got4[next(iter(vae_params(got4)))], got2[next(iter(vae_params(got2)))])


# ------------------------------------------------------------------------------------------------ real Slurm
@pytest.mark.slow
def test_one_node_two_tasks_on_the_local_cluster(tmp_path, prepared, local_slurm):
    """sbatch --ntasks 2 runs `lsgm launch --tasks-per-node 2`: srun starts two torchrun agents that meet by c10d
    rendezvous on the allocation's first host (found with scontrol, as inside a Snakemake jobstep, whose
    SLURM_* variables are stripped here too) and train 2 steps as ranks 0 and 1."""
    cfg = tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("global_batch_size: 32", "global_batch_size: 16"))
    runs, out = tmp_path / "runs", tmp_path / "job.log"
    launch = shlex.join([PY, "-m", "lsgm.cli", "launch", "--tasks-per-node", "2", "train_vae", str(cfg),
                         "--data-root", str(prepared), "--run-root", str(runs), "--max-steps", "2"])
    strip = "for v in $(env | sed -n 's/^\\(SLURM_[A-Z_]*\\)=.*/\\1/p'); do case $v in SLURM_JOB_ID|SLURM_CONF) ;; " \
            "*) unset $v;; esac; done; "
    res = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes", "1", "--ntasks", "2", "--cpus-per-task", "1",
                          "--mem", "3000", "-t", "10", "-o", str(out), "-D", str(REPO),
                          "--wrap", strip + "export OMP_NUM_THREADS=1 DVC_NO_ANALYTICS=1; exec " + launch],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **local_slurm})
    log = out.read_text() if out.exists() else ""
    assert res.returncode == 0, res.stderr + log[-3000:]
    job_id = res.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert f"srun --jobid {job_id} --nodes 1 --ntasks 2 --ntasks-per-node 2" in log
    assert f"--rdzv_backend c10d --rdzv_endpoint localhost:{rendezvous_port(job_id)} --rdzv_id {job_id}" in log
    assert "global batch 16 = 8 per process x 2 processes x 1 accumulation" in log
    meta = json.loads((runs / "mn" / "vae" / "metrics.json").read_text())
    assert meta["processes"] == 2 and meta["steps"] == 2
    assert (runs / "mn" / "vae" / "model.pt").exists()

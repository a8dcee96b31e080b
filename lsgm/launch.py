"""`lsgm launch STAGE EXP [args]`: start a stage with the process layout its ``resources:`` ask for.

The layout comes from ``cfg.resource(STAGE)`` (``nodes`` x ``gpus_per_node``; a CPU-only stage counts as one
process per node):

* 1 process: the stage's CLI verb runs directly (``python -m lsgm.cli VERB EXP ...``).
* 1 node x G processes: ``torchrun --standalone --nnodes 1 --nproc_per_node G -m lsgm.cli VERB EXP ...``.
* N nodes: inside a Slurm allocation, one ``torchrun`` agent per node under ``srun``, meeting by c10d
  rendezvous on the first host of the allocation (``scontrol show hostnames``) at a port derived from the job id,
  with the job id as rendezvous id. Nothing is typed by hand: node ranks come from the rendezvous, addresses
  from Slurm. Every rank then resumes from the same checkpoint and rank 0 alone writes (lsgm.train).

Inside a Snakemake Slurm job the jobstep plugin strips most ``SLURM_*`` variables (``SLURM_JOB_ID`` stays), so the
node list is read back from ``scontrol show job`` when ``SLURM_JOB_NODELIST`` is missing.
The global batch is a property of the config, not of the layout: ``lsgm.train.BatchPlan`` reaches it by gradient
accumulation on fewer processes, and every schedule counts samples seen (docs/algorithm.md §12 item 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from lsgm.config import ExperimentConfig, ResourceConfig, load_experiment
from lsgm.stages import LAUNCHABLE, verb_of

__all__ = ["STAGE_VERBS", "SlurmAllocation", "expand_nodelist", "slurm_hostnames", "find_allocation",
           "rendezvous_port", "launch_command", "launch", "add_launch_arguments", "run_launch"]

#: launchable stage (``resources:`` key, Snakemake rule) -> ``lsgm`` CLI verb it runs (from lsgm/stages.py)
STAGE_VERBS: dict[str, str] = {stage: verb_of(stage) for stage in LAUNCHABLE}
RDZV_PORT_BASE = 29500
RDZV_PORT_SPAN = 1000


def stage_name(stage: str) -> str:
    """``train-vae`` or ``train_vae`` -> ``train_vae`` (the ``resources:`` key); ValueError if unknown."""
    name = stage.replace("-", "_")
    if name not in STAGE_VERBS:
        raise ValueError(f"stage = {stage!r} is not a launchable stage; allowed: {', '.join(STAGE_VERBS)}")
    return name


# --------------------------------------------------------------------------------------------- Slurm
@dataclass(frozen=True)
class SlurmAllocation:
    """The Slurm job this process runs in: its id and its hosts, first host first."""

    job_id: str
    hosts: tuple[str, ...]


def _expand_range(body: str, where: str) -> list[str]:
    out = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"nodelist = {where!r}: bad range {part!r}; allowed: N or N-M inside [...]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"nodelist = {where!r}: range {part!r} runs backwards")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (``gpu[01-02,07],login-a[1-2]x``) like ``scontrol show hostnames`` does.

    Zero padding of a range is kept (``n[08-10]`` -> n08, n09, n10); several bracket groups in one name expand
    as a product. Used where ``scontrol`` is absent.
    """
    names: list[str] = []
    depth, start = 0, 0
    items = []
    for i, ch in enumerate(nodelist):  # split on commas outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"nodelist = {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"nodelist = {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    for item in items:
        item = item.strip()
        if not item:
            continue
        expanded = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = _expand_range(body, nodelist) if body else [""]
            expanded = [e + text + c for e in expanded for c in choices]
        names += expanded
    if not names:
        raise ValueError(f"nodelist = {nodelist!r} names no host")
    return names


def slurm_hostnames(nodelist: str, scontrol: Optional[str] = None) -> list[str]:
    """Hosts of a Slurm node list: ``scontrol show hostnames`` if available, else :func:`expand_nodelist`."""
    scontrol = scontrol if scontrol is not None else shutil.which("scontrol")
    if scontrol:
        try:
            res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            hosts = res.stdout.split()
            if res.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)


def _nodelist_from_scontrol(job_id: str, scontrol: Optional[str]) -> Optional[str]:
    scontrol = scontrol if scontrol is not None else shutil.which("scontrol")
    if not scontrol:
        return None
    try:
        res = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(?:^|\s)NodeList=(\S+)", res.stdout)
    return m.group(1) if res.returncode == 0 and m and m.group(1) != "(null)" else None


def find_allocation(env: Mapping[str, str] = os.environ, scontrol: Optional[str] = None) -> Optional[SlurmAllocation]:
    """The Slurm allocation of this process, or None outside Slurm.

    Args:
        env: environment to read (``SLURM_JOB_ID``/``SLURM_JOBID``, ``SLURM_JOB_NODELIST``/``SLURM_NODELIST``).
        scontrol: path of ``scontrol`` ("" = never call it); default: looked up on PATH.
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or _nodelist_from_scontrol(job_id, scontrol)
    if not nodelist:
        raise ValueError(f"SLURM_JOB_ID = {job_id!r} but its node list is unknown: SLURM_JOB_NODELIST is unset and "
                         "`scontrol show job` gave none")
    return SlurmAllocation(job_id=job_id, hosts=tuple(slurm_hostnames(nodelist, scontrol)))


def rendezvous_port(job_id: str) -> int:
    """c10d rendezvous port of a job: 29500 + (job id mod 1000), so jobs sharing a first node do not collide."""
    digits = re.match(r"\d+", job_id)
    return RDZV_PORT_BASE + (int(digits.group(0)) % RDZV_PORT_SPAN if digits else 0)


# --------------------------------------------------------------------------------------------- command
def _torchrun(python: str) -> list[str]:
    """``torchrun`` of this interpreter's environment (its script beside python, else ``-m torch.distributed.run``)."""
    script = Path(python).parent / "torchrun"
    return [str(script)] if script.exists() else [python, "-m", "torch.distributed.run"]


def launch_command(stage: str, experiment: str, args: Sequence[str] = (), *, resources: ResourceConfig,
                   allocation: Optional[SlurmAllocation] = None, python: str = sys.executable,
                   port: Optional[int] = None, tasks_per_node: int = 1) -> list[str]:
    """The argv that runs ``lsgm VERB EXP ARGS`` on ``resources.nodes`` x ``resources.gpus_per_node`` processes.

    Args:
        stage: resource stage / rule name (``train_vae``) or CLI verb (``train-vae``).
        experiment: experiment name or params file, passed on to the verb.
        args: further arguments of the verb (e.g. ``--stage lsgm``).
        resources: the stage's ``ResourceConfig``.
        allocation: the Slurm allocation (required for more than one torchrun agent).
        python: interpreter of the processes.
        port: c10d rendezvous port (default: :func:`rendezvous_port` of the job id).
        tasks_per_node: torchrun agents per node (1 in production; 2 on one node tests a 2-node launch).

    Raises:
        ValueError: several agents without a Slurm allocation, or an allocation with too few hosts.
    """
    name = stage_name(stage)
    if tasks_per_node < 1:
        raise ValueError(f"tasks_per_node = {tasks_per_node!r}; allowed: an integer >= 1")
    verb = [STAGE_VERBS[name], experiment, *args]
    procs = max(resources.gpus_per_node, 1)
    agents = resources.nodes * tasks_per_node
    if agents == 1 and procs == 1:
        return [python, "-m", "lsgm.cli", *verb]
    if agents == 1:
        return [*_torchrun(python), "--standalone", "--nnodes", "1", "--nproc_per_node", str(procs),
                "-m", "lsgm.cli", *verb]
    if allocation is None:
        raise ValueError(f"resources.{name}.nodes = {resources.nodes} needs a Slurm allocation (run inside "
                         "sbatch/salloc, e.g. through `snakemake --profile slurm`); SLURM_JOB_ID is not set. "
                         f"Allowed outside Slurm: nodes = 1")
    if len(allocation.hosts) < resources.nodes:
        raise ValueError(f"resources.{name}.nodes = {resources.nodes} but Slurm job {allocation.job_id} has "
                         f"{len(allocation.hosts)} host(s): {', '.join(allocation.hosts)}")
    endpoint = f"{allocation.hosts[0]}:{port if port is not None else rendezvous_port(allocation.job_id)}"
    # The step inherits the job's GPUs (srun's default); CPUs must be asked for, or each task gets one.
    srun = ["srun", "--jobid", allocation.job_id, "--nodes", str(resources.nodes), "--ntasks", str(agents),
            "--ntasks-per-node", str(tasks_per_node), "--cpus-per-task", str(resources.cpus_per_task * procs),
            "--kill-on-bad-exit=1"]
    torchrun = [*_torchrun(python), "--nnodes", str(agents), "--nproc_per_node", str(procs),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", allocation.job_id]
    return [*srun, *torchrun, "-m", "lsgm.cli", *verb]


def launch(cfg: ExperimentConfig, stage: str, experiment: str, args: Sequence[str] = (), *, dry_run: bool = False,
           env: Mapping[str, str] = os.environ, port: Optional[int] = None, tasks_per_node: int = 1,
           nodes: Optional[int] = None, gpus_per_node: Optional[int] = None) -> int:
    """Run (or with ``dry_run`` print) a stage under the layout of ``cfg.resource(stage)``.

    ``nodes``/``gpus_per_node`` override the config's layout for this run only. Without ``dry_run`` this process
    is replaced by the command (signals such as Slurm's SIGTERM reach srun/torchrun/the stage directly).
    """
    res = cfg.resource(stage_name(stage))
    over = {k: v for k, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)) if v is not None}
    for k, v in over.items():
        if v < (1 if k == "nodes" else 0):
            raise ValueError(f"--{k.replace('_', '-')} = {v}; allowed: an integer >= {1 if k == 'nodes' else 0}")
    res = dataclasses.replace(res, **over)
    agents = res.nodes * tasks_per_node
    allocation = find_allocation(env) if agents > 1 else None
    placeholder = dry_run and agents > 1 and allocation is None
    if placeholder:  # outside Slurm a dry run still shows the command, with the allocation's parts left symbolic
        allocation = SlurmAllocation(job_id="$SLURM_JOB_ID", hosts=tuple(f"<node{i}>" for i in range(res.nodes)))
        port = port if port is not None else RDZV_PORT_BASE
    argv = launch_command(stage, experiment, args, resources=res, allocation=allocation, port=port,
                          tasks_per_node=tasks_per_node)
    text = shlex.join(argv)
    if dry_run:
        if placeholder:
            print(f"# outside a Slurm allocation: inside sbatch, <node0> is the allocation's first host "
                  f"(scontrol show hostnames), the job id is $SLURM_JOB_ID and the port {RDZV_PORT_BASE} + job id "
                  f"mod {RDZV_PORT_SPAN}")
        print(text)
        return 0
    print(f"lsgm launch: {res.nodes} node(s) x {max(res.gpus_per_node, 1)} process(es): {text}", file=sys.stderr,
          flush=True)
    os.execvp(argv[0], argv)
    return 127  # not reached


# --------------------------------------------------------------------------------------------- CLI
def add_launch_arguments(sp: argparse.ArgumentParser) -> None:
    """Arguments of ``lsgm launch`` (launch options go before STAGE; everything after EXP goes to the verb)."""
    sp.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    sp.add_argument("--port", type=int, default=None, help="c10d rendezvous port (default: 29500 + job id mod 1000)")
    sp.add_argument("--nodes", type=int, default=None, help="override resources.STAGE.nodes for this run")
    sp.add_argument("--gpus-per-node", type=int, default=None,
                    help="override resources.STAGE.gpus_per_node (processes per node) for this run")
    sp.add_argument("--tasks-per-node", type=int, default=1,
                    help="torchrun agents per node (default 1; 2 rehearses a 2-node launch on one node)")
    sp.add_argument("stage", help=f"one of {', '.join(STAGE_VERBS)} (or its verb spelling, e.g. train-vae)")
    sp.add_argument("experiment", help="experiment name from params/experiments.yaml, or a params YAML file")
    sp.add_argument("args", nargs=argparse.REMAINDER, help="further arguments of the stage's verb")


def set_args_of(verb_args: Sequence[str]) -> list[str]:
    """The ``--set KEY=VALUE`` values among a verb's arguments (``--set K=V`` or ``--set=K=V``): the launcher
    loads the config with them too, so an overridden ``resources:`` value decides the layout."""
    out, it = [], iter(verb_args)
    for a in it:
        if a == "--set":
            out.append(next(it, ""))
        elif a.startswith("--set="):
            out.append(a[len("--set="):])
    return out


def run_launch(args: argparse.Namespace) -> int:
    """``lsgm launch``: load the experiment and :func:`launch` the stage."""
    stage_name(args.stage)  # a clear error before loading the config
    cfg = load_experiment(args.experiment, set_args=set_args_of(args.args))
    return launch(cfg, args.stage, args.experiment, args.args, dry_run=args.dry_run, port=args.port,
                  tasks_per_node=args.tasks_per_node, nodes=args.nodes, gpus_per_node=args.gpus_per_node)

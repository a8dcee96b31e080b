"""`lsgm <verb>`: each verb is a thin command over one library function.

Verbs share their names with the Snakemake rules and DVC stages (``train-vae`` / ``train_vae``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsgm.config import ConfigError, dump_config, list_experiments, load_experiment
from lsgm.errors import LsgmError, storage_error
from lsgm.runs import CLASSIFIERS_ROOT, HEADLINE_ROOT, PREPARED_ROOT, RUNS_ROOT


def _load(args: argparse.Namespace):
    """The experiment of a verb's EXP argument with its ``--set KEY=VALUE`` overrides (same validation as a file)."""
    return load_experiment(args.experiment, set_args=args.set)


def _metrics_root(args: argparse.Namespace):
    return Path(args.metrics_root) if args.metrics_root else None


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sys.stdout.write(dump_config(cfg))
    return 0


def _cmd_config_list(args: argparse.Namespace) -> int:
    from lsgm.config import default_experiments

    defaults = set(default_experiments())
    for name in list_experiments():
        print(f"{name}{'  (default)' if name in defaults else ''}")
    return 0


def _cmd_resolve_config(args: argparse.Namespace) -> int:
    from lsgm.atomic import atomic_write_text
    from lsgm.config import resolved_params_file

    cfg = _load(args)  # a config error leaves the existing file untouched
    out = Path(args.out) if args.out else resolved_params_file(cfg.name)
    atomic_write_text(out, dump_config(cfg))
    print(f"resolved {args.experiment} -> {out}")
    if not (args.out or args.set) and args.experiment in list_experiments():
        # the pipeline's own run (DVC's resolve_config stage): also the per-stage values Snakemake reads
        from lsgm.pipeline import build_pipeline, write_stage_params

        pipe = build_pipeline(report_experiments=[], root=resolved_params_file(cfg.name).parents[2], skip_broken=True)
        for rel in write_stage_params(pipe, [cfg.name]):
            print(f"  stage params changed -> {rel}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from lsgm.data.prepare import prepare_dataset

    accept = {}
    for item in args.accept_sha256:
        name, sep, digest = item.partition("=")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"--accept-sha256 {item!r}: allowed: FILE=HEX with the file's 64-hex-digit sha256 "
                             "(`sha256sum FILE`)")
        accept[name] = digest.lower()
    out = prepare_dataset(args.name, raw_dir=Path(args.raw_dir), out_dir=Path(args.out_dir),
                          download=not args.no_download, accept_sha256=accept)
    print(f"prepared {args.name} -> {out}")
    return 0


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from lsgm.train import train_vae

    cfg = _load(args)
    train_vae(cfg, run_root=Path(args.run_root), data_root=Path(args.data_root), max_steps=args.max_steps,
              retrain=args.retrain, metrics_root=_metrics_root(args))
    return 0


def _cmd_train_lsgm(args: argparse.Namespace) -> int:
    from lsgm.train import train_lsgm

    cfg = _load(args)
    stages = [args.stage] if args.stage else list(cfg.prior)
    for stage in stages:
        train_lsgm(cfg, stage, run_root=Path(args.run_root), data_root=Path(args.data_root),
                   max_steps=args.max_steps, retrain=args.retrain, metrics_root=_metrics_root(args))
    return 0


def _sample_run(cfg, tag: str | None):
    """The config's sampling run called ``tag`` (None or "default": the default run)."""
    if tag in (None, "", "default"):
        return None
    runs = {r.tag: r for r in cfg.all_sample_runs()}
    if tag not in runs:
        raise ConfigError(f"{cfg.name}: --run {tag!r} is not one of its sample_runs; allowed: default, "
                          f"{', '.join(runs) or '(none configured)'}")
    return runs[tag]


def _cmd_sample(args: argparse.Namespace) -> int:
    from lsgm.evaluate import sample_experiment

    cfg = _load(args)
    sample_experiment(cfg, run_root=Path(args.run_root), num_samples=args.num_samples,
                      run=_sample_run(cfg, args.run), metrics_root=_metrics_root(args))
    return 0


def _cmd_sample_run(args: argparse.Namespace) -> int:
    from lsgm.evaluate import sample_experiment

    cfg = _load(args)
    runs = {r.tag: r for r in cfg.all_sample_runs()}
    if args.run not in runs:
        raise ConfigError(f"{cfg.name}: sampling run {args.run!r} is not configured (sample_runs or the claims' "
                          f"runs); allowed: {', '.join(runs) or '(none)'}")
    sample_experiment(cfg, run_root=Path(args.run_root), num_samples=args.num_samples, run=runs[args.run],
                      metrics_root=_metrics_root(args))
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from lsgm.claims import write_claims
    from lsgm.config import experiment_file

    for name in args.experiments:
        experiment_file(name)  # unknown names: one clear error before anything is written
    write_claims(experiments=args.experiments, run_root=Path(args.run_root), out_dir=Path(args.out_dir))
    return 0


def _cmd_train_data_sgm(args: argparse.Namespace) -> int:
    from lsgm.baseline import train_data_sgm

    cfg = _load(args)
    train_data_sgm(cfg, run_root=Path(args.run_root), data_root=Path(args.data_root), max_steps=args.max_steps,
                   retrain=args.retrain, metrics_root=_metrics_root(args))
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from lsgm.classifier import train_classifier

    cfg = _load(args)
    fd = cfg.eval_fd
    train_classifier(cfg.data.dataset, data_root=Path(args.data_root), root=Path(args.out_root),
                     epochs=fd.classifier_epochs, batch_size=fd.classifier_batch_size, width=fd.classifier_width,
                     seed=fd.classifier_seed, num_threads=cfg.engine.num_threads,
                     max_images=cfg.data.max_train_images)
    return 0


def _cmd_eval_fd(args: argparse.Namespace) -> int:
    from lsgm.classifier import eval_fd_experiment

    cfg = _load(args)
    run = _sample_run(cfg, args.run)
    eval_fd_experiment(cfg, run_root=Path(args.run_root), data_root=Path(args.data_root),
                       tag=run.tag if run else "", classifier_root=Path(args.classifier_root),
                       metrics_root=_metrics_root(args))
    return 0


def _cmd_eval_nll(args: argparse.Namespace) -> int:
    from lsgm.evaluate import eval_nll_experiment

    cfg = _load(args)
    eval_nll_experiment(cfg, run_root=Path(args.run_root), data_root=Path(args.data_root), model=args.model,
                        metrics_root=_metrics_root(args))
    return 0


def _cmd_fid_stats(args: argparse.Namespace) -> int:
    from lsgm.metrics import reference_statistics

    cfg = _load(args)
    reference_statistics(cfg, data_root=Path(args.data_root), out=Path(args.out))
    return 0


def _cmd_eval_fid(args: argparse.Namespace) -> int:
    from lsgm.metrics import eval_fid_experiment

    cfg = _load(args)
    eval_fid_experiment(cfg, run_root=Path(args.run_root), data_root=Path(args.data_root),
                        metrics_root=_metrics_root(args))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lsgm.report import write_report

    write_report(run_root=Path(args.run_root), out_dir=Path(args.out_dir), experiments=args.experiments or None,
                 data_root=Path(args.data_root))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from lsgm.launch import run_launch

    return run_launch(args)


SET_HELP = ("override one config value for this run, validated like a params file (repeatable; VALUE is YAML), "
            "e.g. --set sampling.ode_tol=1e-3. Applied after params/EXP.yaml and params.yaml, recorded in the resolved "
            "config (cli_overrides) and in every hash. Snakemake and DVC do not pass it: for the pipeline, put the value "
            "in params.yaml (or `dvc exp run -S '++EXP.KEY=VALUE'`)")
RETRAIN_HELP = ("train this stage again from scratch although it finished (old checkpoints are moved to "
                "checkpoints-stale-retrain/, model.pt and metrics.json removed); to continue an interrupted retrain, "
                "rerun without the flag")


def version_text() -> str:
    """``lsgm 0.1.0`` plus the commit of the checkout the package runs from (``git rev-parse HEAD``), if any."""
    from lsgm import __version__
    from lsgm.provenance import git_commit

    commit = git_commit()
    return f"lsgm {__version__}" + (f" (commit {commit})" if commit else " (not a git checkout)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lsgm`` argument parser (one sub-command per pipeline stage)."""
    p = argparse.ArgumentParser(prog="lsgm", description="LSGM: score-based generative modeling in latent space")
    p.add_argument("--version", action="version", version=version_text())
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    def exp(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("experiment", help="experiment name from params/experiments.yaml, or a params YAML file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    def roots(sp: argparse.ArgumentParser, data: bool = True) -> None:
        sp.add_argument("--run-root", default=str(RUNS_ROOT), help=f"where run directories live (default: {RUNS_ROOT})")
        sp.add_argument("--metrics-root", default=None,
                        help=f"where the headline metric files go (default: {HEADLINE_ROOT} for the default --run-root, "
                             f"else RUN_ROOT/../{HEADLINE_ROOT})")
        if data:
            sp.add_argument("--data-root", default=str(PREPARED_ROOT),
                            help=f"prepared datasets (default: {PREPARED_ROOT})")

    cfg = add("config", None, "inspect experiment configs")
    csub = cfg.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved, validated config of an experiment")
    exp(show)
    show.set_defaults(fn=_cmd_config_show)
    lst = csub.add_parser("list", help="list the experiments of params/experiments.yaml")
    lst.set_defaults(fn=_cmd_config_list)

    sp = add("resolve-config", _cmd_resolve_config,
             "write the merged, validated config to params/resolved/EXP.yaml (atomically; DVC reads params there)")
    exp(sp)
    sp.add_argument("--out", default=None, help="output file (default: params/resolved/EXP.yaml)")

    sp = add("prepare", _cmd_prepare, "download (if needed), verify and convert a dataset to data/prepared/NAME")
    sp.add_argument("name", help="digits | mnist | omniglot | cifar10 | celeba256")
    sp.add_argument("--raw-dir", default="data/raw", help="where raw downloads live (default: data/raw)")
    sp.add_argument("--out-dir", default=str(PREPARED_ROOT), help=f"output root (default: {PREPARED_ROOT})")
    sp.add_argument("--no-download", action="store_true", help="never download; fail if a raw file is missing")
    sp.add_argument("--accept-sha256", action="append", default=[], metavar="FILE=HEX",
                    help="accept raw file FILE with exactly this sha256 although it differs from the published "
                         "checksum (a mirror, a re-compressed copy); recorded in the manifest with a warning")

    sp = add("train-vae", _cmd_train_vae, "stage 1: train the VAE with a Normal prior (resumes automatically)")
    exp(sp)
    roots(sp)
    sp.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (debug)")
    sp.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)

    sp = add("train-lsgm", _cmd_train_lsgm, "stage 2(+): train the VAE and the SGM prior (resumes automatically)")
    exp(sp)
    roots(sp)
    sp.add_argument("--stage", default=None, help="prior stage name (default: all, in order)")
    sp.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (debug)")
    sp.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)

    sp = add("train-data-sgm", _cmd_train_data_sgm,
             "train the data-space score model (NCSN++ + VPSDE on dequantised pixels; the paper's baseline class)")
    exp(sp)
    roots(sp)
    sp.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (debug)")
    sp.add_argument("--retrain", action="store_true", help=RETRAIN_HELP)

    sp = add("sample", _cmd_sample, "draw samples (probability-flow ODE of the final prior stage, or a sample run)")
    exp(sp)
    roots(sp, data=False)
    sp.add_argument("--num-samples", type=int, default=None, help="override sampling.num_samples")
    sp.add_argument("--run", default=None, help="a tag of the experiment's sample_runs (default: the default run)")

    sp = add("sample-run", _cmd_sample_run, "draw the samples of one configured sampling run (another model, the "
             "ancestral sampler or another ODE tolerance) into samples/RUN/")
    exp(sp)
    sp.add_argument("run", help="the run's tag, e.g. lsgm-ode-tol0.01 or data_sgm-ancestral1000")
    roots(sp, data=False)
    sp.add_argument("--num-samples", type=int, default=None, help="override sampling.num_samples")

    sp = add("eval-nll", _cmd_eval_nll, "NLL bound on the evaluation split (VAE terms + ODE prior term)")
    exp(sp)
    roots(sp)
    sp.add_argument("--model", default="lsgm", help="lsgm (the final prior stage), vae (the VAE alone), a prior "
                                                    "stage's name, or data_sgm (default: lsgm)")

    sp = add("train-classifier", _cmd_train_classifier,
             "train the dataset's feature classifier (FD/KID of samples in its features; eval_fd section)")
    exp(sp)
    sp.add_argument("--data-root", default=str(PREPARED_ROOT))
    sp.add_argument("--out-root", default=str(CLASSIFIERS_ROOT), help=f"(default: {CLASSIFIERS_ROOT})")

    sp = add("eval-fd", _cmd_eval_fd, "FD and KID of a sampling run in the dataset-classifier's features")
    exp(sp)
    roots(sp)
    sp.add_argument("--run", default=None, help="a tag of the experiment's sample_runs (default: the default run)")
    sp.add_argument("--classifier-root", default=str(CLASSIFIERS_ROOT), help=f"(default: {CLASSIFIERS_ROOT})")

    sp = add("fid-stats", _cmd_fid_stats, "reference Inception statistics of the training split")
    exp(sp)
    sp.add_argument("--data-root", default=str(PREPARED_ROOT))
    sp.add_argument("--out", required=True, help="output .pt file (mu, sigma)")

    sp = add("eval-fid", _cmd_eval_fid, "FID / IS / KID of the samples with torch-fidelity")
    exp(sp)
    roots(sp)

    from lsgm.launch import add_launch_arguments

    sp = add("launch", _cmd_launch, "run STAGE of EXP with the process layout of resources.STAGE: directly, "
             "torchrun on one node, or srun + torchrun (c10d rendezvous) on several Slurm nodes")
    add_launch_arguments(sp)

    sp = add("claims", _cmd_claims, "compute the paper's claims at small scale: reports/claims.json and claims.md")
    sp.add_argument("--experiments", nargs="+", required=True,
                    help="experiment instances (NAME, NAME_seed1, ...) whose metric files the claims read")
    sp.add_argument("--run-root", default=str(RUNS_ROOT))
    sp.add_argument("--out-dir", default="reports")

    sp = add("report", _cmd_report, "write reports/results.{md,csv,html}, checks.{md,html}, figures and captions")
    sp.add_argument("--run-root", default=str(RUNS_ROOT))
    sp.add_argument("--data-root", default=str(PREPARED_ROOT), help="prepared datasets (real images beside samples)")
    sp.add_argument("--out-dir", default="reports")
    sp.add_argument("--experiments", nargs="*", default=None, help="default: every experiment in the matrix")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lsgm`` console script.

    Errors a user can cause or meet (:class:`lsgm.errors.LsgmError`: bad config, bad or missing file, full disk,
    unreadable model; a missing file; a bad value; an operating-system failure naming its file) are ONE line on
    stderr and exit status 2. Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"lsgm: config error: {exc}", file=sys.stderr)
        return 2
    except (LsgmError, FileNotFoundError, ValueError) as exc:
        print(f"lsgm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"lsgm: error: {storage_error(exc, exc.filename, 'access')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

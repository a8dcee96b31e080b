"""Typed experiment config: every params file loads; bad input fails with file, key path, value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lsgm.config import (ConfigError, config_from_dict, config_to_dict, default_experiments, dump_config,
                         list_experiments, load_config, load_experiment, write_resolved_config)

ALL = ["digits", "fashion", "mnist", "omniglot", "cifar10_balanced", "cifar10_best_fid", "cifar10_best_nll",
       "celeba256_quantitative", "celeba256_qualitative"]


def test_matrix_lists_every_experiment_and_only_digits_by_default():
    assert list_experiments() == ALL
    assert default_experiments() == ["digits"]


@pytest.mark.parametrize("name", ALL)
def test_every_params_file_loads_and_round_trips(name, tmp_path):
    cfg = load_experiment(name)
    assert cfg.name == name
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    path = write_resolved_config(cfg, tmp_path / "resolved_config.yaml")
    assert load_config(path, name=name) == cfg


def test_cifar10_best_fid_matches_spec_9_1():
    cfg = load_experiment("cifar10_best_fid")
    p = cfg.prior["lsgm"]
    assert (p.train.iw_sample_p, p.train.iw_sample_q) == ("drop_all_iw", "reweight_p_samples")
    assert p.score_net.nf == 512 and p.score_net.num_scales == 3 and p.score_net.num_res_blocks == 8
    assert p.score_net.fir and p.score_net.dropout == 0.2 and p.score_net.mixing_logit_init == -3.0
    r = cfg.resource("train_lsgm")
    assert r.nodes * r.gpus_per_node == 16 and p.train.batch_size == 16 and p.train.global_batch_size == 256
    assert p.train.epochs == 1875 and p.train.cont_kl_anneal and not p.train.spectral_reg_score_convs
    assert p.sde.kind == "vpsde" and (p.sde.beta_min, p.sde.beta_max, p.sde.time_eps) == (0.1, 20.0, 0.01)
    assert cfg.sampling.ode_eps == 1e-6 and cfg.sampling.ode_tol == 1e-5
    assert cfg.train_vae.epochs == 400 and cfg.train_vae.kl_max_coeff == 0.7
    assert cfg.vae.num_groups_per_scale * cfg.vae.num_latent_per_group == 180
    assert cfg.vae.latent_shape(cfg.data) == (180, 16, 16)  # docs/algorithm.md §1.2


def test_celeba_qualitative_has_three_stages_per_spec_9_4():
    cfg = load_experiment("celeba256_qualitative")
    assert list(cfg.prior) == ["lsgm", "frozen_vae"] and cfg.final_prior_stage == "frozen_vae"
    s2, s3 = cfg.prior["lsgm"], cfg.prior["frozen_vae"]
    assert s2.sde.kind == "geometric" and s2.sde.sigma2_0 == 3e-5 and s2.sde.time_eps == 0.0
    assert s2.train.disjoint and s2.train.update_q_ema and s2.train.learning_rate_vae == 8e-5
    assert (s2.train.iw_sample_p, s2.train.iw_sample_q) == ("drop_sigma2t_iw", "ll_iw")
    assert s3.init_from == "lsgm" and not s3.train_vae and not s3.load_prior
    assert s3.score_net.nf == 320 and s3.train.learning_rate_score == 6e-5 and s3.train.batch_size == 6
    assert s3.sde.kind == "vpsde" and s3.sde.time_eps == 0.01
    assert cfg.data.num_x_bits == 5 and cfg.vae.latent_shape(cfg.data) == (200, 64, 64)


def test_mnist_values_per_spec_9_2():
    cfg = load_experiment("mnist")
    assert cfg.vae.channel_mult == (1, 2, 2) and cfg.vae.num_preprocess_cells == 3
    assert cfg.vae.latent_shape(cfg.data) == (40, 8, 8)
    t = cfg.prior["lsgm"].train
    assert t.learning_rate_score == 3e-4 and t.weight_decay_norm_score == 0.0 and t.drop_inactive_var
    assert cfg.prior["lsgm"].score_net.mixing_logit_init == -6.0 and t.warmup_epochs == 20


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(f"extends: [{Path('params/digits.yaml').resolve()}]\n" + text)
    return p


def test_misspelt_key_names_it_and_suggests(tmp_path):
    p = _write(tmp_path, "train_vae: {learning_rat: 1.0e-4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "train_vae.learning_rat" in msg and "did you mean 'learning_rate'" in msg


def test_wrong_type_names_key_value_and_allowed(tmp_path):
    p = _write(tmp_path, "train_vae: {epochs: ten}\n")
    with pytest.raises(ConfigError, match=r"train_vae\.epochs = 'ten' has the wrong type; allowed: an integer"):
        load_config(p)


def test_out_of_range_names_key_value_and_allowed(tmp_path):
    p = _write(tmp_path, "prior: {lsgm: {train: {ema_decay: 1.5}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "prior.lsgm.train.ema_decay = 1.5" in msg and "<= 1" in msg


def test_bad_choice_lists_allowed_values(tmp_path):
    p = _write(tmp_path, "prior: {lsgm: {train: {iw_sample_p: ll_iww}}}\n")
    with pytest.raises(ConfigError, match=r"allowed: one of .*'ll_iw'.*did you mean 'll_iw'"):
        load_config(p)


def test_cross_field_rules(tmp_path):
    p = _write(tmp_path, "prior: {lsgm: {sde: {kind: geometric, time_eps: 0.0}, train: {iw_sample_p: drop_all_iw}}}\n")
    with pytest.raises(ConfigError, match="drop_all_iw.*vpsde"):
        load_config(p)
    p = _write(tmp_path, "vae: {channel_mult: [1, 2, 2]}\n")
    with pytest.raises(ConfigError, match="channel_mult has 3 entries"):
        load_config(p)


def test_unknown_experiment_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'cifar10_best_fid'"):
        load_experiment("cifar10_bestfid")


def test_cli_config_show_prints_paper_hyperparameters():
    out = subprocess.run([sys.executable, "-m", "lsgm.cli", "config", "show", "cifar10_best_fid"],
                         capture_output=True, text=True, check=True).stdout
    assert "iw_sample_p: drop_all_iw" in out and "nf: 512" in out and "gpus_per_node: 8" in out
    assert "batch_size: 16" in out and "nodes: 2" in out


def test_cli_config_error_exit_code(tmp_path):
    p = _write(tmp_path, "train_vae: {learning_rat: 1.0e-4}\n")
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", "config", "show", str(p)], capture_output=True, text=True)
    assert res.returncode == 2 and "learning_rat" in res.stderr and "learning_rate" in res.stderr


def test_dump_is_valid_yaml_of_the_same_config(tmp_path):
    cfg = load_experiment("celeba256_qualitative")
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p, name=cfg.name) == cfg


# ------------------------------------------------------------------------------------------------ overrides
def _matrix_copy(tmp_path: Path, overrides: str) -> Path:
    """A repository root with the real params/ and a params.yaml of ``overrides``."""
    import shutil

    shutil.copytree(Path("params"), tmp_path / "params")
    (tmp_path / "params.yaml").write_text(overrides)
    return tmp_path


def _strip_file(msg: str) -> str:
    """The part of an error message after its first ": " (the file or override that wrote the value)."""
    return msg.split(": ", 1)[1].split(" (overriding ")[0]


@pytest.mark.parametrize("key, value", [("sampling.ode_tol", "-1"), ("sampling.ode_tl", "1"),
                                        ("sampling.ode_tol", "abc"), ("prior.lsgm.train.iw_sample_p", "ll_iww"),
                                        ("vae.channel_mult", "[1]"), ("resources.trainvae.nodes", "2")])
def test_set_gets_exactly_the_params_file_error(tmp_path, key, value):
    """`--set KEY=VALUE`, `params.yaml` and a params file are validated alike: the same message, led by the source."""
    nested: object = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    in_file = tmp_path / "exp.yaml"
    in_file.write_text(f"extends: [{Path('params/digits.yaml').resolve()}]\n" + yaml.safe_dump(nested))
    with pytest.raises(ConfigError) as from_file:
        load_config(in_file)
    with pytest.raises(ConfigError) as from_set:
        load_experiment("digits", set_args=[f"{key}={value}"])
    root = _matrix_copy(tmp_path / "repo", "digits:\n" + "".join(
        "  " + line + "\n" for line in yaml.safe_dump(nested).splitlines()))
    with pytest.raises(ConfigError) as from_overrides:
        load_experiment("digits", root=root)
    assert str(from_set.value).startswith(f"--set {key}={value}: ")
    assert str(from_set.value).endswith(f"(overriding {Path('params/digits.yaml').resolve()})")
    assert str(from_overrides.value).startswith(f"{root / 'params.yaml'}: digits.")
    assert _strip_file(str(from_set.value)) == _strip_file(str(from_file.value))
    assert _strip_file(str(from_overrides.value)) == "digits." + _strip_file(str(from_file.value))


def test_overrides_merge_in_order_and_are_recorded(tmp_path):
    root = _matrix_copy(tmp_path, "digits:\n  sampling:\n    ode_tol: 0.002\n    temperature: 0.9\nmnist: {}\n")
    cfg = load_experiment("digits", root=root)
    assert cfg.sampling.ode_tol == 2e-3 and cfg.sampling.temperature == 0.9 and cfg.cli_overrides == ()
    cfg = load_experiment("digits", root=root, set_args=["sampling.ode_tol=1e-3", "prior.lsgm.train.epochs=3"])
    assert cfg.sampling.ode_tol == 1e-3 and cfg.sampling.temperature == 0.9  # --set last
    assert cfg.prior["lsgm"].train.epochs == 3 and cfg.cli_overrides == ("sampling.ode_tol=1e-3",
                                                                          "prior.lsgm.train.epochs=3")
    assert load_experiment("mnist", root=root) == load_experiment("mnist")
    from lsgm.config import config_hash, experiment_hash

    base = load_experiment("digits")
    assert experiment_hash(cfg) != experiment_hash(base)
    assert config_hash(cfg.train_vae) == config_hash(base.train_vae)  # a stage that does not read them: same hash
    with pytest.raises(ConfigError, match=r"params\.yaml: digts: unknown experiment 'digts'; did you mean 'digits'"):
        load_experiment("digits", root=_matrix_copy(tmp_path / "typo", "digts: {}\n"))
    with pytest.raises(ConfigError, match="name: cannot be overridden"):
        load_experiment("digits", set_args=["name=other"])
    with pytest.raises(ConfigError, match="allowed: KEY=VALUE with KEY a dotted path"):
        load_experiment("digits", set_args=["sampling"])


def test_cli_set_resolve_config_and_version(tmp_path):
    out = tmp_path / "r.yaml"
    res = subprocess.run([sys.executable, "-m", "lsgm.cli", "resolve-config", "digits", "--out", str(out), "--set",
                          "sampling.ode_tol=1e-3", "--set", "sampling.seed=7"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(out.read_text())
    assert resolved["sampling"]["ode_tol"] == 1e-3 and resolved["sampling"]["seed"] == 7
    assert resolved["cli_overrides"] == ["sampling.ode_tol=1e-3", "sampling.seed=7"]
    bad = subprocess.run([sys.executable, "-m", "lsgm.cli", "config", "show", "digits", "--set", "sampling.ode_tol=0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("lsgm: config error: --set sampling.ode_tol=0: "
                                                         "sampling.ode_tol = 0.0 is out of range; allowed: > 0")
    assert len(bad.stderr.strip().splitlines()) == 1
    version = subprocess.run([sys.executable, "-m", "lsgm.cli", "--version"], capture_output=True, text=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    from lsgm import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"lsgm {__version__} (commit {head})"

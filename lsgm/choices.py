"""Named choices shared by the typed config and the maths: one home for each list of allowed values.

Torch-free on purpose: :mod:`lsgm.config` (read by Snakemake at parse time) and the maths modules both import it.

* :data:`IW_MODES`: weighting / importance-sampling modes of the SGM objective ``iw_sample_p`` (paper Sec. 3.3,
  3.4; docs/algorithm.md §4.3); :data:`IW_Q_MODES` those of the encoder's cross-entropy ``iw_sample_q``.
* :data:`LIKELIHOOD_MODES`: the modes whose weight is the likelihood weight ``w_ll`` (p and q then share one
  objective when ``iw_sample_q = reweight_p_samples``).
* :data:`SDE_PARAMS`: the parameters of each forward SDE (docs/algorithm.md §2).
* :data:`COMPAT_MODES`: exact maths or the reference code's quirks (docs/algorithm.md §12 item 2).
"""

from __future__ import annotations

__all__ = [
    "COMPAT_MODES",
    "DEVICES",
    "IW_MODES",
    "IW_Q_MODES",
    "LIKELIHOOD_MODES",
    "ODE_METHODS",
    "PROBES",
    "PROBE_MODES",
    "SDE_KINDS",
    "SDE_PARAMS",
    "TRACES",
    "VPSDE_ONLY_MODES",
    "WEIGHT_DECAY_MODES",
    "check_choice",
    "check_mode_sde",
]

IW_MODES = (
    "ll_uniform",
    "ll_iw",
    "drop_all_uniform",
    "drop_all_iw",
    "drop_sigma2t_iw",
    "drop_sigma2t_uniform",
    "rescale_iw",
)
IW_Q_MODES = ("reweight_p_samples", "ll_uniform", "ll_iw")
LIKELIHOOD_MODES = ("ll_uniform", "ll_iw")
#: modes whose proposal r(t) is closed-form only for the linear-β VPSDE (docs/algorithm.md §4.3)
VPSDE_ONLY_MODES = ("drop_all_iw",)
COMPAT_MODES = ("exact", "official")
#: parameters of each SDE kind, in constructor order (docs/algorithm.md §2.1, §2.2)
SDE_PARAMS: dict[str, tuple[str, ...]] = {
    "vpsde": ("beta_min", "beta_max", "sigma2_0"),
    "geometric": ("sigma2_min", "sigma2_max", "sigma2_0"),
}
SDE_KINDS = tuple(SDE_PARAMS)
#: ``engine.device`` (lsgm/device.py: the one device rule)
DEVICES = ("auto", "cpu", "cuda")
TRACES = ("hutchinson", "exact")
PROBES = ("gaussian", "rademacher")
PROBE_MODES = ("fixed", "fresh")
#: config spelling of the ODE solvers (``scipy_rk45`` is SciPy's RK45 through torchdiffeq's ``scipy_solver``)
ODE_METHODS = ("dopri5", "scipy_rk45")
#: stage-2 Adam weight decay: decoupled (AdamW, what apex's FusedAdam does by default) or an L2 term (torch Adam)
WEIGHT_DECAY_MODES = ("decoupled", "l2")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name``, the value and the allowed ones unless ``value in allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_mode_sde(mode: str, sde_kind: str, where: str = "iw_sample_p") -> None:
    """The one rule on which SDE a weighting mode needs: ``drop_all_iw`` has a closed-form proposal only for the
    linear-β VPSDE (docs/algorithm.md §4.3). Raises ``ValueError`` otherwise."""
    if mode in VPSDE_ONLY_MODES and sde_kind != "vpsde":
        raise ValueError(f"{where} = {mode!r} needs sde.kind = 'vpsde' (closed-form proposal), got {sde_kind!r}")

"""Differentially private training of the torch heads (DP-SGD with Opacus).

:func:`dp_train` runs the torch heads' training loop under DP-SGD (Abadi et al. 2016) as implemented by Opacus:
Poisson-sampled mini-batches, per-patient gradients clipped to ``max_grad_norm``, Gaussian noise whose scale
:meth:`opacus.PrivacyEngine.make_private_with_epsilon` sets so that the planned epochs spend at most
``target_epsilon`` at ``delta`` under the RDP accountant. The unit of privacy is a **patient** (one row of
the cohort: all of a patient's tiles, vectors and its label).

What DP-SGD needs of the model, and how the heads meet it:

* per-sample gradients: Opacus' hook-based grad samplers cover ``nn.Linear`` (also on (B, N, D) bags),
  ``nn.LayerNorm``; masking, softmax and ``bmm`` have no parameters. :class:`StandardisedEmbed` folds the
  instance scaler into its weights with ``F.linear`` (no hook would fire); during DP training it is swapped for
  :class:`UnfoldedStandardisedEmbed`, which calls its ``nn.Linear`` on the standardised input (the same
  function and the same parameters, so the saved weights load into the usual module).
* ``nn.MultiheadAttention`` and the free ``type_emb`` parameter of ``cross_attention`` fusion are refused
  (Opacus would replace the attention by a module with other parameter names): :func:`check_module`.
* per-sample losses: each patient's loss may depend only on that patient. Cross-entropy and focal loss
  without class weights are; balanced class weights are computed from the training labels outside the
  accountant, and the Cox partial likelihood couples every patient of the batch's risk set, so both are
  refused (:func:`check_dp_task`).

What epsilon covers (the privacy record's ``covers`` / ``not_covered``, :func:`privacy_scope`): the network
weights only, given the preprocessing. Everything else the saved model holds was fit on the training patients
without noise: imputation medians (each one patient's value, or the mean of two), standardisation means and
scales, PCA bases, ComBat's per-batch estimates, the bag tile scaler, the class names and the number of
patients (the sampling rate is ``batch_size / n``), and with ``--calibrate platt`` / ``--operating-point`` the
calibrator's two coefficients and a threshold that is one patient's out-of-fold probability
(:func:`with_postprocess`). Preprocessing that stores training rows (``--impute knn|iterative``) and isotonic
calibration (its steps are training points) are refused with ``dp_epsilon``.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.heads.nn.losses import focal_loss
from mmcli.heads.nn.modules import StandardisedEmbed
from mmcli.pipeline.errors import InputError

ACCOUNTANT = "rdp"


class UnfoldedStandardisedEmbed(StandardisedEmbed):
    """:class:`StandardisedEmbed` computing ``linear((x - mean) / scale)`` so Opacus' Linear hook sees it."""

    def forward(self, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear((x - mean) / scale))


@contextlib.contextmanager
def unfolded(module: nn.Module) -> Iterator[nn.Module]:
    """Every :class:`StandardisedEmbed` of ``module`` computes through its ``nn.Linear`` inside the block."""
    swapped = [m for m in module.modules() if type(m) is StandardisedEmbed]
    for m in swapped:
        m.__class__ = UnfoldedStandardisedEmbed
    try:
        yield module
    finally:
        for m in swapped:
            m.__class__ = StandardisedEmbed


def check_module(module: nn.Module, context: str) -> None:
    """InputError when Opacus cannot compute per-sample gradients of ``module`` as built."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    problems = [str(e) for e in ModuleValidator.validate(module, strict=False)]
    with unfolded(module):
        for name, m in module.named_modules():
            direct = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if direct and type(m) not in GradSampleModule.GRAD_SAMPLERS:
                problems.append(f"{name or 'model'} ({type(m).__name__}) has no per-sample gradient rule")
    if problems:
        raise InputError(f"{context}: DP-SGD (--param dp_epsilon) cannot train this network: "
                         f"{'; '.join(problems)}. Fix: use another fusion (e.g. --param fusion=concat) or drop "
                         "--param dp_epsilon.")


def check_dp_task(*, survival: bool, class_weight: str | None, context: str) -> None:
    """Refuse the losses whose per-patient terms are not separable (see the module docstring)."""
    if survival:
        raise InputError(f"{context}: DP-SGD needs a loss that is a sum of per-patient terms; the Cox partial "
                         "likelihood compares each patient with its risk set. Fix: drop --param dp_epsilon, or "
                         "use a classification --target.")
    if class_weight not in (None, "none"):
        raise InputError(f"{context}: --param class_weight={class_weight} uses the training label counts, which "
                         "the DP accountant does not cover. Fix: --param class_weight=none (the default with "
                         "dp_epsilon).")


def dp_train(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    n: int,
    *,
    batch_size: int,
    epochs: int,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    seed: int | None,
    step_loss: Callable[[np.ndarray], torch.Tensor],
) -> dict[str, Any]:
    """Train ``module`` in place with DP-SGD; returns the privacy record.

    Args:
        module, optimizer: the network and its (non-private) optimizer.
        n: number of training patients; batches are Poisson samples of ``range(n)`` with rate ``batch_size / n``.
        step_loss: patients' row indices -> the batch's **mean** per-patient loss (forward pass included).

    Returns:
        ``{"epsilon": spent, "target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "sample_rate",
        "steps", "accountant": "rdp", "unit": "patient"}``.
    """
    from opacus import PrivacyEngine

    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**31))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)),
                                         batch_size=max(1, min(batch_size, n)), generator=gen)
    with unfolded(module), warnings.catch_warnings():
        # Opacus warns that secure_mode (a CSPRNG for the noise) is off: a seeded generator keeps runs repeatable
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        hooks, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=module, optimizer=optimizer, data_loader=loader, target_epsilon=target_epsilon,
            target_delta=delta, epochs=epochs, max_grad_norm=max_grad_norm, poisson_sampling=True,
            noise_generator=gen, loss_reduction="mean", wrap_model=False)
        steps = 0
        try:
            for _ in range(epochs):
                module.train()
                for (batch,) in dp_loader:
                    dp_opt.zero_grad(set_to_none=True)
                    if len(batch) == 0:  # an empty Poisson sample is still a noisy step of the mechanism
                        for p in dp_opt.params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        step_loss(batch.numpy()).backward()
                    dp_opt.step()
                    steps += 1
        finally:
            hooks.cleanup()  # removes the hooks and the per-sample attributes from the parameters
    return {"epsilon": float(engine.get_epsilon(delta)), "target_epsilon": float(target_epsilon),
            "delta": float(delta), "max_grad_norm": float(max_grad_norm),
            "noise_multiplier": float(dp_opt.noise_multiplier), "sample_rate": float(1 / len(loader)),
            "steps": steps, "accountant": ACCOUNTANT, "unit": "patient"}


COVERS = ("weights.safetensors (the network): every training step clips each patient's gradient to max_grad_norm "
          "and adds Gaussian noise, so epsilon bounds what these weights reveal about any one training patient "
          "(all of its tiles, vectors and its label), at delta, given the preprocessing below")
_ARRAYS = {  # preprocess.safetensors array -> what it holds
    "median": "per-feature imputation medians / means (a median is one patient's value, or the mean of two)",
    "indicator": "which features had missing training values (missingness indicators)",
    "mean": "per-feature standardisation means", "scale": "per-feature standardisation scales",
    "components": "the PCA basis", "pca_mean": "the PCA centre",
    "combat.grand_mean": "ComBat's grand mean", "combat.pooled_var": "ComBat's pooled variance",
    "combat.gamma": "ComBat's per-batch locations", "combat.delta": "ComBat's per-batch scales",
    "combat.beta": "ComBat's protected-covariate effects",
}


def privacy_scope(preprocessors: Mapping[str, Any]) -> dict[str, Any]:
    """``{"covers": str, "not_covered": [str]}``: what the spent epsilon covers in a saved DP model and what
    the model holds outside it (each of ``preprocessors``' saved arrays, fit on the training patients without
    noise; the labels' classes and the patient count). Calibration is added by :func:`with_postprocess`."""
    rows = []
    for name, prep in preprocessors.items():
        meta, arrays = prep.state()
        if meta.get("type") == "instance":
            what = ["per-feature means and scales of the training bags' tiles (up to "
                    f"{meta.get('max_per_bag')} tiles per patient)"]
        else:
            what = [_ARRAYS.get(k, k) for k in arrays]
        rows.append(f"preprocess.safetensors {name}: {'; '.join(what)}, fit on the {meta.get('n_fitted')} training "
                    "patients without noise")
    rows += ["config.json: the class names and their number, and n_patients (the sampling rate batch_size / n "
             "uses it); class_weight is none, so the label counts do not enter the loss",
             "the run folder outside model/ (predictions.csv, folds.json, metrics.json, explanations): per-patient "
             "results of the fold models, not private; the fold models spend their own budgets on the same patients"]
    return {"covers": COVERS, "not_covered": rows}


def with_postprocess(record: dict[str, Any], calibrate: str, operating_point: bool) -> dict[str, Any]:
    """``record`` with the final model's output policy (``postprocess.json``) added to ``not_covered``."""
    extra = []
    if calibrate not in (None, "none"):
        extra.append(f"postprocess.json calibrator ({calibrate}): fit on the out-of-fold probabilities and labels "
                     "of all patients without noise")
    if operating_point:
        extra.append("postprocess.json threshold: one patient's out-of-fold probability, chosen with the labels")
    return {**record, "not_covered": [*record.get("not_covered", []), *extra]} if extra else record


def per_patient_loss(out: torch.Tensor, y: torch.Tensor, loss: str, gamma: float) -> torch.Tensor:
    """Mean over the batch of unweighted per-patient classification losses (ce or focal)."""
    return focal_loss(out, y, gamma) if loss == "focal" else F.cross_entropy(out, y)

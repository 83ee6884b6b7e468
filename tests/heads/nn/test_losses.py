"""Losses against library references: Cox partial likelihood vs lifelines, focal(gamma=0) vs weighted CE."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lifelines import CoxPHFitter

from mmcli.heads.nn.losses import class_weights, cox_ph_loss, focal_loss


def test_cox_loss_equals_lifelines_partial_likelihood():
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    t = rng.exponential(10 / np.exp(0.8 * x)).round(3) + 0.01
    e = (rng.random(n) < 0.7).astype(int)
    df = pd.DataFrame({"x": x, "t": t, "e": e})
    cph = CoxPHFitter().fit(df, "t", "e")  # no ties, so Breslow == Efron
    beta = float(cph.params_["x"])
    loss = cox_ph_loss(torch.tensor(beta * x), torch.tensor(t), torch.tensor(e))
    assert -float(loss) * e.sum() == pytest.approx(cph.log_likelihood_, rel=1e-6)
    # beta is lifelines' maximum, so nearby values give a larger loss
    for b in (beta - 0.2, beta + 0.2):
        assert float(cox_ph_loss(torch.tensor(b * x), torch.tensor(t), torch.tensor(e))) > float(loss)


def test_cox_loss_ties_share_one_risk_set_and_no_event_batch_is_zero():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.3], requires_grad=True)
    time = torch.tensor([2.0, 2.0, 5.0, 1.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    loss = cox_ph_loss(risk, time, event)
    r = risk.detach().numpy()
    at_2 = np.log(np.exp(r[[0, 1, 2]]).sum())  # both tied subjects see {0, 1, 2}
    at_1 = np.log(np.exp(r).sum())
    expected = -((r[0] - at_2) + (r[1] - at_2) + (r[3] - at_1)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(risk.grad).all()
    zero = cox_ph_loss(risk, time, torch.zeros(4))
    assert zero.item() == 0.0 and zero.requires_grad


def test_focal_loss_reduces_to_weighted_cross_entropy_and_downweights_easy_examples():
    logits = torch.tensor([[2.0, 0.1, -1.0], [0.2, 0.3, 0.1], [-1.0, 3.0, 0.0]])
    target = torch.tensor([0, 2, 1])
    w = torch.tensor([1.0, 2.0, 0.5])
    assert float(focal_loss(logits, target, 0.0, w)) == pytest.approx(float(F.cross_entropy(logits, target, weight=w)))
    assert float(focal_loss(logits, target, 2.0)) < float(F.cross_entropy(logits, target))


def test_balanced_class_weights_follow_sklearn():
    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(class_weights(y, 3), [6 / 9, 2.0, 1.0])
    np.testing.assert_allclose(class_weights(np.array([0, 0, 2]), 3), [0.75, 1.0, 1.5])  # class 1 absent -> 1
    np.testing.assert_allclose(class_weights(y, 3, None), [1, 1, 1])

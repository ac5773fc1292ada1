"""The networks' losses: Cox partial likelihood with Efron ties (against lifelines and radstudy.survival) and BCE."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from sklearn.metrics import log_loss

from radstudy.networks.losses import binary_loss, cox_efron_loss
from radstudy.survival import univariable_cox


def _tied_survival(n: int = 80, seed: int = 0):
    """One covariate with an effect; integer times (many ties, several events per tied time), ~30 % censored."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = np.ceil(rng.exponential(scale=np.exp(-0.7 * x)) * 4)
    event = (rng.random(n) < 0.7).astype(int)
    return x, time, event


def test_cox_loss_times_events_is_lifelines_negative_log_partial_likelihood_with_ties():
    x, time, event = _tied_survival()
    tied = pd.Series(time[event == 1]).value_counts()
    assert (tied > 1).sum() >= 5  # the data really has tied event times
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": time, "E": event}), "T", "E")  # Efron ties (its only method)
    beta = cph.params_["x"]
    loss = cox_efron_loss(torch.tensor(beta * x), torch.tensor(time), torch.tensor(event))
    assert float(loss) * event.sum() == pytest.approx(-cph.log_likelihood_, abs=1e-6)


def test_cox_loss_is_minimal_at_radstudy_survivals_efron_estimate():
    """radstudy.survival exposes no log-likelihood, only its Efron MLE: the loss's gradient must vanish there."""
    x, time, event = _tied_survival(seed=1)
    beta_hat = univariable_cox(x[:, None], time, event)[0][0]
    assert abs(beta_hat) > 0.2
    beta = torch.tensor(beta_hat, dtype=torch.float64, requires_grad=True)
    cox_efron_loss(beta * torch.tensor(x), torch.tensor(time), torch.tensor(event)).backward()
    assert abs(float(beta.grad)) < 1e-7
    away = torch.tensor(beta_hat + 0.1, dtype=torch.float64, requires_grad=True)
    cox_efron_loss(away * torch.tensor(x), torch.tensor(time), torch.tensor(event)).backward()
    assert abs(float(away.grad)) > 1e-3


def test_cox_loss_by_hand_uses_efron_and_divides_by_events():
    """Two events tied at t=1 and a censored row at t=2, all risks 1: Efron log L = -log 3 - log(3 - 1/2 * 2)
    (Breslow would give -2 log 3); per event: log(6) / 2."""
    loss = cox_efron_loss(torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 1.0, 2.0]),
                          torch.tensor([1, 1, 0]))
    assert float(loss) == pytest.approx(math.log(6) / 2, abs=1e-12)


def test_cox_loss_ignores_row_order_and_a_constant_shift_of_the_risk():
    x, time, event = _tied_survival(n=30, seed=2)
    eta = torch.tensor(0.5 * x)
    base = cox_efron_loss(eta, torch.tensor(time), torch.tensor(event))
    perm = torch.from_numpy(np.random.default_rng(3).permutation(30))
    assert float(cox_efron_loss(eta[perm], torch.tensor(time)[perm], torch.tensor(event)[perm])) == \
        pytest.approx(float(base), abs=1e-12)
    assert float(cox_efron_loss(eta + 500.0, torch.tensor(time), torch.tensor(event))) == \
        pytest.approx(float(base), abs=1e-9)


def test_cox_loss_of_a_batch_without_events_is_zero_with_zero_gradient_and_no_warning():
    eta = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = cox_efron_loss(eta, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]))
        loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(eta.grad, torch.zeros(3))


def test_cox_loss_gradient_is_finite_with_far_apart_risks():
    eta = torch.tensor([-120.0, 0.0, 90.0, 1.0], requires_grad=True)
    loss = cox_efron_loss(eta, torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(eta.grad).all()


def test_binary_loss_is_weighted_cross_entropy():
    rng = np.random.default_rng(0)
    logit, y = rng.normal(size=40), (rng.random(40) < 0.3).astype(float)
    weight = (1 - y).sum() / y.sum()
    p = 1 / (1 + np.exp(-logit))
    w = np.where(y == 1, weight, 1.0)
    expected = log_loss(y, p, sample_weight=w) * w.sum() / len(y)  # sklearn normalises by the weights' sum
    got = binary_loss(torch.tensor(logit), torch.tensor(y), pos_weight=weight)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(binary_loss(torch.tensor(logit), torch.tensor(y))) == pytest.approx(log_loss(y, p), rel=1e-9)

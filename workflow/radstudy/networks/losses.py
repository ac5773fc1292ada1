"""Training losses of the end-to-end networks: Cox partial likelihood (Efron ties) and binary cross-entropy.

`cox_efron_loss` is the negative log partial likelihood of a linear predictor with Efron's approximation for tied
event times (lifelines' and `radstudy.survival`'s default), divided by the number of events, so that the loss of a
batch does not grow with its number of events (and not with its number of distinct event times). For each
distinct event time t with d events, risk set R(t) (rows with time >= t) and tied events D(t):

    log L = sum_t [ sum_{i in D(t)} eta_i - sum_{l=0}^{d-1} log( sum_{R(t)} exp(eta) - l/d sum_{D(t)} exp(eta) ) ]

computed in O(n log n) on sorted times, with the linear predictor shifted by its maximum (exact; it cancels) so
that exp never overflows. A batch without events has no partial likelihood: the loss is 0, with a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cox_efron_loss(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Efron log partial likelihood of `log_risk` (N,) per event; 0 (zero gradient) without events."""
    event = event.to(torch.bool)
    n_events = int(event.sum())
    if n_events == 0:
        return (log_risk * 0.0).sum()
    order = torch.argsort(time, descending=True, stable=True)
    eta, t, e = log_risk[order], time[order], event[order].to(log_risk.dtype)
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    shift = eta.detach().max()
    risk = torch.exp(eta - shift)
    last = torch.cumsum(counts, 0) - 1  # last row of each time group: the risk set holds every row before it
    risk_sum = torch.cumsum(risk, 0)[last]
    tied_sum = torch.zeros_like(risk_sum).index_add(0, group, risk * e)
    tied_n = torch.zeros_like(risk_sum).index_add(0, group, e)
    events_before = torch.cumsum(e, 0) - e  # events at earlier positions (longer times, then earlier ties)
    first = last - counts + 1
    rank = events_before - events_before[first][group]  # l: 0 .. d-1 among the events of a time group
    ev = e > 0  # only event rows enter the likelihood (a censored row's term is never formed: no 0 * log 0)
    g = group[ev]
    denominator = torch.log(risk_sum[g] - rank[ev] / tied_n[g] * tied_sum[g]) + shift
    return -(eta[ev] - denominator).sum() / n_events


def binary_loss(logit: torch.Tensor, y: torch.Tensor, pos_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy with logits; `pos_weight` (e.g. n_neg / n_pos) weighs the positive rows."""
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logit.dtype, device=logit.device)
    return F.binary_cross_entropy_with_logits(logit, y.to(logit.dtype), pos_weight=pos_weight)

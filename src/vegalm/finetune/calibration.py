"""Post-hoc temperature scaling (Guo et al. 2017, arXiv:1706.04599), ECE and NLL, with an honest estimate.

    from vegalm.finetune.calibration import calibration_report, apply_temperature
    rep = calibration_report(dev_logits, dev_labels)
    # {'ece_before': .., 'ece_after': .., 'nll_before': .., 'nll_after': .., 'temperature': 1.7,
    #  'ece_after_crossfit': .., 'nll_after_crossfit': .., 'temperatures_crossfit': [1.6, 1.8]}
    test_probs = softmax(apply_temperature(test_logits, rep["temperature"]))

Temperature scaling divides the logits by one scalar T > 0 fitted to minimise the dev NLL. It never
changes the argmax, so accuracy, F1 and MCC are untouched; only the confidence moves. T is fitted as
log T (so it stays positive) with L-BFGS in fp64.

Honesty: `*_after` fits T on dev and scores on the same dev set, which is optimistic (T has seen the
labels it is scored on). `*_after_crossfit` is the 2-fold cross-fitted estimate: split dev in two at
random, fit T on one half and score the other, swap, and pool the held-out predictions. With one
parameter the optimism is usually small, but the cross-fitted number is the one to report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vegalm.errors import VegaError


def _as_arrays(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if x.ndim != 2 or x.shape[1] < 2:
        raise VegaError(f"calibration needs class logits [N, C>=2], got shape {x.shape} (regression has none)")
    if y.shape != (x.shape[0],):
        raise VegaError(f"calibration: {x.shape[0]} logit rows but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise VegaError("calibration: labels must be class ids")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= x.shape[1]):
        raise VegaError(f"calibration: label ids must lie in [0, {x.shape[1]})")
    return x, y


def softmax(logits: Any) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64) / float(temperature)


def nll(logits: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), in fp64."""
    x, y = _as_arrays(logits, labels)
    t = torch.from_numpy(x)
    return float(F.cross_entropy(t, torch.from_numpy(y).long()))


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width confidence bins.

    Confidence = the top probability, accuracy = whether its class is the label; bin b holds confidences
    in ((b-1)/n_bins, b/n_bins] (the first bin also takes 0). 15 bins as in Guo et al. 2017.
    """
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise VegaError(f"ece: probs of shape {p.shape} do not match labels of shape {y.shape}")
    if n_bins < 1:
        raise VegaError(f"ece: n_bins={n_bins}, expected >= 1")
    if p.shape[0] == 0:
        return 0.0
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """argmin_T NLL(logits / T, labels), optimised over log T with L-BFGS (strong Wolfe) in fp64."""
    x, y = _as_arrays(logits, labels)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or t <= 0:
        raise VegaError("temperature scaling did not converge (non-finite temperature)")
    return t


def calibration_report(dev_logits: Any, dev_labels: Any, n_bins: int = 15, seed: int = 0) -> dict[str, Any]:
    """ECE / NLL before and after temperature scaling on dev, plus the 2-fold cross-fitted estimate."""
    x, y = _as_arrays(dev_logits, dev_labels)
    t = fit_temperature(x, y)
    report: dict[str, Any] = {
        "ece_before": ece(softmax(x), y, n_bins),
        "ece_after": ece(softmax(x / t), y, n_bins),
        "nll_before": nll(x, y),
        "nll_after": nll(x / t, y),
        "temperature": t,
    }
    n = len(y)
    if n >= 4:  # each half needs a couple of examples to fit a temperature at all
        perm = np.random.default_rng(seed).permutation(n)
        halves = (perm[: n // 2], perm[n // 2:])
        scaled = np.empty_like(x)
        temps = []
        for fit_idx, score_idx in (halves, halves[::-1]):
            t_half = fit_temperature(x[fit_idx], y[fit_idx])
            temps.append(t_half)
            scaled[score_idx] = x[score_idx] / t_half
        report.update(
            ece_after_crossfit=ece(softmax(scaled), y, n_bins),
            nll_after_crossfit=nll(scaled, y),
            temperatures_crossfit=temps,
        )
    return report

"""Temperature scaling, ECE and NLL (finetune/calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vegalm.errors import VegaError
from vegalm.finetune.calibration import (
    apply_temperature,
    calibration_report,
    ece,
    fit_temperature,
    nll,
    softmax,
)

# Four rows worked by hand: (confidence, correct) = (.95, yes), (.92, no), (.65, yes), (.62, no).
PROBS = np.array([[0.95, 0.05], [0.08, 0.92], [0.35, 0.65], [0.62, 0.38]])
LABELS = np.array([0, 0, 1, 1])


def test_ece_by_hand():
    # 10 bins: (.9, 1] holds .95 and .92 (acc .5, conf .935); (.6, .7] holds .65 and .62 (acc .5, conf .635)
    assert ece(PROBS, LABELS, n_bins=10) == pytest.approx(2 / 4 * 0.435 + 2 / 4 * 0.135)
    # 15 bins (width 1/15): .95 and .92 fall in different bins, .65 and .62 share (0.6, 0.667]
    assert ece(PROBS, LABELS, n_bins=15) == pytest.approx(0.05 / 4 + 0.92 / 4 + 2 / 4 * 0.135)
    assert ece(np.array([[0.3, 0.7]] * 10), np.array([1] * 7 + [0] * 3), n_bins=15) == pytest.approx(0.0)
    assert ece(torch.tensor(PROBS), torch.tensor(LABELS), 10) == pytest.approx(0.285)


def test_nll_by_hand():
    assert nll([[0.0, 0.0]], [0]) == pytest.approx(math.log(2))
    assert nll([[math.log(3), 0.0], [0.0, 0.0]], [0, 1]) == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)


def _overconfident(n=2000, scale=4.0, seed=0):
    """Labels drawn from softmax(z); the model reports scale * z, i.e. is too sure by a factor `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 1.5
    p = softmax(z)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z * scale, y


def test_temperature_scaling_fixes_overconfidence():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert 3.0 < t < 5.3  # the true factor is 4
    rep = calibration_report(logits, y)
    assert rep["temperature"] == pytest.approx(t)
    assert rep["nll_after"] < rep["nll_before"] - 0.3
    assert rep["ece_after"] < rep["ece_before"] / 2
    # the cross-fitted (held-out) estimate is also far better than uncalibrated
    assert rep["nll_after_crossfit"] < rep["nll_before"] - 0.3
    assert rep["ece_after_crossfit"] < rep["ece_before"] / 2
    assert len(rep["temperatures_crossfit"]) == 2 and all(3.0 < x < 5.5 for x in rep["temperatures_crossfit"])
    # argmax (accuracy) is unchanged by a temperature
    assert (apply_temperature(logits, t).argmax(1) == logits.argmax(1)).all()


def test_calibrated_logits_keep_temperature_near_one():
    logits, y = _overconfident(scale=1.0, seed=1)
    assert 0.85 < fit_temperature(logits, y) < 1.15


def test_bad_inputs():
    with pytest.raises(VegaError, match="regression"):
        calibration_report(np.zeros((5, 1)), np.zeros(5))
    with pytest.raises(VegaError, match="labels"):
        nll(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(VegaError, match="label ids"):
        nll(np.zeros((2, 2)), np.array([0, 2]))

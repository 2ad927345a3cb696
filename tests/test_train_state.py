"""Training state between steps: the device-side loss meter and the throughput clock."""

from __future__ import annotations

import math

import pytest
import torch

from ropelm.train_state import LossMeter, ThroughputMeter


def test_loss_meter_averages_between_readings():
    meter = LossMeter(torch.device("cpu"))
    for step, loss in enumerate([2.0, 4.0, 6.0], 1):
        meter.add(torch.tensor(loss), step)
    assert meter.mean() == pytest.approx(4.0)
    meter.add(torch.tensor(1.0), 4)
    assert meter.mean() == pytest.approx(1.0)  # a new window
    assert meter.first_nonfinite_step() is None


def test_loss_meter_remembers_the_first_non_finite_step():
    meter = LossMeter(torch.device("cpu"))
    losses = [1.0, math.nan, math.inf, 2.0]
    for step, loss in enumerate(losses, 1):
        meter.add(torch.tensor(loss), step)
    assert meter.first_nonfinite_step() == 2
    assert meter.mean() == pytest.approx(1.5)  # the finite ones only


def test_throughput_meter_laps():
    meter = ThroughputMeter()
    meter.add(1000)
    seconds, rate = meter.lap()
    assert seconds > 0 and rate == pytest.approx(1000 / seconds)
    assert meter.lap()[1] == 0  # the next lap starts empty


def test_throughput_watch_warns_once_when_the_rate_collapses():
    from ropelm.train_state import ThroughputWatch

    watch = ThroughputWatch(warmup=3, fraction=0.5)
    assert [watch.observe(r) for r in (800.0, 1000.0, 900.0)] == [None, None, None]
    assert watch.observe(600.0) is None  # slower, not collapsed
    warning = watch.observe(300.0)
    assert warning is not None and "from 1,000 to 300 tokens/s" in warning
    assert "--threads" in warning
    assert watch.observe(100.0) is None  # once per run

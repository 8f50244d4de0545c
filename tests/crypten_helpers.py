"""Test helpers: run plain models through the CrypTen backend as a bench does (prepared first)."""

from __future__ import annotations

from relu_opt.backends.crypten.convert import prepare
from relu_opt.backends.crypten.measure import measure


def measure_models(models, x, **kwargs):
    """Return measure() of (name, model) pairs, each prepared for CrypTen on x[:1]."""
    return measure([(name, prepare(m, x[:1])) for name, m in models], x, **kwargs)

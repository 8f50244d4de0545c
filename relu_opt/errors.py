"""Errors relu-opt reports to users: one line each, naming the bad input and the fix."""

from __future__ import annotations


class ReluOptError(Exception):
    """Base class: the CLI prints the message as one line and exits with code 2."""


class ModelSpecError(ReluOptError):
    """MODEL could not be resolved to an nn.Module."""


class WeightsError(ReluOptError):
    """A weights file is missing, unreadable, or does not fit the model."""


class TraceError(ReluOptError):
    """torch.fx could not trace the model."""


class ExportError(ReluOptError):
    """ONNX export, checking or parity failed."""


class InputShapeError(ReluOptError):
    """--input-shape is malformed or missing."""


class DataError(ReluOptError):
    """A dataset is missing or malformed."""


class BudgetError(ReluOptError):
    """A ReLU budget is out of range."""


class BackendError(ReluOptError):
    """A backend's engine is missing, a model cannot run on it, or a party or the dealer failed."""


class ConfigError(ReluOptError, ValueError):
    """An option or input is out of range, unknown, or does not fit the model, found before any work."""


class CorruptFileError(ReluOptError):
    """A file relu-opt reads back (plan, report, checkpoint) is truncated or malformed."""


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """Return the last non-blank line of an exception's message: where torch puts the cause."""
    lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
    return lines[-1] if lines else type(exc).__name__

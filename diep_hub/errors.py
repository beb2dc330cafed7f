"""Exceptions raised by diep_hub.

Every error names the offending value and what would have been accepted, so that a CI log is enough to fix a
recipe without reading the code.
"""

from __future__ import annotations


class DiEPError(Exception):
    """Base class of every error diep_hub raises on purpose."""


class UnsupportedModelError(DiEPError, ValueError):
    """The model is dense, or belongs to a family diep_hub has no adapter for."""


class KeepMapError(DiEPError, ValueError):
    """A keep map (layer index -> expert ids to keep) cannot be applied to the model."""


class ConfigError(DiEPError, ValueError):
    """A configuration value (pruner, recipe, card) is outside what is allowed."""


class CorruptFileError(DiEPError, ValueError):
    """A file diep_hub reads (config, report, recipe, weights, calibration data) is unreadable or malformed."""


class CheckpointLoadError(DiEPError, ValueError):
    """A checkpoint's weights do not match its config (missing, unexpected or mis-shaped tensors, bad ids)."""

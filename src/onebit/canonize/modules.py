"""The modules a canonized model contains: :class:`ThresholdedReLU` and :class:`SignThreshold`,
defined in :mod:`onebit.nn.thresholded` (they are layers) and importable from here as well."""

from onebit.nn.thresholded import SignThreshold, ThresholdedReLU

__all__ = ["ThresholdedReLU", "SignThreshold"]

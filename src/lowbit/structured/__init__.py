"""Structured pruning that really shrinks the model: MLP channels, attention heads (GQA groups kept
consistent), hidden size and whole decoder layers, ranked by calibration activations (Minitron) or block
influence (ShortGPT); the result is a smaller dense model with an updated config that plain transformers
loads.  ``importance`` is the pure math, ``surgery`` cuts the modules, ``measure`` runs the calibration pass,
``prune`` ties them together."""

from lowbit.structured.prune import StructuredPlan, prune_structured

__all__ = ["StructuredPlan", "prune_structured"]

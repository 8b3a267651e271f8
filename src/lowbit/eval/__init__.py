"""Evaluation: perplexity, KL and top-1 agreement against a reference, speed and memory."""

from lowbit.eval.perplexity import EvalResult, evaluate, window_metrics

__all__ = ["EvalResult", "evaluate", "window_metrics"]

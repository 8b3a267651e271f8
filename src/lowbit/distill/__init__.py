"""Knowledge distillation: a teacher (the original model) trains a student (the pruned, factorized or quantized
one, or a smaller model of another depth or width) through its logits, hidden states and attention maps, on
the shared training loop (``lowbit.qat.train``).  ``losses`` is the math, ``trainer`` the wiring."""

from lowbit.distill.trainer import DistillConfig, Distillation, distill

__all__ = ["DistillConfig", "Distillation", "distill"]

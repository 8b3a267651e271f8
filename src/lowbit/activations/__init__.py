"""Activation quantization: quantizers on the inputs of linear layers, and their calibration."""

from lowbit.activations.quantizer import ActQuantizer, check_activation_spec
from lowbit.activations.attach import act_quantizer_of, attach_input_quantizer, detach_input_quantizers, input_quantizers

__all__ = ["ActQuantizer", "check_activation_spec", "attach_input_quantizer", "detach_input_quantizers",
           "input_quantizers", "act_quantizer_of"]

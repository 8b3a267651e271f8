"""Training-time quantized modules: fake-quantized layers with learnable ranges, and the swaps that
put them in a model and take them out again as typed quantized layers."""

from lowbit.qat.fake_linear import FakeQuantLinear, convert_fake_quant, prepare_fake_quant

__all__ = ["FakeQuantLinear", "convert_fake_quant", "prepare_fake_quant"]

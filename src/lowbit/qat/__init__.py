"""Training with quantization: fake-quantized layers with learnable ranges (``fake_linear``), PEQA's
scale-only tuning (``peqa``), QLoRA's frozen NF4 base under peft adapters (``qlora``) and the seeded,
resumable training loop they share (``train``); ``tuning`` runs one of them on token windows and ``merge``
folds trained LoRA adapters into their base."""

from lowbit.qat.fake_linear import FakeQuantLinear, convert_fake_quant, prepare_fake_quant

__all__ = ["FakeQuantLinear", "convert_fake_quant", "prepare_fake_quant"]

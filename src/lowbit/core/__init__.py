"""Pure tensor math for quantization: no nn.Module, no transformers."""

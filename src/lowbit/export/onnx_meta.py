"""Metadata keys of a lowbit ONNX file: the model config, the MatMulNBits accuracy level, the tokenizer files."""

CONFIG_KEY = "lowbit.config"
ACCURACY_KEY = "lowbit.accuracy_level"
TOKENIZER_PREFIX = "lowbit.tokenizer/"

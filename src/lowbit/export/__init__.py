"""Writers (and readers) for the checkpoint formats inference engines load."""

FORMATS = ("compressed-tensors", "fake-quant", "sparse-bitmask")

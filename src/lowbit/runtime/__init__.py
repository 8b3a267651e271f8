"""Running models: text generation and inference measurements (lowbit's runtime and llama.cpp's)."""

"""Model resolution and loading: local HF dirs, hub ids, GGUF files and built-in aliases."""

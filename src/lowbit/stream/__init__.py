"""Streamed, bigger-than-memory compression: the model's skeleton on the meta device, one decoder block at a
time read from the (mmap'd) safetensors, compressed, written and freed (``lowbit.stream.run``)."""

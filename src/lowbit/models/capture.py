"""Capture the inputs of the first decoder block for a calibration set, batch by batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward after block 0's inputs are seen."""


@dataclass
class BlockInputs:
    """Per-batch hidden states entering a block, and the keyword arguments the model passed it."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out.pop("past_key_values", None)
    out.pop("past_key_value", None)
    out["use_cache"] = False
    return out


@torch.no_grad()
def forward_until_stop(model: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    """Run ``model`` on ``calib`` in batches; a hook raising ``_Stop`` ends each batch's forward early."""
    device = next(model.parameters()).device
    for batch in calib.split(batch_size):
        try:
            model(input_ids=batch.to(device), use_cache=False)
        except _Stop:
            pass


def capture_block_inputs(
    model: torch.nn.Module, first_block: torch.nn.Module, calib: torch.Tensor, batch_size: int, store: Any = None
) -> BlockInputs:
    """Run the model's embedding stage on ``calib`` (n, seqlen) and keep what reaches ``first_block`` (in
    ``store`` when given: anything with ``append``, e.g. batches spilled to disk)."""
    hidden: Any = [] if store is None else store
    kwargs: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append(_clean_kwargs(kw))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_until_stop(model, calib, batch_size)
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states returned by a decoder block (a tensor or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for every batch of ``inputs``, as new ``BlockInputs`` (inputs untouched)."""
    return BlockInputs([block_output(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)], inputs.kwargs)

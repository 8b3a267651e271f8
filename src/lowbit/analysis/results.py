"""Result files of sweeps, sensitivity runs and analyses: one JSON per kind in a results directory,
written atomically and stamped with the model they were measured on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.atomic import write_text_atomic
from lowbit.errors import LowbitError
from lowbit.outputs import RESULT_KINDS as KINDS, is_results_dir, results_path

if TYPE_CHECKING:
    import torch

__all__ = ["KINDS", "check_same_model", "is_results_dir", "model_identity", "read_results", "results_path",
           "write_results"]


def model_identity(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """``{"name", "fingerprint", "params"}``: the fingerprint hashes the architecture config and a
    sample of the first and last weights, so a results directory can tell two models apart."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                "num_attention_heads", "num_key_value_heads")
        h.update(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]) if params else ():
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return {"name": name, "fingerprint": h.hexdigest()[:16], "params": sum(p.numel() for p in params)}


def read_results(directory: str | Path, kind: str) -> dict[str, Any] | None:
    """The ``kind`` results stored in ``directory``, or None when there are none."""
    path = results_path(directory, kind)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc.msg}); delete it to start over") from None


def write_results(directory: str | Path, kind: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as the ``kind`` results of ``directory`` (atomically)."""
    return write_text_atomic(results_path(directory, kind), json.dumps(data, indent=1) + "\n")


def check_same_model(stored: dict[str, Any], identity: dict[str, Any], where: str | Path) -> None:
    """LowbitError when results in ``where`` were measured on another model than ``identity``."""
    have = stored.get("model", {})
    if have.get("fingerprint") != identity["fingerprint"]:
        raise LowbitError(f"{where} holds results of model {have.get('name')!r} (fingerprint {have.get('fingerprint')}), "
                          f"not of {identity['name']!r} (fingerprint {identity['fingerprint']}): use another "
                          "results directory")

"""Plain JSON values from the records methods and reports carry (dataclasses, tensors, tuples, paths)."""

from __future__ import annotations

import dataclasses
from pathlib import PurePath
from typing import Any

import torch


def to_jsonable(value: Any) -> Any:
    """``value`` as nested dicts / lists / str / int / float / bool / None, so ``json.dumps`` never fails.

    Dataclasses become dicts, tensors lists (a single element: a number), tuples and sets lists,
    paths and dtypes strings; non-finite floats stay floats (``json`` writes them as NaN/Infinity).
    Anything else unknown becomes its ``str``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.item() if value.numel() == 1 else value.detach().cpu().tolist())
    if isinstance(value, (PurePath, torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return to_jsonable(value.tolist())
    return str(value)


"""``lowbit_activations.json``: input quantizers, online input rotations and run-time output
permutations (RPTQ's norm reorder) saved beside a fake-quant checkpoint and put back on load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.activations.attach import attach_input_quantizer, input_quantizers
from lowbit.activations.quantizer import (
    ActQuantizer,
    ClusterActQuantizer,
    OutlierActQuantizer,
    PairActQuantizer,
    SplitActQuantizer,
)
from lowbit.errors import LowbitError
from lowbit.rotation.online import attach_input_rotation, input_rotations
from lowbit.rotation.permutation import attach_output_permutation, output_permutations
from lowbit.spec import QuantSpec, SpecError

ACTIVATIONS_FILE = "lowbit_activations.json"


def activations_json(model: torch.nn.Module) -> str | None:
    """Every input quantizer of ``model`` (spec and static range) as JSON text; None when there are none."""
    qs = input_quantizers(model)
    rotations = input_rotations(model)
    perms = output_permutations(model)
    if not qs and not rotations and not perms:
        return None
    out: dict[str, dict] = {name: {"rotation": r} for name, r in rotations.items()}
    out.update({name: {"output_permutation": p} for name, p in perms.items()})
    for name, q in qs.items():
        entry = out.setdefault(name, {})
        entry["spec"] = q.spec.to_dict()
        if isinstance(q, OutlierActQuantizer):
            entry["outlier_threshold"] = q.threshold
        if isinstance(q, SplitActQuantizer):
            entry["outlier_spec"] = q.outlier_spec.to_dict()
            entry["outlier_columns"] = torch.nonzero(q.outlier_mask).flatten().tolist()
            entry["width"] = q.outlier_mask.numel()
        if isinstance(q, PairActQuantizer):
            entry["outlier_victim_pairs"] = True
        if isinstance(q, ClusterActQuantizer):
            entry["clusters"] = q.clusters.tolist()
            if q.xmax is not None:
                entry["cluster_ranges"] = [q.xmin.tolist(), q.xmax.tolist()]
        elif q.xmax is not None:
            entry["range"] = [float(q.xmin), float(q.xmax)]
        if q.shift is not None:
            entry["shift"] = q.shift.tolist()
    return json.dumps(out, indent=1)


def attach_activations(model: torch.nn.Module, directory: str | Path) -> int:
    """Put back the input quantizers listed in ``directory/lowbit_activations.json``; returns the count."""
    path = Path(directory) / ACTIVATIONS_FILE
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
        for name, entry in data.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise LowbitError(f"{path}: layer {name} is not in the model") from None
            if "rotation" in entry:  # the saved weights are already rotated: only the run-time half
                attach_input_rotation(layer, int(entry["rotation"]["seed"]), fold=False)
            if "output_permutation" in entry:
                perm = entry["output_permutation"]
                attach_output_permutation(layer, torch.tensor(perm), len(perm))
            if "spec" not in entry:
                continue
            spec = QuantSpec.from_dict(entry["spec"])
            if "outlier_threshold" in entry:
                q: ActQuantizer = OutlierActQuantizer(spec, float(entry["outlier_threshold"]))
            elif "outlier_spec" in entry:
                q = SplitActQuantizer(spec, QuantSpec.from_dict(entry["outlier_spec"]),
                                      torch.tensor(entry["outlier_columns"]), int(entry["width"]))
            elif entry.get("outlier_victim_pairs"):
                q = PairActQuantizer(spec)
            elif "clusters" in entry:
                q = ClusterActQuantizer(spec, torch.tensor(entry["clusters"]))
            else:
                q = ActQuantizer(spec)
            if "shift" in entry:
                q.shift = torch.tensor(entry["shift"], dtype=torch.float32)
            if "range" in entry:
                q.load_range(torch.tensor(entry["range"][0]), torch.tensor(entry["range"][1]))
            elif "cluster_ranges" in entry:
                q.load_range(torch.tensor(entry["cluster_ranges"][0]), torch.tensor(entry["cluster_ranges"][1]))
            elif not q.spec.dynamic:
                raise LowbitError(f"{path}: {name} has a static activation spec but no range")
            attach_input_quantizer(layer, q)
    except (ValueError, KeyError, TypeError, SpecError) as e:
        raise LowbitError(f"{path} is not a valid lowbit activations file: {e}") from None
    return len(data)

"""``GraphBuilder``: a small helper for writing ONNX graphs node by node with unique names."""

from __future__ import annotations

from typing import Any

import numpy as np

OPSET = 21  # blocked (per-group) QuantizeLinear / DequantizeLinear and INT4 tensors
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    """Nodes, initializers, inputs and outputs of one graph; every value name is made unique."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.initializer_bytes = 0

    def name(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, inputs: list[str], name: str | None = None, domain: str = "", n_out: int = 1,
           **attrs: Any) -> Any:
        """Add one node; returns its output name (a list of names when ``n_out > 1``)."""
        outs = [self.name(name or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=self.name(f"n_{outs[0]}"), domain=domain,
                                                **attrs))
        return outs if n_out > 1 else outs[0]

    def initializer(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.initializer_bytes += array.nbytes
        return name

    def raw_initializer(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        """An initializer from raw bytes (e.g. packed INT4)."""
        name = self.name(name)
        self.initializers.append(self.helper.make_tensor(name, data_type, dims, raw, raw=True))
        self.initializer_bytes += len(raw)
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A small constant initializer, shared between uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer("const", arr)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: list[Any]) -> str:
        self.inputs.append(self.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list[Any]) -> None:
        """Expose ``value`` as graph output ``name``."""
        self.nodes.append(self.helper.make_node("Identity", [value], [name], name=self.name(f"n_{name}")))
        self.outputs.append(self.helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, metadata: dict[str, str]) -> Any:
        h = self.helper
        graph = h.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [h.make_opsetid("", OPSET), h.make_opsetid(MS_DOMAIN, 1)]
        model = h.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="lowbit")
        h.set_model_props(model, metadata)
        return model

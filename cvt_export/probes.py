"""Probe points: where each block's output lives in an exported graph, found by value.

Names the exporter gives intermediate tensors are not a contract, so they are not guessed:
at export time the FP32 file is run once with every float tensor exposed, and each block's
output (read from the PyTorch reference with forward hooks) is matched to the graph tensor
holding the same values. The FP16 and INT8 files derive from that file and keep those tensor
names, so backends can expose the same points on any precision and the harness can say where
along the network a fidelity loss starts (stage and block), not only that it exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch

from cvt_export.runtime import ort_session
from cvt_ref.model import CvT, Stage

MATCH_TOLERANCE = 1e-4  # relative to the reference tensor's largest magnitude


def probe_key(stage: int, block: int) -> str:
    return f"stage {stage} block {block}"


def reference_probes(model: CvT, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every block's output [B, tokens, C] from the PyTorch model, in network order."""
    found: dict[str, np.ndarray] = {}
    hooks = []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(cast(Stage, stage).blocks):
            def keep(_m: Any, _i: Any, out: torch.Tensor, key: str = probe_key(s, b)) -> None:
                found[key] = out.detach().float().numpy()
            hooks.append(block.register_forward_hook(keep))
    try:
        with torch.inference_mode():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return found


def locate(onnx_path: Path, model: CvT, x: np.ndarray) -> dict[str, str]:
    """probe key -> graph tensor name, for every block output found in the file."""
    proto = onnx.load(str(onnx_path))
    floats = [vi.name for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info
              if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    proto = with_outputs(proto, floats)
    session = ort_session(proto.SerializeToString(), optimization="none")  # keep every tensor as named
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {session.get_inputs()[0].name: x}), strict=True))
    order = {n: i for i, node in enumerate(proto.graph.node) for n in node.output}
    located: dict[str, str] = {}
    for key, ref in reference_probes(model, x).items():
        scale = float(np.abs(ref).max()) or 1.0
        candidates = [n for n, v in values.items() if v.shape == ref.shape
                      and float(np.abs(v - ref).max()) <= MATCH_TOLERANCE * scale]
        if candidates:
            located[key] = min(candidates, key=lambda n: order.get(n, len(order)))
    return located


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the graph that also outputs the named tensors (typed by shape inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    types = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(out).graph.value_info}
    missing = [n for n in names if n not in types]
    if missing:
        raise KeyError(f"tensors not in the graph: {', '.join(missing[:3])}")
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(types[n] for n in names if n not in present)
    return out


def node_blocks(proto: onnx.ModelProto, located: Mapping[str, str]) -> dict[str, str]:
    """Node name -> the probe key ("stage S block B") of the block that computes it: the nodes a
    block's output depends on and no earlier block's output does, in the order of `located`.
    Nodes after the last block (the head) are not in the map."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    owner: dict[str, str] = {}
    for key, tensor in located.items():
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in owner:
                continue
            owner[node.name] = key
            stack.extend(node.input)
    return owner

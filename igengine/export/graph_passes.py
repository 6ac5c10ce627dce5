"""Rewrites applied to the exported ONNX graph, and the report of which operators run in low precision.

All functions work on a ``ModelProto`` loaded *without* its external data (only the structure), so
they cost the same for a tiny model and for XL.

Precision policy of a bf16/fp16 graph (the torch model's, ``igengine.models.lowp``, plus one step):
  low precision: the attention and MLP sub-graphs of every block: the qkv / proj / fc / SwiGLU
      matmuls, the Q K^T and P V batched matmuls, GELU / SiLU, and the reshapes between them;
  fp32: the patch, time and label embeddings; every normalisation (LayerNorm, RMSNorm, qk-norm,
      whose mean/variance statistics would overflow or lose the mean in fp16); the adaLN modulation
      (a matmul whose output multiplies every activation: its error would scale the whole block);
      RoPE; the gated residual stream; both output heads; and, added here, every Softmax: its input
      is cast to fp32 and its output back, so the exp-sum of a row is accumulated in fp32, as fused
      attention kernels do. Graph outputs are always fp32.
"""

from __future__ import annotations

import ast
import collections
import re

import onnx
from onnx import TensorProto, helper

LOW_PRECISION = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def value_dtypes(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every named value, from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def node_module(node: onnx.NodeProto) -> str:
    """The torch module a node was exported from (e.g. ``blocks.3.attn.qkv``), '' when unknown."""
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate


def softmax_in_fp32(proto: onnx.ModelProto) -> int:
    """Wrap every fp16/bf16 Softmax as Cast(fp32) -> Softmax -> Cast(back). Returns how many were wrapped."""
    types = value_dtypes(proto)
    graph = proto.graph
    taken = {v for n in graph.node for v in [*n.input, *n.output, n.name]} | {i.name for i in graph.initializer}
    nodes, wrapped = [], 0
    for node in graph.node:
        dtype = types.get(node.input[0]) if node.op_type == "Softmax" else None
        if dtype not in LOW_PRECISION:
            nodes.append(node)
            continue
        src, dst = node.input[0], node.output[0]
        src32, dst32 = _unique(f"{src}_fp32", taken), _unique(f"{dst}_fp32", taken)
        cast_in = helper.make_node("Cast", [src], [src32], name=_unique(f"{node.name}_cast_fp32", taken),
                                   to=TensorProto.FLOAT)
        cast_out = helper.make_node("Cast", [dst32], [dst], name=_unique(f"{node.name}_cast_back", taken), to=dtype)
        for new in (cast_in, cast_out):
            new.metadata_props.extend(node.metadata_props)
        node.input[0], node.output[0] = src32, dst32
        nodes += [cast_in, node, cast_out]
        wrapped += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return wrapped


_EINSUM_TERM = re.compile(r"^[a-zA-Z]+$")


def einsum_permutations_to_transpose(proto: onnx.ModelProto) -> int:
    """Replace single-input Einsums that only permute axes (e.g. unpatchify's ``nhwpqc->nchpwq``) by Transpose.

    Transpose is supported by every runtime and is what the Einsum computes; general Einsum support
    differs between ONNX Runtime and TensorRT versions. Returns how many were replaced.
    """
    replaced = 0
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "Einsum" or len(node.input) != 1:
            continue
        eq = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "equation")
        eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
        if "->" not in eq:
            continue
        lhs, rhs = eq.split("->")
        if not (_EINSUM_TERM.match(lhs) and _EINSUM_TERM.match(rhs)) or sorted(lhs) != sorted(rhs) or len(set(lhs)) != len(lhs):
            continue
        new = helper.make_node("Transpose", list(node.input), list(node.output), name=node.name,
                               perm=[lhs.index(c) for c in rhs])
        new.metadata_props.extend(node.metadata_props)
        proto.graph.node[i].CopyFrom(new)
        replaced += 1
    return replaced


def strip_debug_metadata(proto: onnx.ModelProto, keep: tuple[str, ...] = (SCOPE_KEY,)) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with absolute source paths, FX names).

    Keeps the module scopes (used by ``precision_report``); the graph bytes then no longer depend
    on where the igengine checkout lives, so the same checkpoint gives the same graph digest.
    """
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key in keep]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    for vi in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        del vi.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]


def _module_pattern(module: str) -> str:
    return re.sub(r"^blocks\.\d+", "blocks.*", module) if module else "(graph)"


def precision_report(proto: onnx.ModelProto) -> dict:
    """Which operators produce low-precision values and which produce fp32, by op type and by module.

    Returns ``{"low_precision": {op: count}, "fp32": {op: count},
    "low_precision_modules": [module patterns], "fp32_modules": [module patterns]}``; module patterns
    use ``blocks.*`` for every block. Operators with integer outputs (shapes, labels) are left out.
    """
    types = value_dtypes(proto)
    low, full = collections.Counter(), collections.Counter()
    low_mods, full_mods = set(), set()
    for node in proto.graph.node:
        dtype = types.get(node.output[0]) if node.output else None
        module = _module_pattern(node_module(node))
        if dtype in LOW_PRECISION:
            low[node.op_type] += 1
            low_mods.add(module)
        elif dtype == TensorProto.FLOAT:
            full[node.op_type] += 1
            full_mods.add(module)
    return {
        "low_precision": dict(sorted(low.items())),
        "fp32": dict(sorted(full.items())),
        "low_precision_modules": sorted(low_mods),
        "fp32_modules": sorted(full_mods),
    }

"""The ONNX Runtime backend: runs an exported graph (``igengine.export``) on the CPU or CUDA provider.

Provider choice: for a CUDA device the session asks for ``CUDAExecutionProvider`` then
``CPUExecutionProvider``; for a CPU device only the CPU provider. What the session actually got is
read from ``session.get_providers()`` after it is created (``get_available_providers()`` only says
what the wheel was built with, not whether a GPU and its libraries load). With the CUDA provider
active, torch CUDA tensors are bound by pointer through IO binding (no host copies); otherwise inputs
go through host memory and outputs come back on the device of ``x``.

Notes on the CPU provider: it has no bf16 MatMul kernel, so bf16 graphs are refused with a clear
error; for fp16 graphs it inserts Casts and computes fp16 nodes it has no kernel for in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from igengine.backends.base import check_inputs, output_pair
from igengine.config import ModelConfig, Precision
from igengine.errors import BackendError, BackendUnavailable
from igengine.export.contract import INPUT_NAMES, OUTPUT_NAMES, GraphRecord

INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA), or pip install 'igengine[onnx]'"


def import_onnxruntime():
    """The onnxruntime module, or BackendUnavailable naming what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(f"the onnxruntime backend needs ONNX Runtime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def cpu_bf16_refusal(graph: Path | str | None = None) -> str:
    """Why a bf16 graph cannot run on the CPU provider, and what to do instead."""
    what = f"the bf16 graph {graph}" if graph is not None else "a bf16 graph"
    return (f"ONNX Runtime's CPU provider cannot run {what} (no bf16 MatMul kernel): "
            "use `precision` fp16 or fp32, or the CUDA provider (onnxruntime-gpu on a `device` cuda)")


def cpu_provider_only(ort, device: str | torch.device) -> bool:
    """Whether a session for ``device`` can only get the CPU provider (a CPU device, or a wheel without CUDA)."""
    return torch.device(device).type != "cuda" or "CUDAExecutionProvider" not in ort.get_available_providers()


class OnnxRuntimeBackend:
    """Backend over an ONNX Runtime session of one exported graph.

    ``record`` is the graph's own record (already checked against the run by the caller).
    ``max_batch`` (default: the graph's recorded max_batch) is the most rows per call: the sampler's
    network (``backends.network``) splits larger calls and a direct call above it raises BackendError.
    ``precision`` is the run precision this backend serves (default: the graph's; ``reference`` runs
    use the fp32 graph).
    """

    name = "onnxruntime"

    def __init__(self, graph: Path, record: GraphRecord, config: ModelConfig, device: str | torch.device = "cpu",
                 max_batch: int | None = None, threads: int = 0, precision: Precision | str | None = None):
        ort = import_onnxruntime()
        self.graph = Path(graph)
        self.record = record
        self.config = config
        self.graph_precision = record.export.precision
        self.precision = Precision(precision) if precision is not None else self.graph_precision
        self.max_batch: int | None = max_batch or record.export.max_batch
        requested = torch.device(device)
        wanted = ["CPUExecutionProvider"]
        if requested.type == "cuda":
            wanted.insert(0, ("CUDAExecutionProvider", {"device_id": requested.index or 0}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: the CUDA provider's fall-back warning is reported below
        try:
            self.session = ort.InferenceSession(str(self.graph), sess_options=options, providers=wanted)
        except Exception as e:  # ORT raises its own exception types (NotImplemented, Fail, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.graph_precision == Precision.BF16 and "NOT_IMPLEMENTED" in first:
                raise BackendUnavailable(cpu_bf16_refusal(self.graph)) from None
            raise BackendError(f"ONNX Runtime cannot load {self.graph}: {first}") from None
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.device = requested if self.on_cuda else torch.device("cpu")
        self._ort = ort

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N,C,H,W], t [N], y [N] int64) -> (v_final, v_inter) [N,C,H,W] float32 on x's device."""
        n = check_inputs(x, t, y, self.config.latent_shape, self.max_batch, "graph")
        if self.on_cuda and x.is_cuda:
            return self._run_bound(n, x, t, y)
        feeds = {
            "x": x.detach().to("cpu", torch.float32).contiguous().numpy(),
            "t": t.detach().to("cpu", torch.float32).contiguous().numpy(),
            "y": y.detach().to("cpu", torch.int64).contiguous().numpy(),
        }
        v_final, v_inter = self.session.run(list(OUTPUT_NAMES), feeds)
        return torch.from_numpy(v_final).to(x.device), torch.from_numpy(v_inter).to(x.device)

    def _run_bound(self, n: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CUDA provider: bind the torch tensors' device memory directly (IO binding)."""
        dev = x.device
        inputs = {"x": x.to(dev, torch.float32).contiguous(), "t": t.to(dev, torch.float32).contiguous(),
                  "y": y.to(dev, torch.int64).contiguous()}
        outputs = output_pair(n, self.config.latent_shape, dev)
        binding = self.session.io_binding()
        np_types = {torch.float32: np.float32, torch.int64: np.int64}
        for name, tensor in [*inputs.items(), *outputs.items()]:
            bind = binding.bind_input if name in INPUT_NAMES else binding.bind_output
            bind(name, "cuda", dev.index or 0, np_types[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        # ORT runs on its own CUDA stream: the inputs must be ready before it starts.
        torch.cuda.current_stream(dev).synchronize()
        self.session.run_with_iobinding(binding)
        return outputs["v_final"], outputs["v_inter"]

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "providers": self.providers,
            "graph": str(self.graph),
            "graph_precision": self.graph_precision.value,
            "opset": self.record.export.opset,
            "max_batch": self.max_batch,
            "onnxruntime": self._ort.__version__,
            "exporter": self.record.exporter,
        }

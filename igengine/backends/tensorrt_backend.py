"""The TensorRT backend: runs an engine built by ``igengine.export.tensorrt`` on the sampler's CUDA stream.

Each call binds the device memory of torch CUDA tensors by pointer (``set_tensor_address``), sets the
input shapes of the optimization profile tuned closest to the call's row count
(``set_input_shape``), and enqueues the engine with ``execute_async_v3`` on
``torch.cuda.current_stream()``: no host copies, no synchronisation, ordered with the sampler's own
kernels. One execution context serves every profile (switching profile only when a call needs
another), so activation memory is allocated once.

Written against the TensorRT 10.x / 11.x Python API; not run in igengine's CI (no GPU there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from igengine.backends.base import check_inputs, output_pair
from igengine.config import ModelConfig, Precision
from igengine.errors import BackendError
from igengine.export.contract import INPUT_NAMES, OUTPUT_NAMES, GraphRecord
from igengine.export.tensorrt import EngineKey, import_tensorrt, require_gpu, select_profile


class TensorRTBackend:
    """Backend over one deserialized TensorRT engine (``key`` is the key it was built and cached under)."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, key: EngineKey, record: GraphRecord, config: ModelConfig,
                 device: str | torch.device | None = None, precision: Precision | str | None = None):
        trt = import_tensorrt()
        self.precision = Precision(precision) if precision is not None else record.export.precision
        self._trt = trt
        self.device = require_gpu(device)
        self.engine_path = Path(engine_path)
        self.key = key
        self.record = record
        self.config = config
        self.profiles = key.batch_profiles
        self.max_batch: int | None = max(p.max for p in self.profiles)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise BackendError(f"TensorRT {trt.__version__} cannot deserialize {self.engine_path}; delete it to rebuild")
            self._check_io()
            if self.engine.num_optimization_profiles != len(self.profiles):
                raise BackendError(f"{self.engine_path} has {self.engine.num_optimization_profiles} optimization "
                                   f"profiles, its key records {len(self.profiles)}; delete it to rebuild")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise BackendError(f"TensorRT could not create an execution context for {self.engine_path} (GPU memory?)")
        self._profile = 0

    def _check_io(self) -> None:
        trt = self._trt
        want = {"x": trt.float32, "t": trt.float32, "y": trt.int64, "v_final": trt.float32, "v_inter": trt.float32}
        got = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            got[name] = self.engine.get_tensor_dtype(name)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input != (name in INPUT_NAMES):
                raise BackendError(f"{self.engine_path}: tensor {name} has the wrong direction for the graph contract")
        if got != want:
            raise BackendError(f"{self.engine_path} does not follow the graph contract: tensors {got}, expected {want}")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N,C,H,W], t [N], y [N] int64) CUDA tensors -> (v_final, v_inter) [N,C,H,W] float32 on this device."""
        n = check_inputs(x, t, y, self.config.latent_shape, self.max_batch, "engine")
        stream = torch.cuda.current_stream(self.device)
        inputs = {"x": x.to(self.device, torch.float32).contiguous(), "t": t.to(self.device, torch.float32).contiguous(),
                  "y": y.to(self.device, torch.int64).contiguous()}
        outputs = output_pair(n, self.config.latent_shape, self.device)
        profile = select_profile(self.profiles, n)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(f"TensorRT refused shape {list(tensor.shape)} for input {name}")
        for name, tensor in [*inputs.items(), *outputs.items()]:
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT failed to enqueue {self.engine_path}")
        # The caching allocator keeps `inputs` valid for kernels queued on this stream after they are freed.
        return outputs["v_final"], outputs["v_inter"]

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "engine": str(self.engine_path),
            "engine_key": self.key.to_dict(),
            "graph_precision": self.record.export.precision.value,
            "max_batch": self.max_batch,
            "tensorrt": self._trt.__version__,
        }

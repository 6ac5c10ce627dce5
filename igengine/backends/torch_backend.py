"""The reference backend: the PyTorch IG DiT of ``igengine.models`` in eager mode.

On the CPU, at every precision but ``reference``, its fp32 and bf16 linear layers take the fastest correct
route this CPU has, SiT's fc1 -> GELU as one call (``cpu_linear``: oneDNN where the CPU has AVX-512, the fp32
GEMM for bf16 where oneDNN has no bf16); ``reference`` keeps ``nn.Linear`` (MKL), the official code's kernels. Every CPU backend keeps
freed memory for the next call (``cpu_malloc``: no page faults per forward; results unchanged).
"""

from __future__ import annotations

import torch

from igengine.backends.cpu_linear import route_linears, routed_count
from igengine.backends.cpu_malloc import keep_freed_memory
from igengine.config import ModelConfig, Precision
from igengine.models import IGDiT, apply_precision
from igengine.precision import numerics, policy


class TorchBackend:
    """Eager PyTorch at ``precision`` on ``device``; TF32 and other global flags only during a call."""

    name = "torch"
    # No host synchronisation and only call-local allocations: the sampler may replay calls from a
    # CUDA graph (igengine.sampling.captured).
    capturable = True

    def __init__(self, model: IGDiT, precision: Precision = Precision.REFERENCE, device: str | torch.device = "cpu",
                 max_batch: int | None = None):
        self.precision = Precision(precision)
        self.device = torch.device(device)
        self.config: ModelConfig = model.config
        self.max_batch = max_batch
        self.policy = policy(self.precision, self.config.family)
        self.model = apply_precision(model.eval().requires_grad_(False), self.precision).to(self.device)
        fast_cpu = self.device.type == "cpu" and self.precision != Precision.REFERENCE
        self.cpu_linear = route_linears(self.model, fast=fast_cpu)  # dtype -> route; all aten for reference
        self.routed_linears = routed_count(self.model)
        self.cpu_malloc = keep_freed_memory() if self.device.type == "cpu" else None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with numerics(self.policy):
            v_final, v_inter = self.model(x.to(self.device, torch.float32), t.to(self.device, torch.float32),
                                          y.to(self.device))
        return v_final.float(), v_inter.float()

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "network_dtype": str(self.policy.network_dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "tf32": bool(self.device.type == "cuda" and self.policy.allow_tf32),
            **({"cpu_linear": self.cpu_linear, "cpu_malloc": self.cpu_malloc}
               if self.device.type == "cpu" else {}),
        }

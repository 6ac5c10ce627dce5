"""Warnings for choices that run but make no sense on this machine, each one line (issue 19, item 4).

A choice that is slow or meaningless here is warned about, not refused: the result is still right, and a
script shared between a GPU machine and a CPU one should not break. What each warning says:

  * `precision` tf32 on the CPU: TF32 is a mode of NVIDIA GPUs' matmuls (and cuDNN's convolutions); the
    policy switches only those CUDA flags, so on the CPU a tf32 run computes exactly what an fp32 run
    computes (the same network, kernels and state; its samples.npz is byte-identical, tested). Not a
    refusal: nothing is lost but the label, and the manifest keeps `precision: tf32`, as asked.
  * `precision` fp16 on a CPU without fp16 matmul units (``cpu_native_low_precision(torch.float16)``:
    AVX512-FP16 or AMX-FP16), with torch's kernels (the torch and compiled backends; ONNX Runtime's CPU
    provider has its own, not measured here): its fp16 GEMMs take a generic path, several times slower than `reference`
    (the digits model, 32 samples of 20 steps on one thread of the project's AVX-512 BF16 EPYC, which has
    no AVX512-FP16: fp16 5.4 samples/s, reference 28.8, fp32 30.4, bf16 40.6). The warning names the
    precision to use instead: bf16 where oneDNN runs it on this CPU, else fp32.
  * more CPU threads than this process may use (``igengine.jobs.threads.oversubscription``).

``choice_warnings`` gives the lines (without a prefix); the CLI prints each as ``igengine: warning: ...``
and the manifest keeps them under ``warnings``; ``igengine.load`` raises them as RuntimeWarnings.
"""

from __future__ import annotations

import torch

from igengine.backends.cpu_linear import ROUTE_ONEDNN, cpu_native_low_precision, linear_route
from igengine.config import BackendName, Precision
from igengine.jobs.threads import ThreadChoice, oversubscription


def precision_warnings(precision: Precision | str, device: torch.device | str,
                       backend: BackendName | str = BackendName.TORCH) -> list[str]:
    """The warnings of running ``precision`` on ``device`` (none on CUDA: every precision means something there).
    The fp16 one is about torch's CPU kernels (the torch and compiled backends): ONNX Runtime's CPU provider has
    kernels of its own, not measured here."""
    precision, device, backend = Precision(precision), torch.device(device), BackendName(backend)
    if device.type != "cpu":
        return []
    if precision == Precision.TF32:
        return ["`precision` tf32 on the CPU computes exactly what fp32 computes: TF32 is a matmul mode of "
                "NVIDIA GPUs, which a CPU does not have (samples are byte-identical to an fp32 run's); "
                "use `precision` fp32 here"]
    if (precision == Precision.FP16 and backend in (BackendName.TORCH, BackendName.COMPILED)
            and not cpu_native_low_precision(torch.float16)):
        instead = ("bf16 (oneDNN runs bf16 on this CPU) or fp32" if linear_route(torch.bfloat16) == ROUTE_ONEDNN
                   else "fp32")
        return ["`precision` fp16 is slow on this CPU: it has no fp16 matmul units (AVX512-FP16 or AMX-FP16), so "
                "its fp16 matmuls take a generic path, several times slower than `reference`; use `precision` "
                f"{instead}"]
    return []


def choice_warnings(precision: Precision | str, device: torch.device | str,
                    backend: BackendName | str = BackendName.TORCH, threads: ThreadChoice | None = None) -> list[str]:
    """Every warning of a run's resolved choices: its precision on its device and backend, then its CPU threads."""
    found = precision_warnings(precision, device, backend)
    if threads is not None and (line := oversubscription(threads)) is not None:
        found.append(line)
    return found


__all__ = ["choice_warnings", "precision_warnings"]

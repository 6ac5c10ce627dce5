"""Checked entry points of the kernel libraries for torch tensors: validate, then dispatch.

Every check raises ``KernelInputError`` (a ValueError) naming the argument at fault and what would
fix it; nothing reaches the C side that could make it read or write out of bounds. The CUDA path
enqueues on ``torch.cuda.current_stream(device)`` and never synchronises, so a call can be captured
in a CUDA graph. Non-contiguous tensors are refused (call ``.contiguous()``): the kernels address
dense rows. Negative sample indices are refused when the indices live on the CPU; on a GPU that
check would need a synchronisation, so it is the caller's (the Sampler checks them once per run).

Two forms of the fused step:
  * ``fused_step(params, ...)``: the scalars by value (one ``StepParams``), checked against the
    buffers on the host;
  * ``fused_step_indexed(table, counter, ...)``: the scalars of a whole plan in a table on the
    tensors' device (``pack_table``), launch ``table[counter]`` then ``counter += 1``, both on the
    device. Its checks read only shapes, dtypes and devices (never a tensor's values), so it never
    waits for the GPU; the scalars are checked by ``pack_table`` and again where the kernel reads them.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import numpy as np
import torch

from igengine.kernels import abi
from igengine.kernels.library import KernelLibrary, library_for
from igengine.noise import check_indices, check_seed, check_stream

_VDTYPES = {torch.float32: abi.DType.F32, torch.bfloat16: abi.DType.BF16, torch.float16: abi.DType.F16}


class KernelInputError(ValueError):
    """A tensor handed to a kernel has the wrong shape, dtype, device or layout."""


class KernelUnavailable(RuntimeError):
    """No kernel library can run on the tensors' device (see igengine.kernels.describe())."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelInputError(msg)


def _check_tensor(name: str, t: torch.Tensor, device: torch.device, dtypes: tuple[torch.dtype, ...],
                  rows: int, e: int) -> None:
    """Raise KernelInputError unless t is a contiguous (rows, ...) tensor of rows * e elements on device.

    The cheap conditions are tested first; messages are formatted only on failure (this runs ~10
    times per launch).
    """
    if (isinstance(t, torch.Tensor) and t.device == device and t.dtype in dtypes and t.is_contiguous()
            and t.dim() >= 1 and t.shape[0] == rows and t.numel() == rows * e):
        return
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.device == device, f"{name} is on {t.device} but x is on {device}: move it with .to('{device}')")
    names = "/".join(str(d).replace("torch.", "") for d in dtypes)
    _need(t.dtype in dtypes, f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected {names}")
    _need(t.is_contiguous(), f"{name} is not contiguous: pass {name}.contiguous()")
    raise KernelInputError(f"{name} has shape {tuple(t.shape)}, expected {rows} rows of {e} elements")


def _check_no_overlap(named: dict[str, torch.Tensor | None], outputs: tuple[str, ...], x_out_may_be_x: bool) -> None:
    spans = {}
    for k, t in named.items():
        if t is not None:
            start = t.data_ptr()
            spans[k] = (start, start + t.numel() * t.element_size())
    for out in outputs:
        if out not in spans:
            continue
        a0, a1 = spans[out]
        for other, (b0, b1) in spans.items():
            if other == out or a1 <= b0 or b1 <= a0 or a0 == a1 or b0 == b1:
                continue
            if x_out_may_be_x and {out, other} == {"x", "x_out"} and (a0, a1) == (b0, b1):
                continue  # in-place update: each element is read before it is written, by the same thread
            raise KernelInputError(f"{out} overlaps {other} in memory: give the kernel separate buffers")


def fused_step(params: abi.StepParams, x: torch.Tensor, v_final: torch.Tensor, v_inter: torch.Tensor | None = None,
               *, indices: torch.Tensor | None = None, k1: torch.Tensor | None = None,
               x_out: torch.Tensor | None = None, k1_out: torch.Tensor | None = None,
               net_out: torch.Tensor | None = None, first_bad: torch.Tensor | None = None,
               library: KernelLibrary | None = None) -> None:
    """One fused guidance + solver-update launch (see csrc/igk_api.h for the maths of each kind).

    params:    per-step scalars (``igengine.sampling.launches.step_params``).
    x:         float32 (N, ...) state at t_cur; E = x.numel() / N elements per row.
    v_final:   float32/bfloat16/float16 (R, ...) network output, R = 2N when params.cfg
               (rows 0..N-1 conditional, N..2N-1 unconditional) else N.
    v_inter:   same dtype and shape as v_final: the intermediate (IG) output. Read only when params.ig.
    indices:   int64 (N,) sample index of each row (the noise contract). Required by the SDE kind.
    k1:        float32 (N, ...) predictor slope. Required by the Heun corrector.
    x_out:     float32 (N, ...) next state (x_pred for the predictor, optional there). May be x itself.
    k1_out:    float32 (N, ...) the predictor's slope. Required by the Heun predictor.
    net_out:   float32 (2N or N, ...) next network input: x_out (x_pred) rows, written twice when
               params.dup_next. Optional.
    first_bad: int64 (N,), set to params.step_index where a row of x_out turns NaN/Inf while < 0. Optional.
    library:   the library to use; default: the one loaded for x.device (``library.library_for``, not
               self-tested: the samplers pass ``igengine.kernels.trusted.library_for``'s); KernelUnavailable if none.
    All tensors on x's device, contiguous, non-overlapping (except x_out is x). Returns nothing.
    """
    _need(isinstance(params, abi.StepParams), "params must be an igengine.kernels.abi.StepParams")
    _need(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    _need(x.dim() >= 1 and x.shape[0] > 0 and x.numel() > 0, f"x must have N >= 1 rows and elements, got {tuple(x.shape)}")
    device = x.device
    n = x.shape[0]
    e = x.numel() // n
    kind = abi.Kind(params.kind)
    rows = 2 * n if params.cfg else n
    _check_tensor("x", x, device, (torch.float32,), n, e)
    _check_tensor("v_final", v_final, device, tuple(_VDTYPES), rows, e)
    if params.ig:
        _need(v_inter is not None, "IG is active at this evaluation (params.ig) but v_inter is None")
        _check_tensor("v_inter", v_inter, device, (v_final.dtype,), rows, e)
    else:
        v_inter = None
    if kind == abi.Kind.SDE:
        _need(indices is not None, "the SDE step draws noise: pass the sample indices (int64, N)")
    if indices is not None:
        _check_tensor("indices", indices, device, (torch.int64,), n, 1)
        _checked(check_indices, indices)
    if kind == abi.Kind.HEUN_CORRECT:
        _need(k1 is not None, "the Heun corrector needs k1 (the predictor's k1_out)")
        _check_tensor("k1", k1, device, (torch.float32,), n, e)
    else:
        k1 = None
    if kind == abi.Kind.HEUN_PREDICT:
        _need(k1_out is not None, "the Heun predictor writes k1_out: pass a float32 (N, ...) buffer")
        _check_tensor("k1_out", k1_out, device, (torch.float32,), n, e)
    else:
        _need(x_out is not None, f"the {kind.name} launch writes x_out: pass a float32 (N, ...) buffer (may be x)")
        k1_out = None
    if x_out is not None:
        _check_tensor("x_out", x_out, device, (torch.float32,), n, e)
    _need(not params.dup_next or net_out is not None, "params.dup_next is set but net_out is None")
    if net_out is not None:
        _check_tensor("net_out", net_out, device, (torch.float32,), 2 * n if params.dup_next else n, e)
    if first_bad is not None:
        _check_tensor("first_bad", first_bad, device, (torch.int64,), n, 1)
    _check_no_overlap(
        {"x": x, "v_final": v_final, "v_inter": v_inter, "k1": k1, "indices": indices, "x_out": x_out,
         "k1_out": k1_out, "net_out": net_out, "first_bad": first_bad},
        outputs=("x_out", "k1_out", "net_out", "first_bad"), x_out_may_be_x=True)

    lib = _library(library, device)
    buffers = abi.StepBuffers(
        x=x.data_ptr(), v_final=v_final.data_ptr(), v_inter=v_inter.data_ptr() if v_inter is not None else None,
        k1_in=k1.data_ptr() if k1 is not None else None,
        indices=indices.data_ptr() if indices is not None else None,
        x_out=x_out.data_ptr() if x_out is not None else None,
        k1_out=k1_out.data_ptr() if k1_out is not None else None,
        net_out=net_out.data_ptr() if net_out is not None else None,
        first_bad=first_bad.data_ptr() if first_bad is not None else None,
        n=n, e=e, v_dtype=int(_VDTYPES[v_final.dtype]), reserved=0)
    _launch_step(lib, params, buffers, device)


PARAMS_BYTES = ctypes.sizeof(abi.StepParams)
_SDE_KINDS = (abi.Kind.SDE, abi.Kind.SDE_LAST)


def _check_params(p: abi.StepParams, name: str) -> None:
    """The host's share of the C side's checks of one launch's scalars (igk_launch_fault)."""
    _need(isinstance(p, abi.StepParams), f"{name} must be an igengine.kernels.abi.StepParams, got {type(p).__name__}")
    _need(p.kind in tuple(abi.Kind), f"{name}.kind = {p.kind} is not a kind ({', '.join(k.name for k in abi.Kind)})")
    _need(p.family in tuple(abi.FamilyCode),
          f"{name}.family = {p.family} is not a family code (0 SiT, 1 LightningDiT, 2 RAEv2)")
    _need((abi.Kind(p.kind) in _SDE_KINDS) == bool(p.drift), f"{name}.drift must be set exactly for the SDE kinds")
    _need(not p.drift or p.family == abi.FamilyCode.SIT, f"{name}: the SDE drift is a SiT-family field")
    if p.family == abi.FamilyCode.RAEV2:
        _need(p.kind == abi.Kind.EULER, f"{name}: a RAEv2 launch is an Euler step, got kind {abi.Kind(p.kind).name}")
        _need(p.t_safe > 0.0, f"{name}.t_safe = {p.t_safe}: RAEv2 divides by max(t, 0.05), which is > 0")


def pack_table(params: Sequence[abi.StepParams], device="cpu") -> torch.Tensor:
    """The launch table of ``fused_step_indexed``: uint8 (L, sizeof(StepParams)) on ``device``.

    Row k holds the bytes of ``params[k]`` (``igengine.sampling.launches.plan_launches`` gives a
    plan's launches in order). Each entry is checked here, on the host, once.
    """
    params = tuple(params)
    _need(len(params) > 0, "the launch table needs at least one StepParams")
    for k, p in enumerate(params):
        _check_params(p, f"params[{k}]")
    raw = bytearray(b"".join(bytes(p) for p in params))
    table = torch.frombuffer(raw, dtype=torch.uint8).reshape(len(params), PARAMS_BYTES).clone()
    return table.to(_resolve(device))


def fused_step_indexed(table: torch.Tensor, counter: torch.Tensor, x: torch.Tensor, v_final: torch.Tensor,
                       v_inter: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                       k1: torch.Tensor | None = None, x_out: torch.Tensor | None = None,
                       net_out: torch.Tensor | None = None, first_bad: torch.Tensor | None = None, *,
                       fault: torch.Tensor | None = None, library: KernelLibrary | None = None) -> None:
    """Launch ``table[counter]`` on buffers that serve every launch of a plan, then ``counter += 1``.

    table:     uint8 (L, sizeof(StepParams)) from ``pack_table``, on x's device.
    counter:   int64 (1,) on x's device: which launch runs; advanced by one after it (on the device).
    x:         float32 (N, ...) state; E = x.numel() / N.
    v_final:   float32/bfloat16/float16 (R, ...) network output, R = N or 2N; it must be 2N exactly
               for the launches whose scalars say CFG (the loop passes each graph its own outputs).
    v_inter:   same dtype and shape as v_final; read by launches with IG.
    indices:   int64 (N,) sample indices; read by SDE launches.
    k1:        float32 (N, ...) the Heun slope: the predictor writes it, the corrector reads it.
    x_out:     float32 (N, ...) next state (may be x); written by every kind but the predictor,
               which leaves x and x_out alone and writes its x_pred only into net_out.
    net_out:   float32 (N or 2N, ...) next network input (rows N..2N-1 too when the launch duplicates).
    first_bad: int64 (N,), set to the launch's step where a row of x_out turns NaN/Inf while < 0.
    fault:     int64 (2,), optional: ``{abi.Fault, counter}`` of the first launch whose scalars did
               not fit these buffers (such a launch writes nothing else). On the CPU twin that
               launch also raises KernelError at once; on CUDA only ``fault`` records it, to be read
               after the loop with the other flags.
    A kind whose buffer is missing is refused the same way. All tensors on x's device, contiguous,
    non-overlapping (except x_out is x). Returns nothing; never synchronises.
    """
    _need(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    _need(x.dim() >= 1 and x.shape[0] > 0 and x.numel() > 0, f"x must have N >= 1 rows and elements, got {tuple(x.shape)}")
    device = x.device
    n = x.shape[0]
    e = x.numel() // n
    _need(isinstance(table, torch.Tensor), f"table must be a torch.Tensor (pack_table), got {type(table).__name__}")
    _need(table.dtype == torch.uint8 and table.dim() == 2 and table.shape[0] >= 1 and table.shape[1] == PARAMS_BYTES,
          f"table must be uint8 (L, {PARAMS_BYTES}) from igengine.kernels.binding.pack_table, got "
          f"{str(table.dtype).replace('torch.', '')} {tuple(table.shape)}")
    _check_tensor("table", table, device, (torch.uint8,), table.shape[0], PARAMS_BYTES)
    _need(table.data_ptr() % 4 == 0, "table is not 4-byte aligned (a view at an odd offset?): pass pack_table's "
                                     "tensor, or table.clone()")
    _check_tensor("counter", counter, device, (torch.int64,), 1, 1)
    _check_tensor("x", x, device, (torch.float32,), n, e)
    _need(isinstance(v_final, torch.Tensor), f"v_final must be a torch.Tensor, got {type(v_final).__name__}")
    rows = v_final.shape[0] if v_final.dim() else 0
    _need(rows in (n, 2 * n), f"v_final has shape {tuple(v_final.shape)}, expected N = {n} rows (no CFG) "
                              f"or 2N = {2 * n} (CFG) of {e} elements")
    _check_tensor("v_final", v_final, device, tuple(_VDTYPES), rows, e)
    if v_inter is not None:
        _check_tensor("v_inter", v_inter, device, (v_final.dtype,), rows, e)
    if indices is not None:
        _check_tensor("indices", indices, device, (torch.int64,), n, 1)
        if device.type == "cpu":
            _checked(check_indices, indices)
    for name, t in (("k1", k1), ("x_out", x_out)):
        if t is not None:
            _check_tensor(name, t, device, (torch.float32,), n, e)
    net_rows = 0
    if net_out is not None:
        _need(isinstance(net_out, torch.Tensor), f"net_out must be a torch.Tensor, got {type(net_out).__name__}")
        net_rows = net_out.shape[0] if net_out.dim() else 0
        _need(net_rows in (n, 2 * n), f"net_out has shape {tuple(net_out.shape)}, expected N = {n} or 2N = {2 * n} "
                                      f"rows of {e} elements")
        _check_tensor("net_out", net_out, device, (torch.float32,), net_rows, e)
    if first_bad is not None:
        _check_tensor("first_bad", first_bad, device, (torch.int64,), n, 1)
    if fault is not None:
        _check_tensor("fault", fault, device, (torch.int64,), 2, 1)
    _check_no_overlap(
        {"table": table, "counter": counter, "x": x, "v_final": v_final, "v_inter": v_inter, "indices": indices,
         "k1": k1, "x_out": x_out, "net_out": net_out, "first_bad": first_bad, "fault": fault},
        outputs=("counter", "k1", "x_out", "net_out", "first_bad", "fault"), x_out_may_be_x=True)

    lib = _library(library, device)
    ptr = _ptr  # None for an absent buffer
    launch_table = abi.StepTable(params=table.data_ptr(), counter=counter.data_ptr(), fault=ptr(fault),
                                 count=table.shape[0], v_rows=rows, net_rows=net_rows)
    buffers = abi.StepBuffers(
        x=x.data_ptr(), v_final=v_final.data_ptr(), v_inter=ptr(v_inter), k1_in=ptr(k1), indices=ptr(indices),
        x_out=ptr(x_out), k1_out=ptr(k1), net_out=ptr(net_out), first_bad=ptr(first_bad), n=n, e=e,
        v_dtype=int(_VDTYPES[v_final.dtype]), reserved=0)
    if device.type == "cuda":
        lib.step_indexed(launch_table, buffers, device=device.index,
                         stream=torch.cuda.current_stream(device).cuda_stream)
    else:
        lib.step_indexed(launch_table, buffers, num_threads=_cpu_threads())


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


@functools.lru_cache(maxsize=1)
def _cpu_threads() -> int:
    """The CPU twin's thread count: torch's, read once per process (not per launch)."""
    return torch.get_num_threads()


def _library(library: KernelLibrary | None, device: torch.device) -> KernelLibrary:
    lib = library if library is not None else library_for(device)
    if lib is None:
        raise KernelUnavailable(f"no kernel library for {device}: see igengine.kernels.describe() "
                                "(build with python -m igengine.kernels.build)")
    want = "cuda" if device.type == "cuda" else "cpu"
    _need(lib.kind == want, f"the {lib.kind} library cannot run on tensors of {device}")
    return lib


def _launch_step(lib: KernelLibrary, params: abi.StepParams, buffers: abi.StepBuffers, device: torch.device) -> None:
    if device.type == "cuda":
        lib.step(params, buffers, device=device.index, stream=torch.cuda.current_stream(device).cuda_stream)
    else:
        lib.step(params, buffers, num_threads=_cpu_threads())


def _resolve(device) -> torch.device:
    """torch.device with an explicit index for CUDA ('cuda' -> 'cuda:<current>')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _checked(check, value):
    """A noise-contract range check (seed, stream, indices) whose ValueError is reported as KernelInputError."""
    try:
        return check(value)
    except ValueError as e:
        raise KernelInputError(str(e)) from None


def _index_tensor(indices, device: torch.device) -> torch.Tensor:
    return _checked(check_indices, indices).to(device).contiguous()


def gaussian(seed: int, indices, stream: int, shape, device="cpu", library: KernelLibrary | None = None) -> torch.Tensor:
    """The noise contract's Gaussians (``igengine.noise.gaussian``) computed by a kernel library.

    Returns float32 (len(indices), *shape) on ``device``; bitwise the reference's values.
    """
    seed, stream = _checked(check_seed, seed), _checked(check_stream, stream)
    device = _resolve(device)
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    idx = _index_tensor(indices, device)
    out = torch.empty((idx.numel(), *shape), dtype=torch.float32, device=device)
    if idx.numel() == 0 or numel == 0:
        return out
    lib = _library(library, device)
    if device.type == "cuda":
        lib.gaussian(seed, stream, idx.data_ptr(), idx.numel(), numel, out.data_ptr(), device=device.index,
                     cuda_stream=torch.cuda.current_stream(device).cuda_stream)
    else:
        lib.gaussian(seed, stream, idx.data_ptr(), idx.numel(), numel, out.data_ptr(),
                     num_threads=_cpu_threads())
    return out


def philox_words(seed: int, indices, stream: int, num_blocks: int, device="cpu",
                 library: KernelLibrary | None = None) -> np.ndarray:
    """Raw Philox words of the contract (``igengine.noise.philox_words``): uint32 (N, num_blocks, 4) on the host."""
    seed, stream = _checked(check_seed, seed), _checked(check_stream, stream)
    device = _resolve(device)
    idx = _index_tensor(indices, device)
    out = torch.empty((idx.numel(), int(num_blocks), 4), dtype=torch.int32, device=device)
    if idx.numel() and num_blocks > 0:
        lib = _library(library, device)
        if device.type == "cuda":
            lib.philox(seed, stream, idx.data_ptr(), idx.numel(), int(num_blocks), out.data_ptr(),
                       device=device.index, cuda_stream=torch.cuda.current_stream(device).cuda_stream)
        else:
            lib.philox(seed, stream, idx.data_ptr(), idx.numel(), int(num_blocks), out.data_ptr())
    return out.cpu().numpy().view(np.uint32)

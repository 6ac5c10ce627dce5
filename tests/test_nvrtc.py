"""The NVRTC build of the CUDA kernels (igengine.kernels.nvrtc, nvrtc_library) and how it is chosen.

Without a GPU (this file's first part): the device code compiles with NVRTC to PTX and to cubins
for sm_80 and sm_90 with every entry point and without FMA contraction; the cache key, cache hits,
corrupt entries and atomic writes; the selection order cmake -> nvrtc -> reference (with stand-ins
for the libraries); missing cuda-python gives one clear reason and the reference path; the host
checks before a launch agree with the C side's (against the CPU twin). Tests that compile skip
with a reason when cuda-python or the NVRTC wheel is absent (pip install 'igengine[nvrtc]').

On a GPU (``-m gpu``, the second part): launch parity of the NVRTC build against the reference
step, the CPU twin and the CMake library, indexed launches, CUDA-graph capture, a launch from a
thread without a current context, the cache across libraries, and a whole run that picks the NVRTC
build when no CMake library exists. They skip with a reason without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from igengine.kernels import abi, library, nvrtc, nvrtc_library, selftest, trusted
from igengine.kernels.abi import KernelError
from igengine.kernels.library import LibraryStatus

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _nvrtc_missing() -> str | None:
    try:
        nvrtc.nvrtc_version()
    except nvrtc.NvrtcUnavailable as exc:
        return f"NVRTC not usable here ({exc})"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=str(_nvrtc_missing()))


@pytest.fixture(autouse=True)
def _fresh_libraries():
    library._reset_for_tests()
    yield
    library._reset_for_tests()


# ---- the sources ---------------------------------------------------------------------------------

def test_the_entry_point_list_matches_the_kernel_source():
    text = (CSRC / nvrtc.MAIN).read_text()
    macro = re.findall(r"^IGK_STEP(?:_INDEXED)?_KERNEL\((\w+),", text, flags=re.M)
    plain = re.findall(r"__global__ void (?:__launch_bounds__\(\w+\) )?(igk_k_\w+)\(", text)
    assert sorted(macro + plain) == sorted(nvrtc.KERNELS)
    assert len(set(nvrtc.KERNELS)) == 15
    assert f"#define IGK_THREADS {nvrtc.THREADS}" in text


def test_the_device_code_includes_no_system_header_under_nvrtc():
    """NVRTC has no system headers: preprocessed as NVRTC sees them, the sources need none (-nostdinc)."""
    import shutil

    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ preprocessor found")
    proc = subprocess.run([cxx, "-E", "-nostdinc", "-x", "c++", "-D__CUDACC_RTC__", "-D__CUDACC__",
                           "-D__CUDA_ARCH__=900", "-I", str(CSRC), str(CSRC / nvrtc.MAIN)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "igk_k_step_indexed_f16_vec" in proc.stdout


def test_the_checkout_reads_csrc_and_the_sources_are_those_files():
    assert nvrtc.source_dir() in (CSRC, ROOT / "igengine" / "_csrc")
    src = nvrtc.read_sources()
    assert list(src) == list(nvrtc.SOURCES) and src[nvrtc.MAIN] == (nvrtc.source_dir() / nvrtc.MAIN).read_bytes()


def test_setup_py_copies_exactly_the_nvrtc_sources():
    text = (ROOT / "setup.py").read_text()
    listed = re.search(r"NVRTC_SOURCES = \(([^)]*)\)", text).group(1)
    assert tuple(re.findall(r'"([^"]+)"', listed)) == nvrtc.SOURCES


# ---- compilation without a GPU --------------------------------------------------------------------

_IMAGES: dict = {}


def _image(arch: int, fmt: str, options=nvrtc.OPTIONS) -> bytes:
    key = (arch, fmt, options)
    if key not in _IMAGES:
        _IMAGES[key] = nvrtc.compile_image(nvrtc.Target(arch, fmt), options=options)
    return _IMAGES[key]


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_to_ptx_with_every_entry_point_and_no_fma(arch):
    ptx = _image(arch, "ptx")
    assert ptx.endswith(b"\0"), "cuModuleLoadData needs NUL-terminated PTX"
    text = ptx.rstrip(b"\0").decode()
    assert f".target sm_{arch}" in text
    entries = set(re.findall(r"\.entry (\w+)\(", text))
    assert entries == set(nvrtc.KERNELS)
    # --fmad=false: no float32 multiply-add is contracted (the float64 fma come from libdevice's sin/cos/log).
    assert "fma.rn.f32" not in text
    if arch == 80:
        contracted = _image(arch, "ptx", options=tuple(o for o in nvrtc.OPTIONS if o != "--fmad=false"))
        assert b"fma.rn.f32" in contracted, "the check above would not see a contraction"


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_to_a_cubin_for_the_architecture_with_every_entry_point(arch):
    cubin = _image(arch, "cubin")
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == 190  # EM_CUDA
    flags = struct.unpack_from("<I", cubin, 48)[0]
    assert arch in (flags & 0xFF, (flags >> 8) & 0xFF), f"e_flags {flags:#x} do not name sm_{arch}"
    for name in nvrtc.KERNELS:
        assert name.encode() + b"\0" in cubin, f"{name} is not in the cubin's symbols"


@needs_nvrtc
def test_the_targets_follow_what_this_nvrtc_supports():
    archs = nvrtc.supported_archs()
    assert 80 in archs and 90 in archs
    assert nvrtc.target_for(90) == nvrtc.Target(90, "cubin")
    newer = max(archs) + 10
    assert nvrtc.target_for(newer) == nvrtc.Target(max(archs), "ptx")


def test_a_gpu_older_than_nvrtc_knows_is_refused_with_the_way_out():
    with pytest.raises(nvrtc.NvrtcUnavailable, match=r"sm_75 and newer, the GPU is sm_70.*CMake"):
        nvrtc.target_for(70, archs=(75, 80, 90))
    assert nvrtc.target_for(89, archs=(75, 80, 90)) == nvrtc.Target(80, "ptx")


def test_a_compile_error_carries_the_nvrtc_log():
    if _nvrtc_missing():
        pytest.skip(_nvrtc_missing())
    src = dict(nvrtc.read_sources())
    src[nvrtc.MAIN] = src[nvrtc.MAIN] + b"\nthis is not C++;\n"
    with pytest.raises(nvrtc.NvrtcError, match=r"could not compile the kernels for sm_90:\n.*error"):
        nvrtc.compile_image(nvrtc.Target(90), sources=src)


@needs_nvrtc
def test_struct_sizes_that_differ_from_abi_py_stop_the_compilation():
    options = tuple(o for o in nvrtc.OPTIONS if not o.startswith("-DIGK_PARAMS_SIZE=")) + ("-DIGK_PARAMS_SIZE=8",)
    with pytest.raises(nvrtc.NvrtcError, match="igk_step_params differs from abi.StepParams"):
        nvrtc.compile_image(nvrtc.Target(90, "ptx"), options=options)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="fmt must be"):
        nvrtc.Target(90, "fatbin")
    with pytest.raises(ValueError, match="compute capability"):
        nvrtc.Target(9)


# ---- the cache (a stand-in compiler: no NVRTC needed) ----------------------------------------------

SOURCES = {"igk_kernels.cuh": b"kernels", "igk_math.h": b"math", "igk_api.h": b"api"}


@pytest.fixture
def fake_compiler(monkeypatch):
    calls = []

    def compile_image(target, sources=None, options=nvrtc.OPTIONS):
        calls.append(target)
        return b"IMAGE-" + target.name.encode() + b"-" + str(len(calls)).encode()

    monkeypatch.setattr(nvrtc, "compile_image", compile_image)
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))
    return calls


def test_cache_key_changes_with_sources_target_options_and_versions():
    t = nvrtc.Target(90)
    base = nvrtc.cache_key(SOURCES, t, nvrtc.OPTIONS, (13, 0), 13000)
    assert base == nvrtc.cache_key(dict(reversed(list(SOURCES.items()))), t, nvrtc.OPTIONS, (13, 0), 13000)
    variants = [
        nvrtc.cache_key({**SOURCES, "igk_math.h": b"math2"}, t, nvrtc.OPTIONS, (13, 0), 13000),
        nvrtc.cache_key(SOURCES, nvrtc.Target(80), nvrtc.OPTIONS, (13, 0), 13000),
        nvrtc.cache_key(SOURCES, nvrtc.Target(90, "ptx"), nvrtc.OPTIONS, (13, 0), 13000),
        nvrtc.cache_key(SOURCES, t, nvrtc.OPTIONS[1:], (13, 0), 13000),
        nvrtc.cache_key(SOURCES, t, nvrtc.OPTIONS, (13, 1), 13000),
        nvrtc.cache_key(SOURCES, t, nvrtc.OPTIONS, (13, 0), 13010),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_a_cache_hit_does_not_compile_again(tmp_path, fake_compiler):
    first = nvrtc.cached_image(nvrtc.Target(90), 13000, root=tmp_path, sources=SOURCES)
    second = nvrtc.cached_image(nvrtc.Target(90), 13000, root=tmp_path, sources=SOURCES)
    assert (first.hit, second.hit) == (False, True) and len(fake_compiler) == 1
    assert second.image == first.image == b"IMAGE-sm_90-1" and second.path == first.path
    assert first.path.parent == tmp_path / "kernels" and first.path.name.startswith("igk-sm_90-")
    other = nvrtc.cached_image(nvrtc.Target(90), 13010, root=tmp_path, sources=SOURCES)  # another driver
    assert not other.hit and other.path != first.path and len(fake_compiler) == 2
    forced = nvrtc.cached_image(nvrtc.Target(90), 13000, root=tmp_path, sources=SOURCES, force=True)
    assert not forced.hit and len(fake_compiler) == 3


def test_the_cache_root_is_igengines(tmp_path, monkeypatch):
    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path / "c"))
    assert nvrtc.cache_dir() == tmp_path / "c" / "kernels"
    monkeypatch.delenv("IGENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert nvrtc.cache_dir() == tmp_path / "x" / "igengine" / "kernels"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_corrupt_cache_entry_is_compiled_again_and_replaced(tmp_path, fake_compiler, damage):
    first = nvrtc.cached_image(nvrtc.Target(80), 0, root=tmp_path, sources=SOURCES)
    blob = first.path.read_bytes()
    bad = {"truncate": blob[:-3], "flip": blob[:-1] + bytes([blob[-1] ^ 1]), "garbage": b"x" * 100,
           "empty": b""}[damage]
    first.path.write_bytes(bad)
    again = nvrtc.cached_image(nvrtc.Target(80), 0, root=tmp_path, sources=SOURCES)
    assert not again.hit and len(fake_compiler) == 2 and again.image == b"IMAGE-sm_80-2"
    assert nvrtc.cached_image(nvrtc.Target(80), 0, root=tmp_path, sources=SOURCES).hit  # repaired
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name], "a temporary file was left"


def test_a_failed_cache_write_leaves_no_temporary_file_and_still_gives_the_image(tmp_path, fake_compiler, monkeypatch,
                                                                                 capsys):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(nvrtc.os, "replace", refuse)
    got = nvrtc.cached_image(nvrtc.Target(90), 0, root=tmp_path, sources=SOURCES)
    assert got.image == b"IMAGE-sm_90-1" and not got.hit
    assert list((tmp_path / "kernels").iterdir()) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the NVRTC cache" in err and "disk full" in err


# ---- missing cuda-python ----------------------------------------------------------------------------

@pytest.fixture
def no_cuda_python(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.nvrtc", "cuda.bindings.driver", "cuda.nvrtc", "cuda.cuda"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


@pytest.fixture
def fake_gpu_without_cmake_library(monkeypatch, tmp_path):
    """A GPU as far as the loader asks, and no CMake CUDA library anywhere it looks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(library, "DEFAULT_DIR", tmp_path / "no-lib")
    monkeypatch.delenv(library.ENV_DIR, raising=False)
    monkeypatch.delenv(library.ENV_SWITCH, raising=False)
    monkeypatch.delenv(library.ENV_BUILD, raising=False)


def test_without_cuda_python_the_reason_is_clear_and_the_path_is_reference(no_cuda_python,
                                                                           fake_gpu_without_cmake_library):
    with pytest.raises(nvrtc.NvrtcUnavailable, match=r"cuda-python is not installed \(pip install 'igengine\[nvrtc\]'\)"):
        nvrtc.nvrtc_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal situation: no warning, no traceback
        assert library.cuda_library(0) is None
        assert library.kernel_path("cuda:0") == library.PATH_REFERENCE
        status = library.library_status("cuda", 0)
    assert status.state == "missing" and status.build is None
    assert "libigengine_kernels_cuda" in status.detail and "cuda-python is not installed" in status.detail
    facts = library.describe()
    assert facts["cuda_build"] is None and facts["cuda"]["state"] == "missing"


def test_the_command_line_without_cuda_python_says_so_in_one_line(no_cuda_python, capsys):
    assert nvrtc.main(["--arch", "90"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cuda-python is not installed") and "Traceback" not in err


# ---- which build is chosen (stand-ins for both libraries) --------------------------------------------

class _FakeNvrtc:
    kind, build = "cuda", "nvrtc"

    def __init__(self, error: Exception | None = None):
        self.error, self.loads, self.path = error, [], None

    def load(self, device):
        self.loads.append(device)
        if self.error is not None:
            raise self.error
        self.path = Path("/cache/kernels/igk-sm_90-abc.bin")

    def build_facts(self, device=None):
        return {"build": "nvrtc", "path": str(self.path), "info": "cuda nvrtc 13.0, cubin sm_90"}


@pytest.fixture
def builds(monkeypatch, fake_gpu_without_cmake_library):
    """Installs stand-ins: set .cmake_rc (None: no CMake library; else igk_cuda_probe's result) and .nvrtc."""
    state = SimpleNamespace(cmake_rc=None, nvrtc=_FakeNvrtc(), selftest_error=None)
    real_load_file = library._load_file

    def self_test(lib, device, cpu_lib=None):  # the stand-in has no kernels to launch
        if state.selftest_error is not None:
            raise state.selftest_error
        return ["noise: bit-equal to the contract"]

    def load_file(kind, stem):
        if kind != "cuda":
            return real_load_file(kind, stem)
        if state.cmake_rc is None:
            return None, LibraryStatus("cuda", "missing", None, "libigengine_kernels_cuda.so not found")
        cdll = SimpleNamespace(igk_cuda_probe=lambda d: state.cmake_rc, igk_last_error=lambda: b"built for sm_80")
        lib = SimpleNamespace(kind="cuda", build="cmake", cdll=cdll, path=Path("/lib/libigengine_kernels_cuda.so"),
                              build_info="cuda 90-real")
        return lib, LibraryStatus("cuda", "loaded", str(lib.path), lib.build_info, build="cmake")

    monkeypatch.setattr(library, "_load_file", load_file)
    monkeypatch.setattr(nvrtc_library, "shared_library", lambda: state.nvrtc)
    monkeypatch.setattr(selftest, "check_against_reference", self_test)
    return state


def test_an_nvrtc_build_that_fails_its_self_test_is_refused_with_one_warning(builds):
    builds.selftest_error = selftest.SelfTestError("its noise differs from the noise contract in 3 of 420 values")
    assert library.cuda_library(0) is builds.nvrtc, "the loader only loads: it runs no self-test"
    with pytest.warns(RuntimeWarning, match="NVRTC build failed its self-test on cuda:0 .its noise differs.*"
                                            "using the reference PyTorch path") as rec:
        assert trusted.cuda_library(0) is None
        assert trusted.cuda_library(0) is None
    assert len(rec) == 1
    status = library.library_status("cuda", 0)
    assert status.state == "unusable" and "nvrtc: self-test: its noise differs" in status.detail
    assert trusted.kernel_path("cuda:0") == library.PATH_REFERENCE and library.cuda_library(0) is None


def test_a_cmake_library_that_fails_its_self_test_gives_way_to_the_nvrtc_build(builds):
    """The CMake library is self-tested too (its probe only proves that its kernels load)."""
    builds.cmake_rc = 0
    tested = []

    def self_test(lib, device, cpu_lib=None):
        tested.append(lib.build)
        if lib.build == "cmake":
            raise selftest.SelfTestError("its indexed launches: after 4 launches it left the counter at 1")
        return ["noise: bit-equal to the contract"]

    selftest.check_against_reference = self_test  # the fixture's monkeypatch restores the original
    with pytest.warns(RuntimeWarning, match="the CMake build failed its self-test on cuda:0 .its indexed launches.*"
                                            "trying the NVRTC build") as rec:
        assert trusted.cuda_library(0) is builds.nvrtc
    assert len(rec) == 1 and tested == ["cmake", "nvrtc"]
    assert trusted.cuda_library(0) is builds.nvrtc and tested == ["cmake", "nvrtc"], "tested once per device"
    assert trusted.self_test_notes(0, "nvrtc") == ["noise: bit-equal to the contract"]
    assert trusted.self_test_notes(0, "cmake") is None
    assert trusted.describe()["cuda"]["self_test"] == ["noise: bit-equal to the contract"]


class _Skewed:
    """The CPU twin with one thing wrong, as a launcher with a bad argument would be."""

    def __init__(self, lib, what):
        self.lib, self.what, self.kind = lib, what, lib.kind

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def gaussian(self, seed, stream, *args, **kwargs):
        return self.lib.gaussian(seed ^ (self.what == "noise"), stream, *args, **kwargs)

    def step(self, params, buffers, **kwargs):
        if self.what == "step":
            params = type(params).from_buffer_copy(params)
            params.dt *= 2  # a scalar passed wrongly
        if self.what == "uncond" and params.family == abi.FamilyCode.RAEV2:
            params = type(params).from_buffer_copy(params)
            params.ig_w_uncond = params.ig_w  # RAEv2's unconditional IG weight lost (a launcher of the old ABI)
        if self.what == "bf16" and buffers.v_dtype == abi.DType.BF16:
            buffers = type(buffers).from_buffer_copy(buffers)
            buffers.v_dtype = abi.DType.F16  # bf16 outputs read as fp16: a dtype dispatched wrongly
        self.lib.step(params, buffers, **kwargs)
        if self.what == "tail" and buffers.e % 4:
            import ctypes  # the scalar kernel's partial last block written wrongly

            last = ctypes.c_float.from_address(buffers.x_out + 4 * (buffers.n * buffers.e - 1))
            last.value = last.value + 0.5

    def step_indexed(self, table, buffers, **kwargs):
        self.lib.step_indexed(table, buffers, **kwargs)
        if self.what == "counter":
            import ctypes  # the advance lost: every launch runs the table's first row

            ctypes.c_int64.from_address(table.counter).value = 0


def test_the_self_test_passes_a_correct_build_and_catches_wrong_noise_or_steps():
    cpu = library.cpu_library()
    if cpu is None:
        pytest.skip("the CPU twin is not built (python -m igengine.kernels.build)")
    notes = selftest.check_against_reference(cpu, torch.device("cpu"), cpu)
    assert notes[0] == "noise: bit-equal to the contract"
    assert notes[1].startswith("by-value steps (SiT SDE and RAEv2 Euler, f32/bf16/f16 outputs, 72 and 75 elements): "
                               "within 0 ")
    assert notes[2].startswith("indexed launches (5, counter and fault word): within 0 ")
    assert len(notes) == 3, "CUDA-graph capture is checked on CUDA devices only"
    assert selftest.check_against_reference(cpu, torch.device("cpu"))[1] == \
        "fused steps: not checked (no CPU twin to compare with)"
    with pytest.raises(selftest.SelfTestError, match="its noise differs from the noise contract"):
        selftest.check_against_reference(_Skewed(cpu, "noise"), torch.device("cpu"), cpu)
    with pytest.raises(selftest.SelfTestError, match=r"its fused SDE step \(float32 outputs, 72 elements: vectorised\) "
                                                     "differs from the CPU twin's: x by"):
        selftest.check_against_reference(_Skewed(cpu, "step"), torch.device("cpu"), cpu)


@pytest.mark.parametrize("what, message", [
    ("tail", r"its fused SDE step \(float32 outputs, 75 elements: scalar, with a partial last block\) differs .*x by 0.5"),
    ("bf16", r"its fused SDE step \(bfloat16 outputs, 72 elements: vectorised\) differs from the CPU twin's"),
    ("counter", r"its indexed launches were refused: .*launch 0 of a table of 5"),
    ("uncond", r"its fused RAEv2 Euler step \(float32 outputs, 72 elements: vectorised\) differs from the CPU "
               r"twin's: x"),
])
def test_the_self_test_catches_a_wrong_tail_dtype_counter_or_ig_weight(what, message):
    """Each check the self-test grew fails on the fault it is there for (the twin, skewed in one way)."""
    cpu = library.cpu_library()
    if cpu is None:
        pytest.skip("the CPU twin is not built (python -m igengine.kernels.build)")
    with pytest.raises(selftest.SelfTestError, match=message):
        selftest.check_against_reference(_Skewed(cpu, what), torch.device("cpu"), cpu)


def test_a_usable_cmake_library_comes_first(builds):
    builds.cmake_rc = 0
    assert library.cuda_library(0).build == "cmake" and builds.nvrtc.loads == []
    assert library.describe()["cuda_build"] == "cmake"


def test_without_a_cmake_library_the_nvrtc_build_is_used(builds):
    lib = library.cuda_library(0)
    assert lib is builds.nvrtc and builds.nvrtc.loads == [0]
    assert library.kernel_path("cuda:0") == library.PATH_CUDA
    facts = library.describe()
    assert facts["cuda_build"] == "nvrtc" and facts["cuda"]["path"] == "/cache/kernels/igk-sm_90-abc.bin"
    assert facts["cuda"]["state"] == "loaded" and "nvrtc" in facts["cuda"]["detail"]
    library.cuda_library(0)
    assert builds.nvrtc.loads == [0], "probed once per device"


def test_a_cmake_library_for_another_gpu_falls_back_to_nvrtc_with_one_warning(builds):
    builds.cmake_rc = int(abi.Status.ERR_ARCH)
    with pytest.warns(RuntimeWarning, match="cannot run on cuda:0 .built for sm_80.; trying the NVRTC build") as rec:
        assert library.cuda_library(0) is builds.nvrtc
    assert len(rec) == 1


def test_igengine_kernels_build_picks_one_build(builds, monkeypatch):
    builds.cmake_rc = 0
    monkeypatch.setenv(library.ENV_BUILD, "nvrtc")
    assert library.cuda_library(0) is builds.nvrtc
    library._reset_for_tests()
    builds.cmake_rc = None
    monkeypatch.setenv(library.ENV_BUILD, "cmake")
    assert library.cuda_library(0) is None and builds.nvrtc.loads == [0]  # only the first call loaded it
    assert library.library_status("cuda", 0).state == "missing"


def test_a_bad_igengine_kernels_build_warns_once_and_means_auto(builds, monkeypatch):
    monkeypatch.setenv(library.ENV_BUILD, "nvcc")
    with pytest.warns(RuntimeWarning, match="IGENGINE_KERNELS_BUILD='nvcc' is not one of auto, cmake, nvrtc"):
        assert library.cuda_library(0) is builds.nvrtc


def test_igengine_kernels_off_also_turns_nvrtc_off(builds, monkeypatch):
    monkeypatch.setenv(library.ENV_SWITCH, "off")
    assert library.cuda_library(0) is None and builds.nvrtc.loads == []


@pytest.mark.parametrize("error, state", [
    (nvrtc.NvrtcError("NVRTC could not compile the kernels for sm_90:\nerror: x"), "unusable"),
    (nvrtc_library.DriverError("cuModuleLoadData: no kernel image (CUDA_ERROR_NO_BINARY_FOR_GPU)", arch=True),
     "unusable"),
    (RuntimeError("something cuda-python raised"), "unusable"),
])
def test_an_nvrtc_build_that_fails_warns_once_and_takes_the_reference_path(builds, error, state):
    builds.nvrtc = _FakeNvrtc(error)
    with pytest.warns(RuntimeWarning, match="the NVRTC build cannot run on cuda:0") as rec:
        assert library.cuda_library(0) is None
        assert library.cuda_library(0) is None
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    status = library.library_status("cuda", 0)
    assert status.state == state and "nvrtc:" in status.detail and library.kernel_path("cuda:0") == "reference"


def test_an_absent_driver_is_a_reason_not_a_warning(builds):
    builds.nvrtc = _FakeNvrtc(nvrtc.NvrtcUnavailable("the CUDA driver library was not found"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert library.cuda_library(0) is None
    assert "the CUDA driver library was not found" in library.library_status("cuda", 0).detail


def test_igengine_info_names_the_build_and_the_cache(capsys, monkeypatch, tmp_path):
    from igengine.cli import main

    monkeypatch.setenv("IGENGINE_CACHE", str(tmp_path))
    assert main(["info"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert kernels["nvrtc_cache"] == str(tmp_path / "kernels")
    assert "cuda_build" in kernels and "build" in kernels["cuda"] and "build" in kernels["cpu"]
    if not torch.cuda.is_available():
        assert kernels["cuda_build"] is None


def test_the_sampler_reports_its_build_for_the_manifest(twin_discovered):
    from igengine.config import Solver
    from tests import kernel_parity as P
    from tests.conftest import sampler_for

    backend = P.tiny_backend("SiT-S/2")
    s = sampler_for(backend, P.e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, steps=2))
    assert s.path == "cpu-twin"
    assert s.kernel_build == {"build": "cmake", "path": str(twin_discovered.path), "info": twin_discovered.build_info}
    assert sampler_for(backend, P.e2e_sampler(Solver.SDE, (0.0, 0.7), 0.0, steps=2), kernels="off").kernel_build \
        is None


# ---- the host checks before a launch agree with the C side's ----------------------------------------

def _params(**kw) -> abi.StepParams:
    p = abi.StepParams(kind=int(abi.Kind.EULER), family=int(abi.FamilyCode.SIT))
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _buffers(**kw) -> abi.StepBuffers:
    fake = 1 << 12  # never dereferenced: every case below is refused before any access
    b = abi.StepBuffers(x=fake, v_final=fake, v_inter=fake, k1_in=fake, indices=fake, x_out=fake, k1_out=fake,
                        net_out=fake, first_bad=fake, n=1, e=4, v_dtype=0, reserved=0)
    for k, v in kw.items():
        setattr(b, k, v)
    return b


REFUSED = [
    ("n=0", _params(), _buffers(n=0)),
    ("huge e", _params(), _buffers(e=(1 << 40) + 1)),
    ("dtype", _params(), _buffers(v_dtype=7)),
    ("kind", _params(kind=9), _buffers()),
    ("family", _params(family=5), _buffers()),
    ("drift without SDE", _params(drift=1), _buffers()),
    ("SDE without drift", _params(kind=int(abi.Kind.SDE)), _buffers()),
    ("LightningDiT drift", _params(kind=int(abi.Kind.SDE_LAST), drift=1, family=1), _buffers()),
    ("RAEv2 drift", _params(kind=int(abi.Kind.SDE_LAST), drift=1, family=2), _buffers()),
    ("RAEv2 Heun", _params(kind=int(abi.Kind.HEUN_PREDICT), family=2), _buffers()),
    ("family 3", _params(family=3), _buffers()),
    ("x", _params(), _buffers(x=None)),
    ("v_final", _params(), _buffers(v_final=None)),
    ("v_inter", _params(ig=1), _buffers(v_inter=None)),
    ("indices", _params(kind=int(abi.Kind.SDE), drift=1), _buffers(indices=None)),
    ("k1_in", _params(kind=int(abi.Kind.HEUN_CORRECT)), _buffers(k1_in=None)),
    ("k1_out", _params(kind=int(abi.Kind.HEUN_PREDICT)), _buffers(k1_out=None)),
    ("x_out", _params(), _buffers(x_out=None)),
    ("net_out", _params(dup_next=1), _buffers(net_out=None)),
]


def _c_refusal(fn) -> str:
    with pytest.raises(KernelError) as info:
        fn()
    return str(info.value).split(" failed ", 1)[1]


@pytest.mark.parametrize("name, p, b", REFUSED, ids=[r[0] for r in REFUSED])
def test_the_nvrtc_checks_refuse_what_the_c_side_refuses_with_the_same_text(twin, name, p, b):
    lib = nvrtc_library.NvrtcLibrary()
    ours = _c_refusal(lambda: lib.step(p, b))  # refused before anything is compiled or loaded
    assert ours == _c_refusal(lambda: twin.step(p, b))


def _table(**kw) -> abi.StepTable:
    t = abi.StepTable(params=1 << 12, counter=1 << 12, fault=None, count=1, v_rows=1, net_rows=1)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


REFUSED_INDEXED = [
    ("params", _table(params=None), _buffers()),
    ("counter", _table(counter=None), _buffers()),
    ("count", _table(count=0), _buffers()),
    ("n", _table(), _buffers(n=0)),
    ("dtype", _table(), _buffers(v_dtype=3)),
    ("x", _table(), _buffers(x=None)),
    ("v_rows", _table(v_rows=3), _buffers()),
    ("net_rows", _table(net_rows=3), _buffers()),
    ("net_rows without net_out", _table(net_rows=1), _buffers(net_out=None)),
]


@pytest.mark.parametrize("name, t, b", REFUSED_INDEXED, ids=[r[0] for r in REFUSED_INDEXED])
def test_the_nvrtc_indexed_checks_refuse_what_the_c_side_refuses(twin, name, t, b):
    lib = nvrtc_library.NvrtcLibrary()
    assert _c_refusal(lambda: lib.step_indexed(t, b)) == _c_refusal(lambda: twin.step_indexed(t, b))


def test_the_vectorised_path_is_chosen_like_the_c_side():
    assert nvrtc_library._can_vectorise(_buffers())
    assert not nvrtc_library._can_vectorise(_buffers(e=6))
    assert not nvrtc_library._can_vectorise(_buffers(x_out=(1 << 12) + 4))
    assert nvrtc_library._can_vectorise(_buffers(v_dtype=1, v_final=(1 << 12) + 8, v_inter=(1 << 12) + 8))
    assert not nvrtc_library._can_vectorise(_buffers(v_dtype=0, v_final=(1 << 12) + 8))
    assert nvrtc_library._can_vectorise(_buffers(k1_in=None, k1_out=None, v_inter=None))
    assert nvrtc_library._grid(3, 1000) == (4, 3) and nvrtc_library._grid(70000, 1) == (1, 65535)


# ---- the command line ------------------------------------------------------------------------------

@needs_nvrtc
def test_the_command_line_compiles_for_an_architecture_without_a_gpu_then_reads_the_cache(tmp_path):
    env = {**os.environ, "IGENGINE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "igengine.kernels.nvrtc", "--arch", "90"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert re.search(r"sm_90: compiled .*igk-sm_90-\w+\.bin", first.stdout)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "sm_90: cached" in second.stdout and "compiling" not in second.stdout
    files = list((tmp_path / "kernels").glob("igk-sm_90-*.bin"))
    assert len(files) == 1 and nvrtc._unpack(files[0].read_bytes())[:4] == b"\x7fELF"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_command_line_without_a_gpu_or_arch_says_what_to_do_in_one_line(tmp_path):
    env = {**os.environ, "IGENGINE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "igengine.kernels.nvrtc"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_refuses_a_bad_architecture_in_one_line(capsys):
    assert nvrtc.main(["--arch", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compute capability" in err


# ====================================================================================================
# On a GPU
# ====================================================================================================

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def nvrtc_lib(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False): NVRTC launches await a GPU")
    missing = _nvrtc_missing()
    if missing:
        pytest.skip(f"{missing}: pip install 'igengine[nvrtc]'")
    torch.cuda.init()
    lib = nvrtc_library.NvrtcLibrary(cache_root=tmp_path_factory.mktemp("nvrtc-cache"))
    try:
        lib.load(0)
    except nvrtc.NvrtcUnavailable as exc:
        pytest.skip(f"the NVRTC build cannot be used on this machine: {exc}")
    return lib


def _parity_module():
    from tests import kernel_parity as P

    return P


@gpu
def test_gpu_nvrtc_loads_every_kernel_and_reports_its_build(nvrtc_lib):
    mod = nvrtc_lib.load(0)
    assert set(mod.functions) == set(nvrtc.KERNELS)
    major, minor = torch.cuda.get_device_capability(0)
    assert mod.cc == 10 * major + minor
    facts = nvrtc_lib.build_facts(torch.device("cuda", 0))
    assert facts["build"] == "nvrtc" and facts["path"] == str(mod.path) and f"sm_{mod.cc}" in facts["info"]
    assert not mod.cached and mod.path.is_file()


@gpu
def test_gpu_a_second_library_reads_the_cache(nvrtc_lib):
    again = nvrtc_library.NvrtcLibrary(cache_root=nvrtc_lib.cache_root)
    assert again.load(0).cached and again.load(0).path == nvrtc_lib.load(0).path


@gpu
@pytest.mark.parametrize("seed, stream", [(0, 0), (2**32 + 5, 1), (2**64 - 1, 2**32 - 1)])
def test_gpu_nvrtc_noise_equals_the_contract_bitwise(nvrtc_lib, seed, stream):
    from igengine.kernels.binding import gaussian, philox_words
    from igengine.noise import gaussian as ref_gaussian
    from igengine.noise import philox_words as ref_philox_words

    indices = [0, 1, 17, 2**32 - 1, 2**32, 2**40 + 3]
    assert (philox_words(seed, indices, stream, 1100, device="cuda", library=nvrtc_lib)
            == ref_philox_words(seed, indices, stream, 1100)).all()
    got = gaussian(seed, indices, stream, (4, 9, 9), device="cuda", library=nvrtc_lib).cpu()
    assert torch.equal(got, ref_gaussian(seed, indices, stream, (4, 9, 9)))


@gpu
def test_gpu_nvrtc_fused_step_matches_the_reference_and_the_cpu_twin(nvrtc_lib, twin):
    P = _parity_module()
    for case in P.step_cases():
        inp = P.make_inputs(case, device="cuda")
        got = P.fused(case, inp, library=nvrtc_lib)
        errs = P.compare(case, got, P.reference(case, inp, device="cuda"))
        bad = {k: v for k, v in errs.items() if not v <= P.KERNEL_RTOL}
        assert not bad, f"{case.id}: relative errors above {P.KERNEL_RTOL}: {bad}"
    for case in P.step_cases()[::7]:
        a = P.fused(case, P.make_inputs(case), library=twin)
        b = P.fused(case, P.make_inputs(case, device="cuda"), library=nvrtc_lib)
        differ = [k for k in a if not torch.equal(a[k], b[k].cpu())]
        assert not differ, f"{case.id}: {differ} differ between the CPU twin and the NVRTC build"


@gpu
def test_gpu_nvrtc_equals_the_cmake_library_bitwise(nvrtc_lib, monkeypatch):
    P = _parity_module()
    monkeypatch.setenv(library.ENV_BUILD, "cmake")
    library._reset_for_tests()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cmake = library.cuda_library(0)
    if cmake is None:
        pytest.skip(f"no usable CMake CUDA library here ({library.library_status('cuda', 0).detail})")
    for case in P.step_cases():
        inp = P.make_inputs(case, device="cuda")
        a, b = P.fused(case, inp, library=cmake), P.fused(case, inp, library=nvrtc_lib)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{case.id}: {differ} differ between the CMake and the NVRTC build (same source)"


@gpu
def test_gpu_nvrtc_indexed_step_equals_the_by_value_step_and_records_faults(nvrtc_lib):
    P = _parity_module()
    for case in P.step_cases()[::9]:
        P.check_indexed_equals_by_value(case, nvrtc_lib)
    P.check_refused_indexed_launch(nvrtc_lib)


@gpu
def test_gpu_nvrtc_launch_is_captured_in_a_cuda_graph(nvrtc_lib):
    _parity_module().check_step_capture(nvrtc_lib)


@gpu
def test_gpu_nvrtc_launch_from_a_thread_without_a_current_context(nvrtc_lib):
    """The launcher makes the device's primary context current for the launch and restores the caller's."""
    from igengine.noise import gaussian as ref_gaussian

    drv = nvrtc_library._driver()
    idx = torch.tensor([0, 1], device="cuda:0")
    out = torch.zeros(2, 8, device="cuda:0")
    torch.cuda.synchronize()
    seen, errors = [], []

    def work():
        try:
            drv.cuCtxSetCurrent(drv.CUcontext(0))  # as a thread that never touched CUDA
            nvrtc_lib.gaussian(3, 0, idx.data_ptr(), 2, 8, out.data_ptr(), device=0, cuda_stream=0)
            err, current = drv.cuCtxGetCurrent()
            seen.append(int(current))
            nvrtc_lib.load(0)
            drv.cuCtxSetCurrent(nvrtc_lib.load(0).ctx)
            drv.cuCtxSynchronize()
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert seen == [0], "the caller's (absent) context was not restored"
    assert torch.equal(out.cpu(), ref_gaussian(3, [0, 1], 0, (8,)))


@gpu
def test_gpu_a_run_without_a_cmake_library_takes_the_nvrtc_build(nvrtc_lib, monkeypatch, tmp_path):
    from igengine.config import Solver
    from tests.conftest import sampler_for

    P = _parity_module()
    monkeypatch.setattr(library, "DEFAULT_DIR", tmp_path / "no-lib")
    monkeypatch.delenv(library.ENV_DIR, raising=False)
    monkeypatch.delenv(library.ENV_SWITCH, raising=False)
    monkeypatch.delenv(library.ENV_BUILD, raising=False)
    monkeypatch.setenv("IGENGINE_CACHE", str(nvrtc_lib.cache_root))
    library._reset_for_tests()
    assert library.describe()["cuda_build"] == "nvrtc"
    backend = P.tiny_backend("LightningDiT-B/1", device="cuda")
    cfg = P.e2e_sampler(Solver.HEUN2, (0.19, 1.0), 0.3)
    captured = sampler_for(backend, cfg)
    assert captured.path == "cuda-graph" and captured.kernel_build["build"] == "nvrtc"
    indices, labels = torch.tensor([3, 2**33 + 1, 11]), torch.tensor([1, 2, 9])
    ref = sampler_for(backend, cfg, kernels="off")(5, indices, labels)
    got = captured(5, indices, labels)
    fused = replace(captured, capture="off")(5, indices, labels)
    assert P.rel_err(got, ref) <= P.E2E_RTOL and P.rel_err(fused, ref) <= P.E2E_RTOL

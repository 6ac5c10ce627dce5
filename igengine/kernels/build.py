"""Build the kernel libraries with CMake: ``python -m igengine.kernels.build``.

Equivalent to::

    cmake -S . -B build/kernels -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build/kernels

run from the repository root. Always builds the CPU twin; builds the CUDA library when a CUDA
compiler is found (CUDACXX, nvcc on PATH, or /usr/local/cuda/bin/nvcc). Both are written to
igengine/_lib/, where igengine.kernels finds them. Examples::

    python -m igengine.kernels.build                      # what this machine can build
    python -m igengine.kernels.build --cuda off           # CPU twin only
    python -m igengine.kernels.build --cuda on --cuda-arch 90-real   # CUDA required, H100/H200 only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = ROOT / "build" / "kernels"


class BuildError(RuntimeError):
    """CMake is missing or the build failed (the message has the tail of its output)."""


def _run(cmd: list[str], quiet: bool) -> None:
    if not quiet:
        print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-4000:] if quiet else ""
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def build(cuda: str = "auto", cuda_arch: str | None = None, build_dir: Path | str | None = None,
          lib_dir: Path | str | None = None, quiet: bool = False, cmake_args: list[str] | tuple[str, ...] = ()) -> Path:
    """Configure and build; returns the folder holding the libraries.

    cuda: 'auto' (build the CUDA library if a compiler is found), 'on' (fail without one), 'off'.
    cuda_arch: CMAKE_CUDA_ARCHITECTURES (default 80-real;90-real;90-virtual).
    build_dir: CMake build folder (default build/kernels; one folder per cuda setting is advisable).
    lib_dir: output folder of the libraries (default igengine/_lib).
    cmake_args: extra configure arguments, e.g. ["-DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler"].
    """
    if cuda not in ("auto", "on", "off"):
        raise ValueError(f"cuda must be auto, on or off, got {cuda!r}")
    if not (ROOT / "CMakeLists.txt").is_file():
        raise BuildError(f"{ROOT / 'CMakeLists.txt'} not found: the kernels build from a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake not found on PATH (install CMake >= 3.18)")
    build_dir = Path(build_dir) if build_dir else DEFAULT_BUILD_DIR
    lib_dir = Path(lib_dir) if lib_dir else ROOT / "igengine" / "_lib"
    cfg = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", f"-DIGENGINE_LIB_DIR={lib_dir}",
           f"-DIGENGINE_CUDA={'OFF' if cuda == 'off' else 'ON'}"]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    if cuda_arch:
        cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    cfg += list(cmake_args)
    _run(cfg, quiet)
    _run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], quiet)
    if cuda == "on":
        from igengine.kernels.library import CUDA_STEM, library_filename

        if not (lib_dir / library_filename(CUDA_STEM)).is_file():
            raise BuildError("--cuda on, but CMake found no CUDA compiler (set CUDACXX=/path/to/nvcc)")
    return lib_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m igengine.kernels.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES, e.g. '90-real' or '80-real;90-real'")
    ap.add_argument("--build-dir", default=None, help=f"CMake build folder (default {DEFAULT_BUILD_DIR})")
    ap.add_argument("--lib-dir", default=None, help="output folder (default igengine/_lib)")
    ap.add_argument("--cmake-arg", action="append", default=[], metavar="ARG",
                    help="extra CMake configure argument (repeatable), e.g. -DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler")
    args = ap.parse_args(argv)
    try:
        out = build(args.cuda, args.cuda_arch, args.build_dir, args.lib_dir, cmake_args=args.cmake_arg)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"libraries in {out}: " + ", ".join(sorted(p.name for p in out.glob("*igengine_kernels*"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

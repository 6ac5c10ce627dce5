"""`igengine sample` as a library call: resolve everything, then run the chunked, resumable sampler.

The CLI (``igengine.cli``) only parses flags into a ``SampleJob`` and calls ``run_sample``, which
resolves the model, sampler, labels, VAE and device, checks the output folder, takes this rank's
lock and hands over to ``igengine.jobs.bulk`` (chunks, resume, rank 0's pack).

Run identity (``run_key``, stored in the manifest): everything that changes a sample's numbers --
checkpoint sha256, resolved model and sampler, seed, label source, backend, decoding and the VAE
(kind, sha256, latent statistics), and the chunk size. ``n`` is not part of it: rerunning with a
larger ``--n`` extends the run (samples 0..old_n-1 are the same files, by the noise contract),
a smaller one packs the first n. Batch size, device and the number of processes are not part of
it either: they do not change which sample an index gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import igengine
from igengine.backends.cpu_linear import routes as cpu_routes
from igengine.config import BackendName
from igengine.config import Family, ModelConfig, Precision, SamplerConfig, SamplerSettings, Solver
from igengine.errors import ConfigError, Interrupted, JobError, OutputError
from igengine.export.cache import SetupLog
from igengine.jobs.advice import choice_warnings
from igengine.jobs.backend import build_backend, check_runtime, with_eager_fallback
from igengine.jobs.bulk import BulkSampler, Progress, SampleMaker
from igengine.jobs.launch import RankInfo
from igengine.jobs.preflight import PREFLIGHT_CHOICES, preflight_sampler
from igengine.jobs.preview import prepare_png_dir, write_run_grid
from igengine.jobs.signals import stop_on_signals, stop_received
from igengine.jobs.threads import ENV as THREADS_ENV
from igengine.jobs.threads import ThreadChoice, choose_threads, using_threads
from igengine.models.checkpoint import LoadedCheckpoint, load_checkpoint
from igengine.noise import balanced_labels, check_seed, random_labels
from igengine.precision import default_precision, default_precision_note
from igengine.sampling import ModelFacts, Sampler, build_plan, resolve_sampler
from igengine.sampling.sampler import CAPTURE_CHOICES
from igengine.store.atomic import atomic_write_json
from igengine.store.chunks import CHUNKS_DIR, DEFAULT_CHUNK_SIZE, coalesce
from igengine.store.clean import clear_removed, packed_files_match, read_removed, remove_chunks, restore_chunks
from igengine.store.locks import rank_lock
from igengine.store.manifest import MANIFEST, SAMPLES, igengine_commit, prepare_output_folder, read_manifest
from igengine.store.pack import BulkLayout, pack_folder
from igengine.vae import LatentDecoder, VAEKind, load_vae, resolve_kind
from igengine.vae.pixels import PIXEL_CONVERSION

DEFAULT_CHECKPOINT = Path(igengine.__file__).resolve().parent / "assets" / "sit_digits.safetensors"


@dataclass(frozen=True)
class SampleJob:
    """Everything `igengine sample` was asked for. None means: the model's (or checkpoint's) default."""

    out: Path
    n: int = 16
    batch_size: int = 64
    seed: int = 0
    ckpt: Path | None = None
    model: str | None = None
    encoder_depth: int | None = None
    num_heads: int | None = None
    labels: str = "random"  # 'random', 'balanced', classes ('207', '0-9', '1,5,9', '0-9,20') or a file path
    solver: Solver | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    ig_scale: float | None = None
    ig_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    ig_scale_uncond: float | None = None  # RAEv2: IG scale of the unconditional rows (None: ig_scale)
    precision: Precision | None = None  # None: precision.default_precision(device)
    device: str = "auto"
    backend: BackendName = BackendName.TORCH
    onnx: Path | None = None  # exported graph (file or folder) for onnxruntime/tensorrt; None: the export cache
    png: bool = False
    grid: bool = True  # grid.png of the first samples, after packing (decoding runs only)
    save_latents: Path | None = None
    no_decode: bool = False
    overwrite: bool = False
    vae: Path | None = None  # SD-VAE diffusers folder / LDM file, VA-VAE checkpoint, or RAE decoder.pt
    vae_kind: str = "auto"  # 'auto' (by family: SiT -> sd, LightningDiT -> vavae, RAEv2 -> rae), 'sd', 'vavae', 'rae'
    latent_stats: Path | None = None  # VA-VAE latents_stats.pt ({'mean', 'std'}, [1, C, 1, 1]); RAE stats.pt ({'mean', 'var'})
    latent_multiplier: float = 1.0  # VA-VAE: x * std / multiplier + mean (1.0 in the released config)
    chunk_size: int | None = None  # samples per chunk file (the unit of output and resume); None: see resolve_chunk_size
    evaluate: Path | None = None  # a reference for `igengine evaluate`, run after packing (metrics.json)
    capture: str = "auto"  # CUDA graphs of whole steps where the backend allows them ('auto'), or never ('off')
    preflight: str = "auto"  # compare the fast rungs with the reference before the first chunk ('auto'), or not ('off')
    threads: int | None = None  # CPU threads; None: OMP_NUM_THREADS, else the cores not busy (igengine.jobs.threads)
    keep_chunks: bool = True  # False: remove the chunks once samples.npz is verified (igengine.store.clean)

    def validate(self) -> None:
        """The checks that need no file: counts, the seed, the output names. Sampler settings are
        checked where they are built (``igengine.config``)."""
        for name in ("n", "batch_size", "chunk_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise JobError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.capture not in CAPTURE_CHOICES:
            raise JobError(f"unknown `capture` {self.capture!r}; choose {' or '.join(CAPTURE_CHOICES)}")
        if self.preflight not in PREFLIGHT_CHOICES:
            raise JobError(f"unknown `preflight` {self.preflight!r}; choose {' or '.join(PREFLIGHT_CHOICES)}")
        if self.vae_kind not in ("auto", *(k.value for k in VAEKind)):
            raise JobError(f"unknown `vae_kind` {self.vae_kind!r}; choose auto, "
                           + ", ".join(k.value for k in VAEKind))
        try:
            check_seed(self.seed)
        except ValueError as e:
            raise JobError(str(e)) from None
        if self.save_latents is not None and Path(self.save_latents).suffix != ".npy":
            raise JobError(f"`save_latents` must name a .npy file, got {self.save_latents}")
        if self.png and self.no_decode:
            raise JobError("`png` needs decoded pixels but `no_decode` was given: drop one of them")
        if self.evaluate is not None and self.no_decode:
            raise JobError("`evaluate` needs decoded pixels but `no_decode` was given: drop one of them")
        if self.evaluate is not None and not Path(self.evaluate).exists():
            raise JobError(f"`evaluate` reference {self.evaluate} not found")
        if self.onnx is not None and not BackendName(self.backend).needs_graph:
            raise JobError("`onnx` only applies to the onnxruntime and tensorrt backends")

    @property
    def settings(self) -> SamplerSettings:
        """The sampler settings the job gives explicitly."""
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)})


def parse_interval(text: str, name: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` -> (LOW, HIGH); JobError naming the argument ``name`` otherwise."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise JobError(f"`{name}` must be LOW,HIGH (two numbers), got {text!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------


def resolve_sampler_config(job: SampleJob, loaded: LoadedCheckpoint) -> SamplerConfig:
    """The job's explicit values over the checkpoint's recommended settings over the paper's, checked
    against the model: the solver must belong to its family, CFG needs its null-class row."""
    cfg = loaded.config
    try:
        sampler = resolve_sampler(cfg.family, job.precision, loaded.sampler_settings, job.settings, cfg.latent_shape)
        plan = build_plan(cfg.family, sampler)
    except ConfigError as e:
        raise JobError(str(e)) from None
    try:
        ModelFacts.of(cfg).check_plan(plan)
    except ConfigError as e:
        raise JobError(f"{cfg.name}: {e}") from None
    return sampler


def load_label_file(path: Path, n: int, num_classes: int) -> np.ndarray:
    """Class ids from a .npy file or a text file (ids separated by whitespace or commas)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"labels file not found: {path} (`labels` is random, balanced, classes such as 207, "
                       "0-9 or 1,5,9, or a file)")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (ValueError, OSError) as e:
        raise JobError(f"cannot read labels file {path}: {e}") from None
    values = np.asarray(values).reshape(-1)
    if values.size and not np.all(np.mod(values, 1) == 0):
        raise JobError(f"labels file {path} holds non-integer class ids")
    values = values.astype(np.int64)
    if values.size != n:
        raise JobError(f"labels file {path} has {values.size} class ids but `n` is {n}")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise JobError(f"labels file {path}: class id {int(bad[0])} is outside [0, {num_classes}) for this model")
    return values


_CLASS_SPEC = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
CLASS_ASSIGNMENT = "sample i gets classes[i mod len(classes)]"


def is_class_spec(text: str) -> bool:
    """Whether a `labels` value names classes ('207', '0-9', '1,5,9', '0-9,20') rather than a file."""
    return bool(_CLASS_SPEC.match(text))


_CLASS_LIKE = re.compile(r"^[\d\s,+-]*$")  # only what a class list is made of (and signs): meant as one


def class_spec_problem(text: str) -> str | None:
    """What is wrong with a `labels` value written as a class list ('-1', '0-9,,', '1-'), or None when it
    does not look like one (a file name, a label mode) or is a good one."""
    if is_class_spec(text) or not _CLASS_LIKE.match(text):
        return None
    if not text.strip():
        return "`labels` is empty: give random, balanced, classes such as 207, 0-9 or 1,5,9, or a file"
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            return (f"`labels` {text.strip()!r} has an empty entry (two commas in a row, or one at an end): "
                    "write classes as 207, 0-9 or 1,5,9")
        compact = re.sub(r"\s+", "", entry)
        if re.fullmatch(r"\d+(-\d+)?", compact) and not re.fullmatch(r"\d+\s+\d+", entry):
            continue
        if compact.startswith("+"):
            return f"`labels` {entry}: write class ids without a sign ({compact.lstrip('+')})"
        if compact.startswith("-") or "--" in compact:
            return f"`labels` {entry}: class ids are whole numbers >= 0 (a range is LOW-HIGH, e.g. 0-9)"
        if compact.endswith("-"):
            return f"`labels` range {entry} has no end: write LOW-HIGH, e.g. 0-9"
        if re.fullmatch(r"\d+(\s+\d+)+", entry):
            return f"`labels` {entry!r}: separate class ids with commas ({','.join(entry.split())})"
        return f"`labels` entry {entry!r} is neither a class id nor a range LOW-HIGH (e.g. 207 or 0-9)"
    return None


def parse_classes(text: str, num_classes: int) -> list[int]:
    """'0-9,20' -> [0, 1, ..., 9, 20]: ranges inclusive (as EDM2's --seeds), in the order given,
    repeats kept. Each class must lie in [0, num_classes)."""
    classes: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if b < a:
            raise JobError(f"`labels` range {part.strip()} runs backwards: write it as {b}-{a}")
        if b >= num_classes:
            raise JobError(f"`labels` class {b} is outside [0, {num_classes}) for this model")
        classes.extend(range(a, b + 1))
    return classes


def resolve_labels(job: SampleJob, num_classes: int) -> tuple[torch.Tensor, dict]:
    """All n labels and a JSON description of where they came from.

    Classes given on the command line are cycled in the order given: sample i gets
    classes[i mod len(classes)]. Labels never change a sample's noise (the noise contract), so
    sample i of seed s has the same noise whatever the classes are.
    """
    indices = np.arange(job.n)
    if job.labels == "random":
        return random_labels(job.seed, indices, num_classes), {"mode": "random"}
    if job.labels == "balanced":
        return balanced_labels(indices, num_classes), {"mode": "balanced"}
    if is_class_spec(job.labels):
        classes = parse_classes(job.labels, num_classes)
        values = np.asarray(classes, dtype=np.int64)[indices % len(classes)]
        info = {"mode": "classes", "spec": re.sub(r"\s+", "", job.labels), "assignment": CLASS_ASSIGNMENT,
                "num_given": len(classes)}
        info["classes"] = classes if len(classes) <= 10_000 else hashlib.sha256(
            np.asarray(classes, dtype=np.int64).tobytes()).hexdigest()
        return torch.from_numpy(values), info
    if not Path(job.labels).is_file() and (problem := class_spec_problem(job.labels)) is not None:
        raise JobError(problem)  # meant as classes ('-1', '0-9,,'): say what is wrong with them, not "file not found"
    values = load_label_file(Path(job.labels), job.n, num_classes)
    digest = hashlib.sha256(values.tobytes()).hexdigest()
    return torch.from_numpy(values), {"mode": "file", "file": str(job.labels), "sha256": digest}


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` and ``cuda`` mean cuda:LOCAL_RANK (torchrun's GPU for this process) when CUDA is there.

    igengine runs on the CPU and on CUDA GPUs; any other device (mps, xpu, ...), a CUDA index this
    machine does not have, or CUDA where there is none is a JobError naming `device`.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise JobError(f"unknown `device` {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise JobError(f"`device` {device!r} is not supported: igengine runs on auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise JobError(f"`device` {device} was asked for but no CUDA GPU is available here (torch "
                       f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use `device` cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise JobError(f"`device` {device} does not exist here: {count} CUDA device(s) are visible "
                       f"(cuda:0..cuda:{count - 1})")
    if dev.index is None:
        if local_rank >= torch.cuda.device_count():
            raise JobError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        dev = torch.device("cuda", local_rank)
    return dev


FAMILY_VAE = {Family.SIT: VAEKind.SD, Family.LIGHTNINGDIT: VAEKind.VAVAE, Family.RAEV2: VAEKind.RAE}
VAE_HINT = {Family.SIT: "sd-vae-ft-ema folder or file",
            Family.LIGHTNINGDIT: "VA-VAE f16d32 checkpoint and `latent_stats` latents_stats.pt",
            Family.RAEV2: "RAE decoder.pt and `latent_stats` stats.pt"}
TIME_CONVENTION = {Family.SIT: "t=1 noise, t=0 data", Family.LIGHTNINGDIT: "t=0 noise, t=1 data",
                   Family.RAEV2: "t=1 noise, t=0 data; x-prediction, v = (x_t - x_hat) / max(t, 0.05)"}


def resolve_decoder(job: SampleJob, cfg: ModelConfig) -> LatentDecoder | None:
    """The VAE decoder of a latent model (None for pixel-space models and runs without decoding)."""
    if cfg.pixel_space or job.no_decode:
        if job.vae is not None or job.latent_stats is not None:
            why = "`no_decode` was given" if job.no_decode else f"{cfg.name} samples pixels"
            raise JobError(f"`vae` / `latent_stats` were given but {why}: drop them")
        return None
    if job.vae is None:
        hint = VAE_HINT[cfg.family]
        raise JobError(
            f"{cfg.name} samples VAE latents ({cfg.in_channels}x{cfg.input_size}x{cfg.input_size}): pass `vae` PATH "
            f"(the {hint}) to decode them, or `no_decode` to write latents only"
        )
    kind = resolve_kind(job.vae_kind, FAMILY_VAE[cfg.family])
    if (kind == VAEKind.RAE) != (cfg.family == Family.RAEV2):
        # The decoders' image ranges and the families' pixel rules go together ([0, 1] for RAE, [-1, 1] else).
        raise JobError(f"`vae_kind` {kind.value} does not decode {cfg.name} latents: {cfg.family.value} models decode "
                       f"with {FAMILY_VAE[cfg.family].value} (`vae_kind` auto)")
    return load_vae(Path(job.vae), kind, cfg.in_channels, job.latent_stats, job.latent_multiplier,
                    latent_size=cfg.input_size)


def resolve_chunk_size(asked: int | None, out: Path, run_key: dict, existing: dict | None) -> tuple[int, str | None]:
    """The chunk size of a run and, when it was not asked for, a note saying where it came from.

    Asked for: that. Otherwise the chunk size of the run already in ``out`` (``existing``, its
    manifest), whatever that run is (README: "the default chunk size is that of the run already in
    OUT, else 256"): a rerun without the flag then resumes or extends it whatever the default was
    then, a refusal names only the settings that were given (never a chunk size nobody asked for),
    and `overwrite` keeps the folder's unit of output. Else ``DEFAULT_CHUNK_SIZE``.
    """
    if asked is not None:
        return asked, None
    old_key = existing.get("run_key") if existing else None
    if isinstance(old_key, dict) and isinstance(old_key.get("chunk_size"), int) and old_key["chunk_size"] >= 1:
        size = old_key["chunk_size"]
        if size != DEFAULT_CHUNK_SIZE:
            return size, f"chunk size {size}, that of the run already in {out} (choose with `chunk_size`)"
        return size, None
    return DEFAULT_CHUNK_SIZE, None


def _manifest_if_readable(out: Path) -> dict | None:
    """The manifest in ``out`` for `overwrite` runs, which replace it: None where there is none or it is unreadable."""
    try:
        return read_manifest(out)
    except OutputError:
        return None


def make_backend(job: SampleJob, loaded: LoadedCheckpoint, device: torch.device, setup: SetupLog | None = None):
    """The run's backend; a compiled one falls back to the eager torch backend of its precision when it fails
    (``igengine.jobs.backend.EagerFallback``)."""
    n = min(job.batch_size, job.n)  # a compiled backend specialises to the rows a batch feeds (N, and 2N with CFG)
    return with_eager_fallback(build_backend(job.backend, loaded, job.precision, device, onnx=job.onnx,
                                             row_counts=(n, 2 * n), setup=setup), setup)  # its compile says so


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    manifest: dict
    out: Path
    wall_s: float
    samples_per_s: float
    notes: list[str] = field(default_factory=list)
    computed: int = 0  # samples computed by this process
    reused: int = 0  # samples already complete when this process started (its view)
    rank: RankInfo = field(default_factory=RankInfo)


def run_key_digest(run_key: dict) -> str:
    return hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()


def _interrupted(e: BaseException, out: Path, manifest: dict, layout: BulkLayout, store, rank: RankInfo) -> Interrupted:
    """Record an interruption in the manifest (rank 0) and say where the run stands and how to resume."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    present = [c for c in layout.plan.chunks if store.path(c).exists()]  # complete by atomicity
    done = sum(c.size for c in present)
    ranges = coalesce(present)
    name = Interrupted(signum).signal_name
    if rank.is_main:
        manifest = {**manifest, "status": "interrupted", "complete": ranges,
                    "interrupted": {"signal": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "complete_samples": done}}
        try:
            atomic_write_json(out / MANIFEST, manifest)
        except OSError:
            pass  # the chunk files remain the record
    if done == layout.n:
        where = f"all {done} samples are complete in {store.folder}; rerun the same command to pack them"
    else:
        shown = ", ".join(f"{a}..{b - 1}" for a, b in ranges[:4]) + (" ..." if len(ranges) > 4 else "")
        where = (f"{done} of {layout.n} samples are complete in {store.folder}" + (f" ({shown})" if ranges else "")
                 + "; the chunk in flight was discarded; rerun the same command to resume")
    scope = f"{rank}: " if rank.world_size > 1 else ""
    return Interrupted(signum, f"{scope}interrupted by {name}: {where}")


def run_sample(job: SampleJob, progress: Progress | None = None) -> RunResult:
    """Sample indices 0..n-1 into ``job.out`` (this process's share when launched by torchrun).

    Resumes a run of the same configuration found there; rank 0 (the only process without
    torchrun) packs samples.npz / latents and writes the final manifest once every chunk is there.
    SIGINT / SIGTERM stop it cleanly: completed chunks stay, the manifest says "interrupted", and
    ``Interrupted`` (exit status 130 / 143) says how far it got.
    """
    with stop_on_signals():  # a second signal ends the process at once (igengine.jobs.signals)
        try:
            job.validate()
            with using_threads(threads := choose_threads(job.threads)):
                return _run_sample(job, progress, threads)
        except Interrupted as e:
            if str(e) == f"interrupted by {e.signal_name}":  # before any sampling started
                raise Interrupted(e.signum, f"interrupted by {e.signal_name} before sampling started; "
                                  "rerun the command to start") from None
            raise


def _run_sample(job: SampleJob, progress: Progress | None, threads: ThreadChoice) -> RunResult:
    started = time.time()
    progress = progress or Progress()
    rank = RankInfo.from_env()
    ckpt_path = Path(job.ckpt) if job.ckpt is not None else DEFAULT_CHECKPOINT
    overrides = {"encoder_depth": job.encoder_depth, "num_heads": job.num_heads}
    device = resolve_device(job.device, rank.local_rank)  # before reading a checkpoint of gigabytes
    chosen = []
    if job.precision is None:
        job = dataclasses.replace(job, precision=default_precision(device))
        chosen.append(default_precision_note(device, cpu_routes() if device.type == "cpu" else None))
    check_runtime(job.backend, job.precision, device)  # and before making the output folder or an export
    warned = choice_warnings(job.precision, device, job.backend, threads)  # slow or meaningless: said, not refused
    loaded = load_checkpoint(ckpt_path, model_name=job.model, overrides=overrides)
    cfg = loaded.config
    if threads.source == "auto" and device.type == "cpu":
        chosen.append(f"{threads.threads} CPU thread(s) ({threads.why}; choose with `threads` or {THREADS_ENV})")
    sampler_cfg = resolve_sampler_config(job, loaded)
    labels, label_info = resolve_labels(job, cfg.num_classes)
    decode = not job.no_decode
    decoder = resolve_decoder(job, cfg)
    run_key = {
        "checkpoint_sha256": loaded.sha256,
        "model": cfg.to_dict(),
        "sampler": sampler_cfg.to_dict(),
        "seed": job.seed,
        "labels": label_info,
        "backend": BackendName(job.backend).value,
        "decode": decode,
        "vae": decoder.identity if decoder is not None else None,
    }
    out = Path(job.out)
    # The run already in `out` (None with `overwrite`): a foreign or unreadable manifest is refused
    # here with the message prepare_output_folder would give.
    previous = read_manifest(out) if not job.overwrite else None
    chunk_size, chunk_note = resolve_chunk_size(job.chunk_size, out, run_key,
                                                previous if not job.overwrite else _manifest_if_readable(out))
    job = dataclasses.replace(job, chunk_size=chunk_size)
    run_key["chunk_size"] = chunk_size
    if chunk_note:
        chosen.append(chunk_note)
    prepare_output_folder(out, run_key, job.overwrite)
    if previous is not None and isinstance(previous.get("n"), int) and previous["n"] > job.n:
        chosen.append(f"{out} holds a run of {previous['n']} samples; `n` {job.n} packs its first {job.n} "
                      "(the chunks of the others are kept for a later, larger `n`)")
    key = run_key_digest(run_key)[:16]

    keep_latents = job.save_latents is not None or not decode
    latents_path = (str(Path(job.save_latents).resolve()) if job.save_latents is not None
                    else ("latents.npy" if not decode else None))
    factor = decoder.upsample_factor if decoder is not None else 1
    layout = BulkLayout(
        n=job.n, chunk_size=job.chunk_size, chunks_dir=f"{CHUNKS_DIR}/{key}",
        pixels=(cfg.input_size * factor, cfg.input_size * factor, 3) if decode else None,
        latents=cfg.latent_shape if keep_latents else None, latents_path=latents_path,
    )
    removed = _removed_chunks(layout, out, job.n)  # this run's chunks removed after an earlier pack, or None
    with rank_lock(out, rank.rank, rank.world_size) as lock_note:
        store = layout.store(out)
        if removed is not None and int(removed["n"]) == job.n:  # complete in samples.npz: nothing to compute
            return _already_packed(job, out, removed, rank, chosen + list(loaded.notes), started, device, progress,
                                   store, layout)
        store.folder.mkdir(parents=True, exist_ok=True)
        if rank.is_main and job.overwrite:  # chunks of other configurations can never be reused
            for other in (out / CHUNKS_DIR).iterdir():
                if other.is_dir() and other.name != key:
                    shutil.rmtree(other, ignore_errors=True)
        png_dir = None
        if job.png and decode:
            png_dir = out / "png"
            if (moved := prepare_png_dir(png_dir)) is not None:
                chosen.append(moved)
        backend = make_backend(job, loaded, device, setup := SetupLog(progress.log))  # an export says so
        # Fused guidance + update kernels for fp32/bf16/fp16 when a library is built; else the reference loop.
        # Each fast rung is first compared with the reference on this device (igengine.jobs.preflight); a fast
        # loop (or a compiled network) that fails later falls back, with one line here (Sampler's ladder).
        scope = f"{rank}: " if rank.world_size > 1 else ""
        sampler, backend, preflight = preflight_sampler(
            backend, loaded, sampler_cfg, device, capture=job.capture, mode=job.preflight, seed=job.seed,
            labels=labels[:2], n=job.n, setup=setup, log=progress.log,
            on_fallback=lambda event: progress.log(f"{scope}warning: {event.message}"))
        if decoder is not None:
            decoder.to(device)
        for line in chosen:  # only once the request is known to be good: a refusal stays one line
            progress.log(line)
        for line in warned if rank.is_main else ():
            progress.log(f"warning: {line}")
        manifest = _manifest(job, loaded, ckpt_path, cfg, sampler_cfg, sampler, backend, run_key, label_info, labels,
                             decoder, layout, rank, png_dir is not None, threads)
        manifest["preflight"] = preflight
        if warned:
            manifest["warnings"] = warned
        if rank.is_main:
            atomic_write_json(out / MANIFEST, manifest)
        make = SampleMaker(sampler, job.seed, labels, decoder, cfg.family, pixels=decode)
        bulk = BulkSampler(store, layout.plan, rank, labels.numpy(), make, job.batch_size, keep_latents, png_dir,
                           progress, started=started)
        t0 = time.perf_counter()
        setup_s = time.time() - started  # checkpoint, backend (an export into the cache) before the loop
        try:
            if removed is not None:  # a larger n: first the earlier run's chunks this rank needs, from samples.npz
                _rebuild_chunks(store, layout, rank, removed, labels, progress)
            report = bulk.run_rank()
            if rank.is_main:
                bulk.wait_for_all()
            wall = time.perf_counter() - t0
            progress.finish()
            notes = chosen + list(loaded.notes) + report.notes + ([lock_note] if lock_note else [])
            if rank.is_main and report.initial_done == job.n:  # a rerun of a finished run: say so
                notes.append(f"all {job.n} samples were already complete in {out}: nothing was computed (the "
                             "outputs were packed again from its chunks)")
                progress.log(notes[-1])
            new = (job.n - report.initial_done) if rank.is_main else report.computed
            rate = new / wall if wall > 0 else 0.0
            if rank.is_main:
                manifest["timing"] = {"wall_s": round(wall, 3), "samples_per_s": round(rate, 3),
                                      "computed_this_session": new, "already_complete": report.initial_done,
                                      "setup_s": round(setup_s, 3), **setup.timing()}
                # The backend's facts as they stand after sampling (the compiled backend's warm-up
                # time, compiles and recompiles are only known now; at the start they read 0).
                manifest["backend"] = {**manifest["backend"], **backend.describe()}
                # Which loop (and network) computed each range of samples, and why (every rank's chunks).
                manifest["computed_by"] = bulk.computed_by()
                if sampler.fallbacks:
                    manifest["fallbacks"] = [f.to_dict() for f in sampler.fallbacks]
                manifest["notes"] = notes
                if removed is not None:  # every chunk is here again (rebuilt, grown): they are the record, not
                    clear_removed(store)  # the samples.npz the pack is about to replace
                manifest = pack_folder(out, manifest, digest=not job.keep_chunks)
                if not job.keep_chunks:  # only now: samples.npz written, fsynced, read back and checked
                    manifest = remove_chunks(out, manifest, layout, log=progress.log)
                if job.grid and decode:
                    manifest = write_run_grid(out, manifest, label_info, cfg.num_classes)
        except (Interrupted, KeyboardInterrupt) as e:
            stop_received()  # not raised again while the manifest records where the run stands
            progress.finish()
            raise _interrupted(e, out, manifest, layout, store, rank) from None
        if rank.is_main and job.evaluate is not None and decode:
            manifest = _evaluate(out, job, device, manifest, progress)
    return RunResult(manifest, out, wall, rate, notes, report.computed, report.reused, rank)


def _removed_chunks(layout: BulkLayout, out: Path, n: int) -> dict | None:
    """``removed.json`` of this run's chunk folder (its chunks were removed after packing), or None; checked
    before anything runs: a smaller `n` is refused (packing its first samples would replace the only copy of
    the others), and so is a run whose packed files are no longer those the record describes."""
    store = layout.store(out)
    removed = read_removed(store) if store.folder.is_dir() else None
    if removed is None:
        return None
    if int(removed["n"]) > n:
        raise JobError(f"{out} holds a run of {removed['n']} samples whose chunks were removed after packing "
                       f"(`keep_chunks` off): `n` {n} would replace its samples.npz with the first {n}, losing the "
                       f"others; take them from samples.npz (arr_0[:{n}]), or sample into another `out`")
    if (why := packed_files_match(removed)) is not None:
        raise OutputError(f"the chunks of the run in {out} were removed after packing (`keep_chunks` off) and {why}: "
                          "they cannot be rebuilt nor the run taken as complete; put the packed file back, or sample "
                          "into another `out`")
    return removed


def _already_packed(job: SampleJob, out: Path, removed: dict, rank: RankInfo, notes: list[str], started: float,
                    device: torch.device, progress: Progress, store, layout: BulkLayout) -> RunResult:
    """The same `n` as a run whose chunks were removed after packing: its packed files (checked by
    ``_removed_chunks``) hold every sample. With `keep_chunks` off, chunk files a removal stopped half-way
    left are removed too (the record was written before the first went)."""
    if rank.is_main and not job.keep_chunks:
        for c in layout.plan.chunks:
            store.path(c).unlink(missing_ok=True)
    names = ", ".join(Path(f["path"]).name for f in removed["files"].values())
    notes = notes + [f"all {job.n} samples are complete in {names} (its chunks were removed after it was verified "
                     "against them); nothing to compute"]
    manifest = read_manifest(out) or {}
    if rank.is_main:
        manifest["timing"] = {**manifest.get("timing", {}), "wall_s": 0.0, "samples_per_s": 0.0,
                              "computed_this_session": 0, "already_complete": job.n,
                              "setup_s": round(time.time() - started, 3)}
        manifest["notes"] = notes
        atomic_write_json(out / MANIFEST, manifest)
        for line in notes[-1:]:
            progress.log(line)
        if job.evaluate is not None and not job.no_decode:
            manifest = _evaluate(out, job, device, manifest, progress)
    return RunResult(manifest, out, 0.0, 0.0, notes, 0, job.n, rank)


def _rebuild_chunks(store, layout: BulkLayout, rank: RankInfo, removed: dict, labels: torch.Tensor,
                    progress: Progress) -> None:
    """This rank's chunks of the earlier, smaller run, rebuilt from its packed files (``restore_chunks``)."""
    rebuilt = restore_chunks(store, layout.plan.for_rank(rank.rank, rank.world_size), removed, labels.numpy(),
                             checked=True)  # by _removed_chunks
    if rebuilt:
        scope = f"{rank}: " if rank.world_size > 1 else ""
        progress.log(f"{scope}rebuilt {len(rebuilt)} chunk file(s) of the earlier {removed['n']}-sample run from its "
                     "packed files (its chunks were removed after packing)")


def _evaluate(out: Path, job: SampleJob, device: torch.device, manifest: dict, progress: Progress) -> dict:
    """`igengine evaluate` of the packed samples against ``job.evaluate``: metrics.json, and the manifest's entry."""
    from igengine.jobs.evaluate import evaluate_samples, manifest_entry

    progress.log(f"evaluating {out / SAMPLES} against {job.evaluate}")
    try:
        record = evaluate_samples(out / SAMPLES, Path(job.evaluate), device=str(device), batch_size=job.batch_size)
    except Interrupted as e:  # not "before sampling started": the samples are there
        raise Interrupted(e.signum, f"interrupted by {e.signal_name} while evaluating: the {job.n} samples are "
                          f"complete in {out / SAMPLES}; to evaluate them, run `igengine evaluate {out} --ref "
                          f"{job.evaluate}`") from None
    shown = ", ".join(f"{k} {v:.6g}" for k, v in record["metrics"].items()
                      if k in ("fid", "sfid", "kid", "inception_score", "precision", "recall") and v is not None)
    progress.log(f"{shown or 'no metric could be computed'} against {job.evaluate} "
                 f"(all metrics: {record['metrics_file']})")
    manifest = dict(manifest)
    manifest["evaluation"] = json.loads(json.dumps(manifest_entry(record), default=str))
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _manifest(job, loaded, ckpt_path, cfg, sampler_cfg, sampler, backend, run_key, label_info, labels, decoder,
              layout: BulkLayout, rank: RankInfo, png: bool, threads: ThreadChoice) -> dict:
    outputs: dict[str, Any] = {"chunks": layout.chunks_dir + "/"}
    if layout.pixels is not None:
        outputs["samples"] = SAMPLES
        outputs["pixel_conversion"] = PIXEL_CONVERSION[cfg.family]
        if png:
            outputs["png"] = "png/"
            outputs["png_layout"] = "png/<index // 1000:06d>/<index:06d>.png"
    if layout.latents_path is not None:
        outputs["latents"] = layout.latents_path
        if layout.pixels is None:
            outputs["labels"] = labels.tolist() if job.n <= 100_000 else "see the chunks' labels"
    return {
        "igengine": {"version": igengine.__version__, "commit": igengine_commit()},
        "run_key": run_key,
        "status": "running",
        "checkpoint": {"path": str(ckpt_path), "sha256": loaded.sha256, "weights": loaded.weights,
                       "resolution_notes": loaded.notes},
        "model": cfg.to_dict(),
        "sampler": {**sampler_cfg.to_dict(), "nfe_per_sample": sampler.plan.nfe,
                    "time_convention": TIME_CONVENTION[cfg.family]},
        "seed": job.seed,
        "labels": label_info,
        "n": job.n,
        "precision": sampler_cfg.precision.value,
        "backend": {**backend.describe(), "step": sampler.path, "kernels": sampler.kernel_build,
                    "noise_generator": sampler.generator},
        "vae": decoder.describe() if decoder is not None else None,
        "batch_size": job.batch_size,
        "world_size": rank.world_size,
        "cpu_threads": {**threads.to_dict(), "threads": torch.get_num_threads()},
        "noise_contract": "igengine.noise: Philox4x32-10, key=(seed lo, hi), counter=(block, stream, index lo, hi)",
        "bulk": layout.to_dict(),
        "outputs": outputs,
        "complete": [],  # filled by the pack; until then the valid chunk files are the record
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

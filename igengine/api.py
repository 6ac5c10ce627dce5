"""The Python API: load a checkpoint once, then draw samples in memory.

    import igengine

    pipe = igengine.load()                          # the embedded digits model, with its own sampler defaults
    images = pipe.images([3, 1, 4], seed=0)         # uint8 [3, 8, 8, 3]: indices 0, 1, 2 with classes 3, 1, 4
    latents = pipe.sample("balanced", seed=0, indices=range(8))   # float32 [8, 1, 8, 8], on the CPU

``igengine.load`` resolves everything exactly as ``igengine sample`` does (the same functions of
``igengine.jobs.sample``): the checkpoint's config, its own recommended sampler settings over the
paper's (the digits model's 50 steps, not the paper's 250), your overrides over both, the
precision (``reference`` on the CPU, ``bf16`` on CUDA), the backend and, for latent models, the VAE.
So ``pipe.images(labels, seed=s, indices=ix)`` gives sample i the numbers that index i of
``igengine sample --seed s`` with those labels writes to samples.npz, and ``pipe.sample`` the latents
that ``--save-latents`` writes (up to the network's floating-point reassociation across batch
compositions: README, "Bulk generation").

Nothing is written to disk. Errors are the one-line ``igengine.errors`` exceptions (``JobError``,
``CheckpointError``, ...), never a bare traceback from deep inside.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from igengine.backends.cpu_linear import routes as cpu_routes
from igengine.config import BackendName, ModelConfig, Precision, SamplerConfig, Solver
from igengine.errors import JobError
from igengine.jobs.advice import precision_warnings
from igengine.jobs.preflight import preflight_sampler
from igengine.jobs.sample import (DEFAULT_CHECKPOINT, SampleJob, make_backend, resolve_decoder, resolve_device,
                                  resolve_sampler_config)
from igengine.models.checkpoint import load_checkpoint
from igengine.noise import balanced_labels, check_seed, random_labels
from igengine.precision import default_precision, default_precision_note
from igengine.sampling import Sampler
from igengine.vae import LatentDecoder
from igengine.vae.pixels import to_uint8

Labels = Union[int, str, Sequence[int], np.ndarray, torch.Tensor]
Indices = Union[Sequence[int], range, np.ndarray, torch.Tensor]
LABEL_MODES = ("random", "balanced")


class Pipeline:
    """A loaded checkpoint ready to sample: network, sampler and (where there are pixels) decoder.

    Made by ``igengine.load``. Holds no state between calls: every result is a pure function of
    ``(seed, index, label)`` (the noise contract), whatever the batch or the order of ``indices``.

    Attributes: ``config`` (the model's ``ModelConfig``), ``sampler_config`` (the resolved
    ``SamplerConfig``: solver, steps, guidance, precision), ``num_classes``, ``device``,
    ``precision``, ``decodes`` (whether ``images`` can run), ``batch_size``, ``sampler`` (the low-level
    ``igengine.sampling.Sampler``), ``notes`` (how things were resolved), ``checkpoint`` (its path) and
    ``preflight`` (what ``igengine.load`` compared before trusting the fast rungs: the manifest entry of a run).
    """

    def __init__(self, *, sampler: Sampler, config: ModelConfig, sampler_config: SamplerConfig,
                 decoder: LatentDecoder | None, device: torch.device, batch_size: int, checkpoint: Path,
                 notes: list[str]):
        self.sampler = sampler
        self.config = config
        self.sampler_config = sampler_config
        self.device = device
        self.batch_size = batch_size
        self.checkpoint = checkpoint
        self.notes = notes
        self.preflight: dict | None = None
        self._decoder = decoder

    # -- what it is -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def precision(self) -> Precision:
        return self.sampler_config.precision

    @property
    def decodes(self) -> bool:
        """True for pixel-space models and for latent models loaded with a ``vae``."""
        return self.config.pixel_space or self._decoder is not None

    def __repr__(self) -> str:
        s = self.sampler_config
        return (f"Pipeline({self.config.name}, {s.solver.value} {s.steps} steps, cfg {s.guidance.cfg_scale}, "
                f"ig {s.guidance.ig_scale}, {self.precision.value} on {self.device}, "
                f"{'decodes' if self.decodes else 'latents only'})")

    # -- requests -------------------------------------------------------------------------------
    def resolve(self, labels: Labels, seed: int = 0,
                indices: Indices | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, indices) as int64 tensors of one length, checked, exactly as a call would use them.

        labels: a class id per sample (list, array, tensor); one class id for every index (int);
        'random' (the noise contract's label of (seed, index), as `--labels random`) or 'balanced'
        (index mod num_classes). indices: the sample indices (default: 0..len(labels)-1, which needs
        labels with a length).
        """
        try:
            seed = check_seed(seed)
        except (TypeError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) else f"`seed` must be an integer, got {seed!r}"
            raise JobError(why) from None
        if isinstance(labels, str) and labels not in LABEL_MODES:  # before asking for `indices` it would not fix
            raise JobError(f"`labels` {labels!r} is not a label mode: use 'random', 'balanced', one class id, "
                           "or a class id per sample")
        per_sample = not isinstance(labels, (str, int, np.integer)) and not (
            isinstance(labels, torch.Tensor) and labels.ndim == 0)
        if indices is None:
            if not per_sample:
                raise JobError(f"`indices` is needed with `labels` {labels!r} (it gives no count): "
                               "e.g. indices=range(16)")
            count = len(labels)
            idx = torch.arange(count, dtype=torch.int64)
        else:
            idx = _as_int_vector(indices, "indices")
            if idx.numel() and int(idx.min()) < 0:
                raise JobError(f"sample `indices` must be >= 0, got {int(idx.min())}")
        if idx.numel() == 0:
            raise JobError("no samples asked for: `indices` (or `labels`) is empty")
        if isinstance(labels, str):
            if labels == "random":
                lab = random_labels(seed, idx.numpy(), self.num_classes)
            else:  # "balanced" (any other string was refused above)
                lab = balanced_labels(idx.numpy(), self.num_classes)
            lab = torch.as_tensor(lab, dtype=torch.int64)
        elif per_sample:
            lab = _as_int_vector(labels, "labels")
            if lab.numel() != idx.numel():
                raise JobError(f"{lab.numel()} `labels` for {idx.numel()} sample `indices`")
        else:
            lab = torch.full((idx.numel(),), int(_as_int_vector([labels], "labels")[0]), dtype=torch.int64)
        bad = lab[(lab < 0) | (lab >= self.num_classes)]
        if bad.numel():
            raise JobError(f"`labels` class {int(bad[0])} is outside [0, {self.num_classes}) for {self.config.name}")
        return lab, idx

    def sample(self, labels: Labels, seed: int = 0, indices: Indices | None = None) -> torch.Tensor:
        """Final latents float32 [N, C, h, w] on the CPU (for pixel-space models: images in [-1, 1]).

        Sample k is index ``indices[k]`` of ``seed`` with class ``labels[k]`` (see ``resolve``),
        computed in batches of ``batch_size``.
        """
        lab, idx = self.resolve(labels, seed, indices)
        return torch.cat([self.sampler(seed, idx[s:s + self.batch_size], lab[s:s + self.batch_size]).cpu()
                          for s in range(0, idx.numel(), self.batch_size)])

    def images(self, labels: Labels, seed: int = 0, indices: Indices | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] pixels (samples.npz's ``arr_0`` format) of the same samples as ``sample``."""
        self._require_pixels()
        lab, idx = self.resolve(labels, seed, indices)
        out = []
        for s in range(0, idx.numel(), self.batch_size):
            x = self.sampler(seed, idx[s:s + self.batch_size], lab[s:s + self.batch_size])
            out.append(self._to_pixels(x))
        return np.concatenate(out)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents from ``sample`` -> uint8 [N, H, W, 3] pixels, as ``images`` makes them."""
        self._require_pixels()
        latents = torch.as_tensor(latents)
        if tuple(latents.shape[1:]) != tuple(self.config.latent_shape) or latents.ndim != 4:
            raise JobError(f"`latents` must be [N, {', '.join(map(str, self.config.latent_shape))}] for "
                           f"{self.config.name}, got {list(latents.shape)}")
        return np.concatenate([self._to_pixels(latents[s:s + self.batch_size].to(self.device, torch.float32))
                               for s in range(0, latents.shape[0], self.batch_size)])

    def _to_pixels(self, x: torch.Tensor) -> np.ndarray:
        images = self._decoder.decode(x) if self._decoder is not None else x
        return to_uint8(images, self.config.family)

    def _require_pixels(self) -> None:
        if not self.decodes:
            raise JobError(f"{self.config.name} samples VAE latents and was loaded without a `vae`: pass "
                           "igengine.load(..., vae=PATH) to get images, or use .sample() for the latents")


def load(ckpt: str | Path | None = None, *, model: str | None = None, precision: Precision | str | None = None,
         device: str = "auto", backend: BackendName | str = "torch", vae: str | Path | None = None,
         vae_kind: str = "auto", latent_stats: str | Path | None = None, latent_multiplier: float = 1.0,
         encoder_depth: int | None = None, num_heads: int | None = None, onnx: str | Path | None = None,
         batch_size: int = 64, solver: Solver | str | None = None, steps: int | None = None,
         cfg_scale: float | None = None, cfg_interval: tuple[float, float] | None = None,
         ig_scale: float | None = None, ig_interval: tuple[float, float] | None = None,
         timestep_shift: float | None = None, ig_scale_uncond: float | None = None, capture: str = "auto",
         preflight: str = "auto") -> Pipeline:
    """Load a checkpoint (default: the embedded digits model) into a ``Pipeline``.

    Every argument means what the `igengine sample` flag of the same name means, and None means the
    same default: the checkpoint's own sampler settings (``solver`` ... ``timestep_shift``) over the
    paper's; ``precision`` None: ``reference`` on the CPU, ``bf16`` on CUDA; ``vae`` (and, for VA-VAE and
    the RAE decoder, ``latent_stats``) for latent models whose images you want. ``batch_size`` bounds the samples per
    network batch (results do not depend on it beyond floating-point reassociation). ``capture``:
    'auto' replays whole steps from CUDA graphs on a GPU where the backend allows it, 'off' never.
    A fast loop (or a compiled backend) that fails falls back to a slower one with the same results
    and a ``igengine.sampling.FallbackWarning`` (``pipe.sampler.fallbacks`` keeps them).
    ``preflight``: 'auto' compares each fast rung (fused kernels, CUDA graphs, compiled network) with the
    reference on this device first and demotes one that disagrees, with a warning (``Pipeline.preflight``
    says what was compared); 'off' skips that.
    """
    overrides: dict[str, Any] = {
        "solver": _enum(Solver, solver, "solver"), "steps": steps, "cfg_scale": cfg_scale,
        "cfg_interval": _interval(cfg_interval, "cfg_interval"), "ig_scale": ig_scale,
        "ig_interval": _interval(ig_interval, "ig_interval"), "timestep_shift": timestep_shift,
        "ig_scale_uncond": ig_scale_uncond,
    }
    # The request as `igengine sample` would get it, resolved by the same functions below. `out` is
    # never used (nothing is written); n only sizes a compiled backend's row counts.
    job = SampleJob(out=Path("."), n=max(1, batch_size), batch_size=batch_size, preflight=preflight,
                    ckpt=Path(ckpt) if ckpt is not None else None,
                    model=model, encoder_depth=encoder_depth, num_heads=num_heads,
                    precision=_enum(Precision, precision, "precision"), device=device,
                    backend=_enum(BackendName, backend, "backend"), onnx=Path(onnx) if onnx is not None else None,
                    vae=Path(vae) if vae is not None else None, vae_kind=vae_kind,
                    latent_stats=Path(latent_stats) if latent_stats is not None else None,
                    latent_multiplier=latent_multiplier, capture=capture, **overrides)
    job.validate()
    if job.vae is None and job.latent_stats is not None:
        raise JobError("`latent_stats` belongs to a VA-VAE or an RAE decoder: pass the `vae` it goes with, or drop it")
    ckpt_path = job.ckpt if job.ckpt is not None else DEFAULT_CHECKPOINT
    dev = resolve_device(job.device)
    loaded = load_checkpoint(ckpt_path, model_name=model, overrides={"encoder_depth": encoder_depth,
                                                                     "num_heads": num_heads})
    cfg = loaded.config
    notes = list(loaded.notes)
    if job.precision is None:
        job = dataclasses.replace(job, precision=default_precision(dev))
        notes.insert(0, default_precision_note(dev, cpu_routes() if dev.type == "cpu" else None))
    for line in precision_warnings(job.precision, dev, job.backend):  # as `igengine sample` warns (tf32, fp16 on a CPU)
        warnings.warn(line, RuntimeWarning, stacklevel=2)
    # Latents only, unless there is something to decode them with (pixel-space models need nothing).
    job = dataclasses.replace(job, no_decode=not cfg.pixel_space and job.vae is None)
    sampler_cfg = resolve_sampler_config(job, loaded)
    decoder = resolve_decoder(job, cfg)
    net = make_backend(job, loaded, dev)
    sampler, net, checked = preflight_sampler(net, loaded, sampler_cfg, dev, capture=job.capture, mode=job.preflight)
    if decoder is not None:
        decoder.to(dev)
    pipe = Pipeline(sampler=sampler, config=cfg, sampler_config=sampler_cfg, decoder=decoder, device=dev,
                    batch_size=batch_size, checkpoint=Path(ckpt_path), notes=notes)
    pipe.preflight = checked
    return pipe


def _enum(kind, value, name: str):
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise JobError(f"unknown `{name}` {value!r}; choose one of {', '.join(k.value for k in kind)}") from None


def _interval(value, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise JobError(f"`{name}` must be (LOW, HIGH), two numbers, got {value!r}") from None
    return lo, hi


def _as_int_vector(values, name: str) -> torch.Tensor:
    """A flat int64 CPU tensor of whole numbers, or JobError naming ``name``."""
    try:
        if isinstance(values, torch.Tensor):
            t = values.detach().to("cpu").reshape(-1)
        else:
            t = torch.as_tensor(np.asarray(values)).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise JobError(f"`{name}` must be whole numbers, got {values!r}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise JobError(f"`{name}` must be whole numbers, got {t.dtype}")
    if t.dtype.is_floating_point:
        if not bool(torch.all(t == torch.round(t))):
            raise JobError(f"`{name}` must be whole numbers, got {values!r}")
    return t.to(torch.int64)


__all__ = ["Pipeline", "load"]

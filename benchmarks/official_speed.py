"""Speed against the official IG scripts (CVL-UESTC/Internal-Guidance): same random weights, same settings.

Not a test: it needs a local checkout of the official repository and the official code's dependencies
(timm, einops, fairscale, torchdiffeq, scipy, tqdm), which igengine itself does not use. Run, e.g.:

    python benchmarks/official_speed.py --official-repo PATH/Internal-Guidance            # CPU, B models
    python benchmarks/official_speed.py --official-repo PATH --family sit --steps 2 --repeats 2
    python benchmarks/official_speed.py --official-repo PATH --quick                       # GPU, XL models

What is timed, per family, at the paper settings (docs/CONTRACTS.md, "Guidance"):
  * SiT: the official ``samplers.euler_maruyama_ig_sampler`` (SDE Euler-Maruyama, 250 steps, CFG 1.35
    for t <= 0.7, IG 1.4) on the official ``models.sit`` model as ``generate.py`` builds it (timm
    attention with ``fused_attn`` off, the script's default; float64 sampler state; TF32 allowed);
  * LightningDiT: the official ``transport.Sampler.sample_ode`` (torchdiffeq heun2 on 125 grid points,
    shift 0.3) driving ``LightningDiT.forward_with_cfg`` (CFG 1.45 for t >= 0.19, IG 1.4; it always
    runs the 2N-row batch) on the official ``models.lightningdit`` model with its ``@torch.compile``
    decorators kept (TF32 allowed, as ``inference.py`` sets);
  * igengine, in its configurations (``--igengine-config``): ``reference`` (the official numerics),
    ``fp32`` (fused step kernels when built: ``python -m igengine.kernels.build``), ``onnxruntime``
    (fp32 graph; CPU provider, or CUDA with onnxruntime-gpu), ``bf16``/``fp16``, and ``compiled``
    (``compiled-bf16``, ``compiled-fp16``): the torch.compile backend at that precision.
The same random weights go into both implementations (igengine's model, every parameter random, loaded
strictly into the official module tree); batch N, labels and the initial latents are the same.

Method. A full run (250 SDE steps / 124 Heun intervals) is too slow on a 2-core CPU, so each
implementation runs short WINDOWS of the full paper plan: K consecutive solver steps (``--steps``) at
the plan's own times, once inside the CFG interval and once outside it. The official samplers are
called unchanged and only fed the window's grid: for SiT the sampler module's ``torch.linspace`` is
answered with the window of the paper grid linspace(1, 0.04, 250) (so the sampler runs K stochastic
steps and then, as it always does, its closing deterministic step from the window's last time); for
LightningDiT the ODE object's time grid is replaced by the window of its own shifted 125-point grid.
igengine runs the same steps from its own plan (for SiT the same closing step). The marginal cost of
the K steps is T(K-step window) - T(0-step window) (SiT's 0-step window is the closing step alone), so
per-call costs (initial latents, grids, odeint setup) and the closing step cancel. Each measured
configuration lives in its own worker process (the official LightningDiT needs dynamo enabled, which
official_parity.py disables; separate processes also keep allocators and compile caches apart); after
a warm-up (which includes torch.compile's compilation) the parent times them interleaved: for each
repeat, official, then each igengine configuration, each window inside and outside the interval.
Reported: medians and min-max over repeats of ms per solver step and per network evaluation.

Full-run estimate. From the exact plan (igengine's, the same times and CFG decisions as the official
code): the number of network evaluations inside (CFG: 2N rows) and outside (N rows) the CFG interval
(SiT: 250 steps, 1 evaluation each, the last deterministic step costed as a step of its kind;
LightningDiT: 124 intervals x 2 evaluations, each evaluation by its own time). The official SiT code
also runs N rows outside its interval; the official LightningDiT code runs 2N rows everywhere, which its
outside-window measurement shows. T_full = n_in * c_in + n_out * c_out with c the measured marginal
cost per evaluation; throughput N / T_full; ratio = T_full(official) / T_full(igengine), per repeat
(paired: interleaved measurements) and reported as median and min-max. The estimate covers the solver
loop only: no VAE decoding, no image writing, no per-run setup.

Roofline (``roofline``): before every repeat, while the workers wait, the parent measures the matmul
peak of each implementation's dtype (``measure_peaks``: a square product and the network's largest
linear, through the fastest kernel torch has, and on the CPU ONNX Runtime's MatMul too; fp32 with TF32
for the official code on CUDA); the highest of all serves. With the analytic FLOPs of the full run at each implementation's rows per evaluation
(``igengine.bench.flops``), it reports each implementation's MFU and the ceiling ratio: official full-run
time / (igengine's full-run FLOPs / peak), the most any implementation doing igengine's FLOPs in that
dtype could reach on this machine.

Also recorded: the process CPU time (all threads) of the same windows and the ratio computed from it, a
second view that is less sensitive to other work on a shared machine than wall time (it still counts
spin-waiting threads); the ratio of the best repeats; the load average before each repeat; each worker's
setup and first-call times (the official LightningDiT's first call includes torch.compile, shorter when
inductor's on-disk cache in /tmp/torchinductor_<user> holds an earlier compilation).

Correctness guard (not the parity test, official_parity.py is): during warm-up every worker runs a
1-step window from the start of the plan (outside the CFG interval; the official SiT sampler fed the
noise contract's streams there, via official_parity.contract_noise) and, for LightningDiT, one inside
the interval; each igengine configuration's result is compared with the official one (max abs, rel L2).

Environment. A separate virtual environment with torch 2.13.0 (see README: "Faithfulness"). timm 0.9.16
imports torchvision at import time, and the PyPI torchvision wheel does not load beside torch 2.13.0+cpu;
when ``import torchvision`` fails, the official worker processes (only they) install an import stub for
``torchvision`` (nothing of it is called: the official models use timm's PatchEmbed/Attention/Mlp only),
and the JSON says so. Results: benchmarks/results/official_speed_<device>_<date>.json with provenance,
the official commit (``git`` in the checkout, or ``--official-commit``) and the sha256 of each official
file used. Never commit official code.

Virtual environment that worked (CPU, Python 3.11; only torch 2.13.0 is allowed here):
    python3 -m venv /work/venv-official
    /work/venv-official/bin/pip install torch==2.13.0 timm==0.9.16 einops fairscale torchdiffeq scipy numpy \
        typer rich safetensors pillow onnxruntime onnx onnxscript
    /work/venv-official/bin/pip uninstall -y torchvision      # pulled in by timm; cannot load here (see above)
    /work/venv-official/bin/pip install -e . --no-deps && /work/venv-official/bin/python -m igengine.kernels.build

Official files needed (paths inside the checkout; all a GPU device check has to carry, ~60 kB):
    SiT/models/sit.py  SiT/samplers.py
    LightningDiT/models/__init__.py  LightningDiT/models/lightningdit.py  LightningDiT/models/swiglu_ffn.py
    LightningDiT/models/pos_embed.py  LightningDiT/models/rmsnorm.py
    LightningDiT/transport/__init__.py  LightningDiT/transport/transport.py  LightningDiT/transport/path.py
    LightningDiT/transport/integrators.py  LightningDiT/transport/utils.py
On a GPU machine the official code also needs timm, einops, torchdiffeq, scipy, tqdm and fairscale (imported
by models/rmsnorm.py; a pure-Python wheel: ``pip wheel --no-deps fairscale==0.4.13``, to carry where it
is not installed), and the fused CUDA kernels need ``python -m igengine.kernels.build`` there. With
``--quick`` a device check runs both XL families at the paper batches (32, 128), K = 2, 2 repeats,
igengine fp32 and bf16, all workers of a family set up in parallel; the official LightningDiT's
torch.compile dominates its setup. Not yet run on a GPU: size the call with room to spare.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ================================================================================================
# igengine adapter: the only code that calls igengine's sampler API. Port these two functions to a
# new sampler API and the rest of the file is unchanged.
# ================================================================================================

IGENGINE_CONFIGS = ("reference", "fp32", "bf16", "fp16", "onnxruntime", "compiled", "compiled-bf16", "compiled-fp16")


def igengine_plan_kinds(family: str) -> list[tuple[bool, ...]]:
    """For each solver step of the paper plan of ``family``: the CFG flag of each of its network evaluations."""
    from igengine.config import Family
    from igengine.sampling import build_plan, paper_sampler

    fam = Family(family)
    return [tuple(ev.cfg for ev in s.evals) for s in build_plan(fam, paper_sampler(fam)).steps]


def igengine_step_runner(model, config: str, device: str, work_dir: Path, batch: int) -> tuple[Callable, dict]:
    """A callable running windows of the paper plan with igengine in configuration ``config``, and facts.

    model: an ``igengine.models.IGDiT`` (CPU, eval). config: one of IGENGINE_CONFIGS. work_dir: scratch
    space (the ONNX export, the compile cache). batch: the N of the timed runs (a compiled backend
    specialises to N and 2N rows). Returns (run, facts); ``run(start, count, seed,
    indices, labels)`` runs solver steps start .. start+count-1 of the paper plan (for the SiT SDE,
    then the deterministic closing step from the time of step start+count, as the official sampler
    ends any grid) from the noise contract's initial latents, and returns the final state
    (N, C, H, W) on ``device``.
    """
    from igengine.backends import network
    from igengine.config import Family, Precision
    from igengine.jobs.backend import build_backend
    from igengine.models.checkpoint import LoadedCheckpoint
    from igengine.sampling import ModelFacts, Plan, Sampler, StepKind, build_plan, paper_sampler

    family = model.config.family
    facts: dict = {"config": config}
    # The export/compile caches are keyed by checkpoint digest: a digest of (a sample of) these random weights.
    digest = hashlib.sha256(b"".join(p.detach().flatten()[:1024].float().numpy().tobytes()
                                     for p in model.state_dict().values())).hexdigest()
    loaded = LoadedCheckpoint(model, model.config, Path(f"random-{model.config.name.replace('/', '-')}"),
                              "random", _sha256=digest)
    if config in ("onnxruntime", "compiled"):
        name, precision = config, Precision.FP32
    elif config.startswith("compiled-"):
        name, precision = "compiled", Precision(config.split("-", 1)[1])
    else:
        name, precision = "torch", Precision(config)
    t0 = time.perf_counter()
    os.environ.setdefault("IGENGINE_CACHE", str(work_dir / "cache"))
    backend = build_backend(name, loaded, precision, device, cache_root=work_dir,
                            row_counts=(batch, 2 * batch) if name == "compiled" else None)
    facts["build_s"] = round(time.perf_counter() - t0, 2)
    if name == "onnxruntime":
        facts["providers"] = backend.providers
        if torch.device(device).type == "cuda" and not backend.on_cuda:
            raise RuntimeError("ONNX Runtime has no working CUDA provider here (install onnxruntime-gpu)")
    base = paper_sampler(family)
    full = build_plan(family, dataclasses.replace(base, precision=precision))
    net, model_facts = network(backend), ModelFacts.of(model.config)
    facts["backend"] = backend.describe()

    def window(start: int, count: int) -> Plan:
        steps = full.steps[start : start + count]
        if family == Family.SIT:
            nxt = full.steps[start + count]
            closing = dataclasses.replace(nxt, kind=StepKind.SDE_LAST, t_next=0.0, dt=0.0 - nxt.t_cur,
                                          noise_stream=None)
            steps = steps + (closing,)
        return Plan(full.family, full.solver, full.guidance, steps)

    def run(start: int, count: int, seed: int, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        plan = window(start, count)
        # An empty window (no steps) has nothing for the fused loop to launch: the reference loop returns x_T.
        sampler = Sampler(net, plan, model_facts, precision, torch.device(device),
                          kernels="auto" if plan.steps else "off")
        facts.setdefault("step_path", sampler.path)
        return sampler(seed, indices, labels)

    return run, facts


# ================================================================================================
# The official side. Imported from the checkout, called unchanged; only inputs are fed to it.
# ================================================================================================

OFFICIAL_FILES = {
    "sit": ("SiT/models/sit.py", "SiT/samplers.py"),
    "lightningdit": (
        "LightningDiT/models/__init__.py", "LightningDiT/models/lightningdit.py",
        "LightningDiT/models/swiglu_ffn.py", "LightningDiT/models/pos_embed.py", "LightningDiT/models/rmsnorm.py",
        "LightningDiT/transport/__init__.py", "LightningDiT/transport/transport.py", "LightningDiT/transport/path.py",
        "LightningDiT/transport/integrators.py", "LightningDiT/transport/utils.py",
    ),
}
FAMILY_FOLDER = {"sit": "SiT", "lightningdit": "LightningDiT"}
NULL_CLASS = 1000  # the official samplers' literal null label; the models have 1000 classes here


class _SitGridWindow:
    """Stands in for ``torch`` inside the official SiT sampler module: ``linspace`` returns a window."""

    def __init__(self, full_grid: torch.Tensor):
        self.full = full_grid
        self.window: torch.Tensor | None = None

    def linspace(self, *args, **kwargs):
        if self.window is None:
            return torch.linspace(*args, **kwargs)
        if args[2] != len(self.window):
            raise RuntimeError(f"official sampler asked for {args[2]} grid points, window has {len(self.window)}")
        return self.window.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


def official_runner(repo: Path, family: str, model_name: str, ours, device: str) -> tuple[Callable, dict]:
    """Like igengine_step_runner, for the official code; ``ours`` supplies the weights (loaded strictly)."""
    from benchmarks.official_parity import contract_noise, import_official, stub_torchvision_if_broken
    from igengine.noise import STREAM_INITIAL, gaussian

    facts: dict = {"torchvision": stub_torchvision_if_broken()}
    import timm

    facts["timm"] = timm.__version__
    cfg = ours.config
    module, sampling = import_official(repo, FAMILY_FOLDER[family])
    if family == "sit":
        # As generate.py builds it (its defaults: --fused-attn off, --qk-norm off).
        official = module.SiT_models[model_name](
            input_size=cfg.input_size, num_classes=cfg.num_classes, use_cfg=True,
            encoder_depth=cfg.encoder_depth, fused_attn=False, qk_norm=False,
        )
        facts["attention"] = "timm Attention, fused_attn=False (generate.py default)"
    else:
        # As inference.py builds it from configs/lightningdit_xl_vavae_f16d32.yaml.
        official = module.LightningDiT_models[model_name](
            input_size=cfg.input_size, num_classes=cfg.num_classes, encoder_depth=cfg.encoder_depth,
            use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
            in_channels=cfg.in_channels, learn_sigma=False,
        )
        facts["attention"] = "F.scaled_dot_product_attention (LightningDiT Attention default fused_attn=True)"
        facts["torch_compile_decorators_active"] = hasattr(module.LightningDiTBlock.forward,
                                                           "_torchdynamo_orig_callable")
    official.load_state_dict(ours.state_dict(), strict=True)
    official = official.eval().to(device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # both official sampling scripts set this
    facts["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32) if torch.cuda.is_available() else None

    def initial(seed, indices):
        return gaussian(seed, indices, STREAM_INITIAL, cfg.latent_shape).to(device)

    if family == "sit":
        grid = _SitGridWindow(torch.linspace(1.0, 0.04, 250, dtype=torch.float64))
        sampling.torch = grid

        def run(start, count, seed, indices, labels, contract=False):
            grid.window = grid.full[start : start + count + 1]
            z, y = initial(seed, indices), labels.to(device)
            kwargs = dict(num_steps=count + 1, heun=False, cfg_scale=1.35, sg_scale=1.4, guidance_low=0.0,
                          guidance_high=0.7, sg_guidance_low=0.0, sg_guidance_high=1.0, path_type="linear")
            if contract:  # the correctness guard only (start = 0): the contract's noise streams
                with contract_noise(seed, indices):
                    return sampling.euler_maruyama_ig_sampler(official, z, y, **kwargs)
            return sampling.euler_maruyama_ig_sampler(official, z, y, **kwargs)

        return run, facts

    transport = sampling.create_transport("Linear", "velocity", None, None, None)
    sample_fn = sampling.Sampler(transport).sample_ode(
        sampling_method="heun2", num_steps=125, atol=1e-6, rtol=1e-3, reverse=False, timestep_shift=0.3
    )
    ode = sample_fn.__self__
    full = ode.t.clone()

    def run(start, count, seed, indices, labels, contract=False):
        ode.t = full[start : start + count + 1]
        z, y = initial(seed, indices), labels.to(device)
        zz = torch.cat([z, z], 0)
        yy = torch.cat([y, torch.full_like(y, NULL_CLASS)], 0)
        kwargs = dict(y=yy, cfg_scale=1.45, ig_scale=1.4, cfg_interval=True, cfg_interval_start=0.19)
        return sample_fn(zz, official.forward_with_cfg, **kwargs)[-1][: len(labels)]

    return run, facts


# ================================================================================================
# Worker process: one measured configuration. Protocol: JSON lines on a private copy of stdout.
# ================================================================================================


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {k: dict(counters[k]) for k in ("stats", "frames", "recompiles") if k in counters}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def worker_main(spec: dict) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by the code under test goes to the log, not the protocol

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    from benchmarks.official_parity import randomize_
    from igengine.models import IGDiT, preset

    device, family = spec["device"], spec["family"]
    torch.set_grad_enabled(False)  # as the official sampling scripts do
    work = Path(tempfile.mkdtemp(prefix="official_speed_"))
    t0 = time.perf_counter()
    try:
        cfg = preset(spec["model"])
        ours = IGDiT(cfg)
        randomize_(ours, spec["weights_seed"])
        ours.eval()
        if spec["impl"] == "official":
            run, facts = official_runner(Path(spec["official_repo"]), family, spec["model"], ours, device)
        else:
            run, facts = igengine_step_runner(ours, spec["impl"].split(":", 1)[1], device, work, spec["batch"])
        facts["setup_s"] = round(time.perf_counter() - t0, 2)
        facts["threads"] = torch.get_num_threads()
        facts["torchdynamo_disable_env"] = os.environ.get("TORCHDYNAMO_DISABLE")
        n = spec["batch"]
        seed = spec["seed"]
        indices = torch.arange(n)
        labels = (indices * 97 + 3) % 1000

        def timed(start, count, contract=False):
            """(wall s, process CPU s of all threads, output) of one window run."""
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            out = run(start, count, seed, indices, labels, contract=True) if contract else \
                run(start, count, seed, indices, labels)
            _sync(device)
            return time.perf_counter() - t, time.process_time() - c, out

        # Warm-up (torch.compile compiles on the first call): every window once at 1 step and at 0
        # steps; the 1-step runs of the check windows are kept for the correctness guard.
        warm, checks = {}, {}
        for name, start in spec["windows"].items():
            check = name in spec["check_windows"]
            s1, _, out = timed(start, 1, contract=check and spec["impl"] == "official" and family == "sit")
            s0, _, _ = timed(start, 0)
            warm[name] = {"first_1_step_s": round(s1, 3), "first_0_step_s": round(s0, 3)}
            if check:
                path = work / f"check_{name}.pt"
                torch.save(out.detach().double().cpu(), path)
                checks[name] = str(path)
        facts["warmup"] = warm
        facts["check_files"] = checks
        if spec["impl"] == "official" and family == "lightningdit":
            facts["dynamo_counters_after_warmup"] = dynamo_counters()
        send({"ready": True, "facts": facts})
    except Exception as e:
        send({"ready": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"})
        return 1
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            s, c, _ = timed(cmd["start"], cmd["count"])
            send({"s": s, "cpu_s": c})
        except Exception as e:
            send({"error": f"{type(e).__name__}: {e}"})
    if spec["impl"] == "official" and family == "lightningdit":
        send({"dynamo_counters_at_end": dynamo_counters()})
    return 0


class Worker:
    """A running worker process with a line reader on its protocol pipe."""

    def __init__(self, spec: dict, env: dict, log: Path):
        self.spec = spec
        self.name = spec["impl"]
        self.log = log
        self._log_f = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_f, text=True,
                                     env=env, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.facts: dict | None = None
        self.error: str | None = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s (log: {self.log})") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()}): {last_line(self.log)}")
        return json.loads(line)

    def wait_ready(self, timeout: float) -> bool:
        try:
            msg = self.receive(timeout)
        except (TimeoutError, RuntimeError) as e:
            self.error = str(e)
            self.close(kill=True)
            return False
        if not msg.get("ready"):
            self.error = msg.get("error", "failed")
            self.close(kill=True)
            return False
        self.facts = msg["facts"]
        return True

    def time(self, start: int, count: int, timeout: float) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps({"op": "time", "start": start, "count": count}) + "\n")
        self.proc.stdin.flush()
        msg = self.receive(timeout)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg["s"], msg["cpu_s"]

    def close(self, kill: bool = False) -> dict:
        tail: dict = {}
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    msg = self.receive(60)
                    if isinstance(msg, dict):
                        tail = msg
                except (OSError, TimeoutError, RuntimeError, ValueError):
                    pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_f.close()
        return tail


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


# ================================================================================================
# Parent: windows, interleaved timing, full-run estimate, report.
# ================================================================================================

DEFAULT_MODELS = {"cpu": {"sit": "SiT-B/2", "lightningdit": "LightningDiT-B/1"},
                  "cuda": {"sit": "SiT-XL/2", "lightningdit": "LightningDiT-XL/1"}}
DEFAULT_BATCH = {"cpu": {"sit": 2, "lightningdit": 2}, "cuda": {"sit": 32, "lightningdit": 128}}
PAPER = {
    "sit": "SDE Euler-Maruyama, 250 steps, CFG 1.35 for t <= 0.7, IG 1.4; official: float64 state, fp32 model, "
           "TF32 allowed, timm attention (fused_attn off); paper batch 32 per GPU (gen.sh: 64)",
    "lightningdit": "heun2 (torchdiffeq fixed grid) on 125 points, shift 0.3, CFG 1.45 for t >= 0.19, IG 1.4; "
                    "official: fp32, TF32 allowed, @torch.compile kept, forward_with_cfg on 2N rows always; "
                    "paper batch 128 per GPU",
}


def choose_windows(kinds: list[tuple[bool, ...]], count: int, family: str) -> dict[str, int]:
    """First start of a window of ``count`` steps whose evaluations are all outside / all inside CFG.

    SiT windows also cover step start+count (the closing step runs at that step's time).
    """
    span = count + 1 if family == "sit" else count
    found: dict[str, int] = {}
    for start in range(len(kinds) - span + 1 if family == "lightningdit" else len(kinds) - span):
        flags = {f for k in kinds[start : start + span] for f in k}
        if len(flags) == 1:
            found.setdefault("in" if flags == {True} else "out", start)
    missing = {"in", "out"} - set(found)
    if missing:
        raise SystemExit(f"official_speed: no {'/'.join(sorted(missing))} window of {count} steps in the "
                         f"{family} plan; use a smaller --steps")
    return {"in": found["in"], "out": found["out"]}


def stats(values: list[float], scale: float = 1.0, digits: int = 2) -> dict:
    v = [x * scale for x in values]
    return {"median": round(statistics.median(v), digits), "min": round(min(v), digits),
            "max": round(max(v), digits), "n": len(v)}


def official_commit(repo: Path, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; pass --official-commit)"


def bench_family(args, family: str, device: str, logs: Path) -> dict:
    model = args.model.get(family) or DEFAULT_MODELS[device.split(":")[0]][family]
    batch = args.batch_size or DEFAULT_BATCH[device.split(":")[0]][family]
    kinds = igengine_plan_kinds(family)
    count = args.steps
    windows = choose_windows(kinds, count, family)
    evals_per_step = len(kinds[0])
    n_in = sum(f for k in kinds for f in k)
    n_out = sum(not f for k in kinds for f in k)
    check_windows = ["out"] if family == "sit" else ["out", "in"]
    impls = ["official"] + [f"igengine:{c}" for c in args.igengine_config]
    base_spec = dict(family=family, model=model, device=device, batch=batch, seed=args.seed,
                     weights_seed=args.weights_seed, windows=windows, check_windows=check_windows,
                     official_repo=str(args.official_repo))
    report: dict = {
        "model": model, "batch": batch, "paper_settings": PAPER[family],
        "window_steps": count, "repeats": args.repeats,
        "windows": {k: {"start_step": s, "evaluations_cfg": [kinds[i] for i in range(s, s + count)]}
                    for k, s in windows.items()},
        "full_plan": {"solver_steps": len(kinds), "evaluations_per_step": evals_per_step,
                      "evaluations_inside_cfg": n_in, "evaluations_outside_cfg": n_out},
        "implementations": {},
    }
    print(f"[{family}] {model}, batch {batch}, windows {windows}, {count} steps each; starting workers", flush=True)
    workers: list[Worker] = []
    for impl in impls:
        env = dict(os.environ)
        dynamo_off = impl == "official" and family == "lightningdit" and args.official_compile == "off"
        env["TORCHDYNAMO_DISABLE"] = "1" if dynamo_off else "0"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        w = Worker(dict(base_spec, impl=impl), env, logs / f"{family}_{impl.replace(':', '_')}.log")
        workers.append(w)
        if not args.parallel_setup:
            ok = w.wait_ready(args.setup_timeout)
            print(f"  {impl}: {'ready ' + json.dumps(w.facts.get('warmup')) if ok else 'FAILED: ' + w.error}",
                  flush=True)
            if impl == "official" and not ok:
                break  # nothing to compare with
    if args.parallel_setup:
        for w in workers:
            ok = w.wait_ready(args.setup_timeout)
            print(f"  {w.name}: {'ready' if ok else 'FAILED: ' + w.error}", flush=True)
    alive = [w for w in workers if w.error is None]
    official = next((w for w in alive if w.name == "official"), None)
    times: dict = {w.name: {k: {"K": [], "0": [], "cpu_K": [], "cpu_0": []} for k in windows} for w in alive}
    loads = []
    peaks_per_repeat: list[dict] = []
    if official is None:
        report["error"] = "the official worker did not start: " + next(w.error for w in workers if w.name == "official")
    else:
        for r in range(args.repeats):
            loads.append([round(x, 2) for x in os.getloadavg()])
            peaks_per_repeat.append(measure_peaks(impls, model, device, batch))
            for k, start in windows.items():
                # Interleaved: every configuration on this window, in an order rotated each repeat.
                order = alive[r % len(alive):] + alive[: r % len(alive)]
                for w in order:
                    try:
                        rec = times[w.name][k]
                        for steps, key in ((count, "K"), (0, "0")):
                            wall, cpu = w.time(start, steps, args.step_timeout)
                            rec[key].append(wall)
                            rec["cpu_" + key].append(cpu)
                    except (RuntimeError, TimeoutError) as e:
                        w.error = str(e)
                        alive.remove(w)
                        w.close(kill=True)
                if not alive or official not in alive:
                    break
            if official not in alive:
                report["error"] = f"the official worker failed: {official.error}"
                break
            print(f"  repeat {r + 1}/{args.repeats} done, load {loads[-1]}", flush=True)
    report["load_average_per_repeat"] = loads
    ends = {w.name: (w.close() if w.error is None else {}) for w in workers}

    # Correctness guard: each igengine configuration against the official output.
    ref = {}
    if official is not None and official.facts:
        ref = {k: torch.load(p) for k, p in official.facts.get("check_files", {}).items()}
    per_repeat_full: dict = {}
    per_repeat_cpu: dict = {}
    for w in workers:
        row: dict = {}
        if w.facts is not None:
            row["facts"] = {k: v for k, v in w.facts.items() if k != "check_files"}
        if ends.get(w.name):
            row["facts"] = {**row.get("facts", {}), **ends[w.name]}
        if w.error is not None:
            row["error"] = w.error
        t = times.get(w.name)
        if t and all(len(t[k]["K"]) == args.repeats for k in windows):
            marg = {k: [(a - b) / count for a, b in zip(t[k]["K"], t[k]["0"])] for k in windows}
            row["ms_per_step"] = {k: stats(marg[k], 1e3) for k in windows}
            row["ms_per_evaluation"] = {k: stats(marg[k], 1e3 / evals_per_step) for k in windows}
            cpu = {k: [(a - b) / count for a, b in zip(t[k]["cpu_K"], t[k]["cpu_0"])] for k in windows}
            row["process_cpu_ms_per_step"] = {k: stats(cpu[k], 1e3) for k in windows}
            row["raw_window_s"] = {k: {"K_steps": [round(x, 4) for x in t[k]["K"]],
                                       "0_steps": [round(x, 4) for x in t[k]["0"]]} for k in windows}
            full = [(n_in * marg["in"][i] + n_out * marg["out"][i]) / evals_per_step for i in range(args.repeats)]
            per_repeat_full[w.name] = full
            row["full_run_s"] = stats(full, 1.0, 3)
            row["samples_per_s"] = round(batch / statistics.median(full), 4)
            per_repeat_cpu[w.name] = [(n_in * cpu["in"][i] + n_out * cpu["out"][i]) / evals_per_step
                                      for i in range(args.repeats)]
        if w.name != "official" and w.facts is not None and ref:
            checks = {}
            for k, p in w.facts.get("check_files", {}).items():
                a, b = torch.load(p), ref.get(k)
                if b is not None:
                    checks[k] = {"max_abs": float((a - b).abs().max()),
                                 "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30))}
            row["vs_official_1_step"] = checks
        report["implementations"][w.name] = row
    report["roofline"] = roofline(report, family, model, device, batch, n_in, n_out, peaks_per_repeat)
    off_full = per_repeat_full.get("official")
    if off_full:
        for name, full in per_repeat_full.items():
            if name != "official":
                row = report["implementations"][name]
                row["ratio_vs_official"] = stats([o / f for o, f in zip(off_full, full)], 1.0, 3)
                row["ratio_vs_official_best_of_repeats"] = round(min(off_full) / min(full), 3)
                row["ratio_vs_official_process_cpu_time"] = stats(
                    [o / f for o, f in zip(per_repeat_cpu["official"], per_repeat_cpu[name])], 1.0, 3)
    return report


def peak_dtype(impl: str, device_kind: str) -> tuple[str, bool]:
    """(dtype, TF32) of the matmuls an implementation runs: the official code fp32 with TF32 allowed
    (TF32 only exists on CUDA), igengine's configurations their precision's network dtype (fp32 IEEE)."""
    if impl == "official":
        return "float32", device_kind == "cuda"
    config = impl.split(":", 1)[1]
    for low in ("bf16", "fp16"):
        if config.endswith(low):
            return {"bf16": "bfloat16", "fp16": "float16"}[low], False
    return "float32", False


def evaluation_rows(impl: str, family: str, batch: int) -> dict[str, int]:
    """Network rows per evaluation inside / outside the CFG interval: the official LightningDiT runs
    its 2N-row ``forward_with_cfg`` everywhere; the official SiT code and igengine run N rows outside."""
    outside = 2 * batch if (impl == "official" and family == "lightningdit") else batch
    return {"in": 2 * batch, "out": outside}


def network_gemm(model: str, batch: int) -> tuple[int, int, int]:
    """(m, k, n) of the network's largest linear layer at a CFG evaluation (2N rows): the MLP's first."""
    from igengine.bench.flops import mlp_input_width, tokens_per_row
    from igengine.models import preset

    cfg = preset(model)
    return 2 * batch * tokens_per_row(cfg), cfg.hidden_size, mlp_input_width(cfg)


def ort_matmul_flops(shape: tuple[int, int, int], repeats: int = 5) -> float | None:
    """Best FLOP/s of ONNX Runtime's CPU MatMul (MLAS) on ``shape``, at torch's thread count; None
    without onnxruntime/onnx. ONNX Runtime's own GEMM is a third fp32 kernel on the CPU, the one the
    ``onnxruntime`` configuration runs, and can be faster than both of torch's."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k, n = shape
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k), dtype=np.float32)
    session.run(None, {"a": a})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def peak_label(key: tuple[str, bool]) -> str:
    """A ``peak_dtype`` key as the peaks' JSON key: "float32", "float32+tf32", "bfloat16", ..."""
    return f"{key[0]}{'+tf32' if key[1] else ''}"


def measure_peaks(impls: list[str], model: str, device: str, batch: int) -> dict:
    """Matmul peaks of the dtypes the implementations run, measured now (the parent, workers idle).

    Per dtype key ("float32", "float32+tf32", "bfloat16", ...): the best FLOP/s over the square
    ``matmul_peak`` and the network's own largest linear (``network_gemm``), each through the fastest
    of torch's kernels, and on the CPU for fp32 also ONNX Runtime's MatMul: the fastest GEMM this
    machine gave, which a roofline must not undercut."""
    from igengine.bench.peak import matmul_peak

    kind = torch.device(device).type
    shape = network_gemm(model, batch)
    out: dict = {}
    for key in sorted({peak_dtype(name, kind) for name in impls}):
        dtype, tf32 = getattr(torch, key[0]), key[1]
        label = peak_label(key)
        square = matmul_peak(dtype, device, allow_tf32=tf32)
        net = matmul_peak(dtype, device, allow_tf32=tf32, shape=shape)
        kernels = {f"square {square['size']} {square['kernel']}": square["max_flops"],
                   f"{'x'.join(map(str, shape))} {net['kernel']}": net["max_flops"]}
        if kind == "cpu" and dtype == torch.float32:
            ort_flops = ort_matmul_flops(shape)
            if ort_flops is not None:
                kernels[f"{'x'.join(map(str, shape))} onnxruntime MatMul"] = ort_flops
        best = max(kernels, key=kernels.get)
        out[label] = {"flop_per_s": kernels[best], "kernel": best, "kernels": {k: round(v) for k, v in kernels.items()}}
    return out


def roofline(report: dict, family: str, model: str, device: str, batch: int, n_in: int, n_out: int,
             peaks_per_repeat: list[dict]) -> dict:
    """The matmul roofline of the full run, per implementation, from peaks measured in this run.

    FLOPs: ``igengine.bench.flops.forward_flops`` (2 x multiply-adds of every matmul of the network) over
    the full plan's evaluations at each implementation's rows. Peak: ``measure_peaks`` before every
    repeat; the roofline uses, per dtype, the highest of all (the fastest GEMM the machine gave in this
    run). Per implementation: its achieved matmul FLOP/s and MFU over its median full-run time, and the
    roofline time (FLOPs / peak: everything but the matmuls free, the matmuls at the peak rate).
    ``ceiling_ratio_vs_official`` = the official median full-run time / igengine's roofline time: no
    implementation of igengine's FLOPs in that dtype could beat this ratio on this machine, so a target
    above it is out of reach by arithmetic, not by engineering.
    """
    from igengine.bench.flops import forward_flops
    from igengine.models import preset

    cfg = preset(model)
    kind = torch.device(device).type
    impls = report["implementations"]
    peaks: dict = {}
    for measured in peaks_per_repeat:
        for label, entry in measured.items():
            if label not in peaks or entry["flop_per_s"] > peaks[label]["flop_per_s"]:
                peaks[label] = entry
    out: dict = {"flops": "igengine.bench.flops.forward_flops (2 x multiply-adds; matmuls and attention products)",
                 "peak": "per dtype, the highest of measure_peaks over the repeats",
                 "peaks": peaks, "peaks_per_repeat": peaks_per_repeat, "implementations": {}}
    official_s = impls.get("official", {}).get("full_run_s", {}).get("median")
    for name, row in impls.items():
        rows = evaluation_rows(name, family, batch)
        flop = n_in * forward_flops(cfg, rows["in"]) + n_out * forward_flops(cfg, rows["out"])
        label = peak_label(peak_dtype(name, kind))
        entry = {"rows_per_evaluation": rows, "full_run_flop": flop, "peak": label}
        if label in peaks:
            peak = peaks[label]["flop_per_s"]
            entry["roofline_full_run_s"] = round(flop / peak, 3)
            full_s = row.get("full_run_s", {}).get("median")
            if full_s:
                entry["achieved_flop_per_s"] = round(flop / full_s)
                entry["mfu"] = round(flop / full_s / peak, 4)
            if name != "official" and official_s:
                entry["ceiling_ratio_vs_official"] = round(official_s / (flop / peak), 3)
        out["implementations"][name] = entry
    return out


def print_summary(results: dict) -> None:
    for family, rep in results.items():
        print(f"\n{family}: {rep.get('model')} batch {rep.get('batch')}"
              + (f"  ERROR {rep['error']}" if "error" in rep else ""))
        print(f"  {'implementation':24s} {'ms/step in':>12s} {'ms/step out':>12s} {'full run s':>11s} "
              f"{'samples/s':>10s}  x official: wall [min-max], process CPU time")
        for name, row in rep.get("implementations", {}).items():
            if "ms_per_step" not in row:
                print(f"  {name:24s} {row.get('error', 'no measurement')}")
                continue
            ratio, rc = row.get("ratio_vs_official"), row.get("ratio_vs_official_process_cpu_time")
            rtxt = (f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}] cpu {rc['median']:.2f}"
                    if ratio else "")
            ms = row["ms_per_step"]
            roof = rep.get("roofline", {}).get("implementations", {}).get(name, {})
            rtxt += (f"  MFU {roof['mfu']:.0%}" if "mfu" in roof else "") + (
                f", ceiling {roof['ceiling_ratio_vs_official']:.2f}x" if "ceiling_ratio_vs_official" in roof else "")
            print(f"  {name:24s} {ms['in']['median']:12.1f} {ms['out']['median']:12.1f} "
                  f"{row['full_run_s']['median']:11.1f} {row['samples_per_s']:10.4f}  {rtxt}")


def parse_models(values: list[str]) -> dict[str, str]:
    from igengine.models.registry import family_of

    out = {}
    for v in values:
        try:
            out[family_of(v).value] = v
        except (KeyError, ValueError):
            raise SystemExit(f"official_speed: unknown --model {v!r} (e.g. SiT-B/2, LightningDiT-XL/1)") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/official_speed.py --official-repo ../Internal-Guidance\n"
               "  python benchmarks/official_speed.py --official-repo ../Internal-Guidance --quick   # GPU, XL",
    )
    parser.add_argument("--official-repo", type=Path, required=True, help="checkout of CVL-UESTC/Internal-Guidance")
    parser.add_argument("--official-commit", help="the checkout's commit, when it is not a git work tree")
    parser.add_argument("--family", default="sit,lightningdit", help="comma list of sit, lightningdit")
    parser.add_argument("--model", action="append", default=[],
                        help="model per family (repeatable); default B models on CPU, XL on CUDA")
    parser.add_argument("--batch-size", type=int, help="N samples per batch (default 2 on CPU; 32 SiT / 128 "
                                                       "LightningDiT on CUDA, the paper's per-GPU batches)")
    parser.add_argument("--steps", type=int,
                        help="K: solver steps per timed window (default 2 on CPU and with --quick, 4 on CUDA)")
    parser.add_argument("--repeats", type=int, help="R interleaved repeats (default 3; 2 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--igengine-config", help=f"comma list from {', '.join(IGENGINE_CONFIGS)} (default CPU: "
                                                  "reference,fp32,onnxruntime,compiled, and bf16,compiled-bf16 "
                                                  "on CPUs with bf16 units; CUDA: reference,fp32,bf16, "
                                                  "with --quick fp32,bf16)")
    parser.add_argument("--official-compile", choices=("on", "off"), default="on",
                        help="keep the official LightningDiT's @torch.compile (default on, as the official code)")
    parser.add_argument("--quick", action="store_true",
                        help="device-check preset: K=2, 2 repeats, igengine fp32,bf16 on CUDA (XL models there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights-seed", type=int, default=1)
    parser.add_argument("--setup-timeout", type=float, default=1200.0, help="seconds for a worker's setup+warm-up")
    parser.add_argument("--step-timeout", type=float, default=900.0, help="seconds for one timed window")
    parser.add_argument("--json", type=Path,
                        help="output (default benchmarks/results/official_speed_<device>_<date>.json)")
    args = parser.parse_args(argv)

    device = args.device
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("official_speed: --device cuda but torch sees no CUDA GPU")
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    for f in families:
        if f not in OFFICIAL_FILES:
            raise SystemExit(f"official_speed: unknown --family {f!r} (choose from sit, lightningdit)")
    missing = [p for f in families for p in OFFICIAL_FILES[f] if not (args.official_repo / p).is_file()]
    if missing:
        raise SystemExit(f"official_speed: {args.official_repo} lacks official files: {', '.join(missing)}")
    args.model = parse_models(args.model)
    if args.steps is None:
        args.steps = 2 if args.quick or kind == "cpu" else 4
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.steps < 1 or args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise SystemExit("official_speed: --steps, --repeats and --batch-size must be >= 1")
    if kind == "cpu":
        from igengine.backends.cpu_linear import cpu_native_low_precision

        # bf16 rows only where the CPU has bf16 units (without them bf16 runs ~10x slower than fp32)
        native = cpu_native_low_precision(torch.bfloat16)
        default_cfg = "reference,fp32,onnxruntime,compiled" + (",bf16,compiled-bf16" if native else "")
    else:
        default_cfg = "fp32,bf16" if args.quick else "reference,fp32,bf16"
    args.igengine_config = [c.strip() for c in (args.igengine_config or default_cfg).split(",") if c.strip()]
    for c in args.igengine_config:
        if c not in IGENGINE_CONFIGS:
            raise SystemExit(f"official_speed: unknown --igengine-config {c!r} "
                             f"(choose from {', '.join(IGENGINE_CONFIGS)})")
    args.parallel_setup = kind == "cuda"  # many cores there; on a 2-core CPU setups run one after another
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    out = args.json or ROOT / "benchmarks" / "results" / f"official_speed_{kind}_{stamp}.json"

    from benchmarks.provenance import provenance

    report: dict = {
        "provenance": provenance(),
        "official": {"repo": str(args.official_repo),
                     "commit": official_commit(args.official_repo, args.official_commit),
                     "files_sha256": {p: hashlib.sha256((args.official_repo / p).read_bytes()).hexdigest()
                                      for f in families for p in OFFICIAL_FILES[f]}},
        "method": "marginal cost of K solver steps, T(K-step window) - T(0-step window), on windows of the full "
                  "paper plan inside and outside the CFG interval; each configuration in its own process, timed "
                  "interleaved per repeat after warm-up; full-run time = evaluations inside x cost inside + "
                  "evaluations outside x cost outside (solver loop only, no VAE); ratio = official / igengine "
                  "full-run time, paired per repeat (see the module docstring)",
        "device": device,
        "igengine_configs": args.igengine_config,
        "official_lightningdit_compile": args.official_compile,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "results": {},
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="official_speed_logs_") as tmp:
        logs = Path(os.environ.get("OFFICIAL_SPEED_LOGS", tmp))
        logs.mkdir(parents=True, exist_ok=True)
        for family in families:
            report["results"][family] = bench_family(args, family, device, logs)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report["results"])
    print(f"\nwrote {out} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        raise SystemExit(worker_main(json.loads(sys.argv[2])))
    raise SystemExit(main())

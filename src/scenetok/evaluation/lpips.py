"""LPIPS (Zhang et al. 2018, version 0.1) written here in plain torch, loaded from a safetensors file.

What it is: the LPIPS network with an AlexNet or VGG-16 trunk — the convolution stack of torchvision's
``alexnet().features`` / ``vgg16().features`` (same kernel sizes, strides, paddings, max-pools and layer
indices), the input scaling of LPIPS v0.1 (inputs in [-1, 1], then ``(x - shift) / scale`` with
shift ``(-.030, -.088, -.188)`` and scale ``(.458, .448, .450)``), channel-wise unit normalization of the
five ReLU outputs (AlexNet: after conv 1–5; VGG: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3),
squared differences weighted by the learned non-negative 1×1 "lin" layers, averaged over space and
summed over the five layers. With the weights of the ``lpips`` package it computes the same numbers.

What it is not: it ships no weights and downloads nothing — without a weights file there is no LPIPS
(random weights give a number, but not a perceptual distance). No SqueezeNet trunk, no spatial map,
no training.

The weights file: ``safetensors`` with the state dict of ``lpips.LPIPS(net="alex"|"vgg")`` as it is
(keys ``net.slice{1..5}.{i}.weight/bias`` — ``i`` is the layer index in torchvision's ``features`` — and
``lin{0..4}.model.1.weight``; ``scaling_layer.*`` is optional), or with the plain keys
``features.{i}.weight/bias`` and ``lin{k}.weight``. Convert once, on a machine where the ``lpips``
package works::

    import lpips
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in lpips.LPIPS(net="alex").state_dict().items()}, "lpips_alex.safetensors")

The trunk (alex or vgg) is read from the file's shapes; channel widths are read from the file too, so
any file in this layout loads (the tests use tiny random ones).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from scenetok.errors import ConfigError
from scenetok.evaluation.metrics import to_rgb_array

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# layer index in torchvision's ``features`` → (kernel, stride, padding); "M" = max-pool (kernel, stride)
ALEX_LAYERS = {0: (11, 4, 2), 3: (5, 1, 2), 6: (3, 1, 1), 8: (3, 1, 1), 10: (3, 1, 1)}
ALEX_POOLS = {2: (3, 2), 5: (3, 2)}
ALEX_TAPS = (1, 4, 7, 9, 11)  # ReLU outputs read
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_LAYERS = {i: (3, 1, 1) for i in VGG_CONVS}
VGG_POOLS = {4: (2, 2), 9: (2, 2), 16: (2, 2), 23: (2, 2)}
VGG_TAPS = (3, 8, 15, 22, 29)


class LPIPS(nn.Module):
    """LPIPS distance. Build with :meth:`from_file`; call with two ``(B, 3, H, W)`` batches in [-1, 1]
    (or use :meth:`distance` on images); returns ``(B,)``."""

    def __init__(self, net: str, trunk: dict[str, torch.Tensor], lins: list[torch.Tensor]):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"unknown LPIPS trunk {net!r}")
        self.net = net
        layers, pools, taps = (ALEX_LAYERS, ALEX_POOLS, ALEX_TAPS) if net == "alex" else (VGG_LAYERS, VGG_POOLS, VGG_TAPS)
        self._pools = pools
        self._taps = taps
        self._last = taps[-1]
        self.convs = nn.ModuleDict()
        for i, (k, s, p) in layers.items():
            w = trunk[f"{i}.weight"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=k, stride=s, padding=p)
            if tuple(w.shape[2:]) != (k, k):
                raise ValueError(f"layer {i}: kernel {tuple(w.shape[2:])}, expected {(k, k)} for the {net} trunk")
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(trunk[f"{i}.bias"])
            self.convs[str(i)] = conv
        self.lins = nn.ParameterList([nn.Parameter(lw.reshape(1, -1, 1, 1).clone(), requires_grad=False) for lw in lins])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = (x - self.shift) / self.scale
        for i in range(self._last + 1):
            key = str(i)
            if key in self.convs:
                h = self.convs[key](h)
            elif i in self._pools:
                k, s = self._pools[i]
                h = nn.functional.max_pool2d(h, kernel_size=k, stride=s)
            else:  # the ReLU after each convolution
                h = torch.relu(h)
            if i in self._taps:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x), self.features(y)
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for a, b, w in zip(fx, fy, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((a - b) ** 2 * w).sum(1).mean((1, 2)).float()
        return total

    @staticmethod
    def to_input(images) -> torch.Tensor:
        """Images (PIL or uint8 arrays, same size) as a ``(B, 3, H, W)`` batch in [-1, 1]."""
        import numpy as np

        arr = np.stack([to_rgb_array(im) for im in images]).astype(np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def distance(self, a, b) -> torch.Tensor:
        """LPIPS between two lists of images (pairwise by position)."""
        dev = self.shift.device
        with torch.no_grad():
            return self(self.to_input(a).to(dev), self.to_input(b).to(dev)).cpu()

    def diversity(self, images, batch_size: int = 16) -> float | None:
        """Mean LPIPS over all unordered pairs of ``images`` (None for fewer than 2)."""
        n = len(images)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        if not pairs:
            return None
        vals = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            vals.append(self.distance([images[i] for i, _ in chunk], [images[j] for _, j in chunk]))
        return float(torch.cat(vals).mean())

    @classmethod
    def from_file(cls, path: str | Path, device=None) -> "LPIPS":
        """Load LPIPS weights from a safetensors file (layout: see the module docstring)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = Path(path)
        hint = ("convert the lpips package's weights once: save_file(lpips.LPIPS(net='alex').state_dict(), "
                "'lpips_alex.safetensors') (see docs/evaluation.md)")
        if not p.is_file():
            raise ConfigError(f"LPIPS weights file {p} does not exist", hint=hint)
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{p} is not a safetensors file ({e})", hint=hint) from None
        trunk: dict[str, torch.Tensor] = {}
        lins: dict[int, torch.Tensor] = {}
        for key, value in state.items():
            m = re.fullmatch(r"(?:net\.slice\d+|features|net\.features)\.(\d+)\.(weight|bias)", key)
            if m:
                trunk[f"{m.group(1)}.{m.group(2)}"] = value.float()
                continue
            m = re.fullmatch(r"lin(\d+)(?:\.model\.\d+)?\.weight", key)
            if m:
                lins[int(m.group(1))] = value.float()
        first = trunk.get("0.weight")
        if first is None or len(lins) != 5:
            raise ConfigError(f"{p} does not hold LPIPS weights (found {len(trunk)} trunk tensors and "
                              f"{len(lins)} lin layers; need features.0.weight … and lin0 … lin4)", hint=hint)
        net = "alex" if first.shape[-1] == 11 else "vgg"
        try:
            model = cls(net, trunk, [lins[k] for k in range(5)])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{p}: the LPIPS weights do not fit the {net} trunk ({e})", hint=hint) from None
        if device is not None:
            model.to(device)
        return model

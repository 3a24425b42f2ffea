"""LPIPS (Zhang et al. 2018), AlexNet variant v0.1, re-implemented so it runs from two local files and no torchvision.

The network is the ``lpips`` package's default: inputs in [-1, 1] are shifted and scaled per channel, AlexNet's five
ReLU outputs are unit-normalised over channels, their squared differences are weighted per channel by five 1x1
convolutions (the learned "linear" layers), averaged over space, and summed. Weights come from two files, both in the
formats their authors publish, so they load unchanged:

- the AlexNet trunk: torchvision's ImageNet checkpoint ``alexnet-owt-7be5be79.pth`` (only ``features.*`` is used);
- the linear layers: the ``lpips`` package's ``weights/v0.1/alex.pth`` (keys ``lin{k}.model.1.weight``), found in an
  installed ``lpips`` package when no path is given (it ships inside the wheel, nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from dalle_core.errors import CheckpointError, ShapeError
from dalle_eval.weights import require_weights

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_HINT = (
    f"download torchvision's AlexNet weights {ALEXNET_FILE} from https://download.pytorch.org/models/{ALEXNET_FILE} "
    "on a machine with internet and pass its path (--lpips-trunk-weights)"
)
LINEAR_HINT = (
    "pass the LPIPS linear-layer file weights/v0.1/alex.pth from the lpips package "
    "(https://github.com/richzhang/PerceptualSimilarity, or `pip install lpips`, which ships it) "
    "with --lpips-linear-weights"
)
CHANNELS = (64, 192, 384, 256, 256)
_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in torchvision's alexnet.features whose outputs LPIPS compares
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 31  # smaller images vanish in AlexNet's second max-pool


class AlexNetTrunk(nn.Module):
    """torchvision's ``alexnet().features`` up to the last ReLU, with the same module indices (so its keys load)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps


class Lpips(nn.Module):
    """``forward(a, b)`` of two ``float[B, 3, H, W]`` batches in [0, 1] -> distances ``float[B]`` (0 when equal)."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.trunk = AlexNetTrunk()
        self.linear = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images * 2 - 1 - self.shift) / self.scale
        return [f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in self.trunk(x)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ShapeError(
                f"expected two RGB batches [B, 3, H, W] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if min(a.shape[-2:]) < MIN_SIZE:
            raise ShapeError(
                f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(a.shape[-2:])}"
            )
        total = torch.zeros(a.shape[0], device=a.device)
        for fa, fb, linear in zip(self._features(a), self._features(b), self.linear, strict=True):
            total = total + linear((fa - fb).square()).mean(dim=(1, 2, 3))
        return total

    def load_weights(self, trunk_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor]) -> None:
        """Load torchvision AlexNet keys (``features.N.*``) and lpips linear keys (``linK.model.1.weight``)."""
        trunk = {key: value for key, value in trunk_state.items() if key.startswith("features.")}
        linear = {f"{k}.weight": linear_state.get(f"lin{k}.model.1.weight") for k in range(len(CHANNELS))}
        missing = [key for key, value in linear.items() if value is None]
        if missing:
            raise CheckpointError(f"LPIPS linear weights lack lin{missing[0].split('.')[0]}.model.1.weight")
        try:
            self.trunk.load_state_dict(trunk, strict=True)
            self.linear.load_state_dict(linear, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"LPIPS weights do not fit AlexNet: {str(error).splitlines()[0]}") from None


def bundled_linear_weights() -> Path | None:
    """The ``alex.pth`` inside an installed ``lpips`` package, found without importing it, or ``None``."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    return path if path.is_file() else None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a PyTorch state dict file: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_lpips(
    trunk_weights: str | Path | None, linear_weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> Lpips:
    """LPIPS from the local AlexNet file and linear-layer file (the latter defaults to an installed lpips' copy)."""
    trunk_path = require_weights(trunk_weights, "LPIPS AlexNet trunk", ALEXNET_HINT)
    linear_path = require_weights(linear_weights or bundled_linear_weights(), "LPIPS linear layers", LINEAR_HINT)
    model = Lpips()
    model.load_weights(_load_state(trunk_path), _load_state(linear_path))
    return model.to(device)


@torch.no_grad()
def lpips_distance(model: Lpips, a: torch.Tensor, b: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-pair LPIPS of two ``float[N, 3, H, W]`` sets in [0, 1]: ``float[N]`` on the CPU."""
    device = next(model.parameters()).device
    parts = [
        model(a[start : start + batch_size].to(device), b[start : start + batch_size].to(device)).cpu()
        for start in range(0, len(a), batch_size)
    ]
    return torch.cat(parts)


__all__ = ["Lpips", "bundled_linear_weights", "load_lpips", "lpips_distance"]

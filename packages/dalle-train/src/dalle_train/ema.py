"""An exponential moving average of a model's parameters, for sampling and export.

The average lives beside the training weights with the same layout, so under FSDP each process keeps only its shard
(``DTensor``). The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first
averages are not dominated by the random initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:  # DTensor is what FSDP2 parameters are; older or CPU-only builds may lack it.
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


class EMA:
    """Averages of ``model``'s floating-point parameters, keyed by parameter name (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: param.detach().clone() for name, param in model.named_parameters() if param.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), weight)
        self.updates += 1

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with averaged parameters, gathered in full on CPU (collective under FSDP)."""
        state = {}
        for name, tensor in model.state_dict().items():
            value: Any = self.shadow.get(name, tensor)
            if _is_dtensor(value):
                value = value.full_tensor()
            state[name] = value.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore averages written by :meth:`full_state_dict` (each process keeps its own shard)."""
        for name, shadow in self.shadow.items():
            if name not in state:
                continue
            value: Any = state[name]
            if _is_dtensor(shadow):
                sharded: Any = shadow
                value = distribute_tensor(value.to(shadow.device), sharded.device_mesh, sharded.placements)
                sharded.to_local().copy_(value.to_local())
            else:
                shadow.copy_(value.to(shadow.device, shadow.dtype))
        self.updates = updates

    def metadata(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates}

"""Horovod: every process holds the whole model; gradients are averaged with Horovod's allreduce.

Launched by ``horovodrun -np N --gloo python -m dalle_train ...`` (or with MPI where Horovod was built with it).
Gradients are accumulated locally over micro-batches and averaged once per optimizer step, in one grouped allreduce,
before clipping: the same arithmetic as DDP, so loss curves match a single process with the same global batch, and
``no_sync`` has nothing to do. (``hvd.DistributedOptimizer`` would overlap the reduction with backward, but it owns
the step, which the loop needs for clipping by the global norm and for skipping non-finite steps.) Checkpoints use the
backend-neutral full-state format, so a Horovod run resumes on single/DDP/FSDP/DeepSpeed and back.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from dalle_core.errors import ConfigError
from dalle_core.extras import require_extra
from dalle_train.backends.base import OptimizerFactory, StepResult
from dalle_train.backends.torch_backends import SingleBackend, pick_device
from dalle_train.run_config import BackendConfig


def import_horovod() -> ModuleType:
    """``horovod.torch``, or ``MissingExtraError`` naming ``dalle-train[horovod]``."""
    return require_extra("horovod.torch", "dalle-train", "horovod")


class HorovodBackend(SingleBackend):
    name = "horovod"

    def __init__(self, config: BackendConfig) -> None:
        hvd = import_horovod()
        hvd.init()
        self._hvd = hvd
        if config.dist_backend == "nccl" and not hvd.nccl_built():
            raise ConfigError("backend.dist_backend=nccl but this Horovod was built without NCCL; use gloo or auto")
        self._device = pick_device(config.device, hvd.local_rank())

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def world_size(self) -> int:
        return int(self._hvd.size())

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to(self.device)
        # Every process seeds the same weights already; broadcasting makes rank 0's the truth regardless.
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, build_optimizer(model)

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        max_grad_norm: float,
    ) -> StepResult:
        # The same model and code on every process give the same set of parameters with gradients, in one order.
        params = [p for p in model.parameters() if p.grad is not None]
        if self.world_size > 1 and params:
            grads = [p.grad for p in params]
            averaged = self._hvd.grouped_allreduce(grads, op=self._hvd.Average)
            for grad, mean in zip(grads, averaged, strict=True):
                grad.copy_(mean)  # type: ignore[union-attr]
        return super().step(model, optimizer, scaler, max_grad_norm)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvd.allreduce(tensor.detach().clone(), op=self._hvd.Average)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvd.allreduce(tensor.detach().clone(), op=self._hvd.Sum)

    # Horovod matches collectives across processes by name, and names object collectives after the object's type by
    # default: rank 0 broadcasting a str while the others pass None would wait forever. Fixed names instead.
    def all_gather_object(self, value: Any) -> list[Any]:
        return list(self._hvd.allgather_object(value, name="dalle_train.all_gather_object"))

    def broadcast_object(self, value: Any) -> Any:
        return self._hvd.broadcast_object(value, root_rank=0, name="dalle_train.broadcast_object")

    def barrier(self) -> None:
        self._hvd.barrier()

    def close(self) -> None:
        self._hvd.shutdown()

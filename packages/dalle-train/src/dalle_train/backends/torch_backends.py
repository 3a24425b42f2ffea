"""Single-process, DDP and FSDP2 backends on ``torch.distributed`` (launched by ``torchrun`` for ddp and fsdp)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dalle_core.errors import ConfigError
from dalle_train.backends.base import OptimizerFactory, StepResult
from dalle_train.backends.state_files import read_full_state, write_full_state

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: the process's GPU when CUDA is available, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("backend.device=cuda but PyTorch sees no CUDA device; use backend.device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (what FSDP2 norms and parameters are) as a plain tensor; anything else as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class SingleBackend:
    """One process, one device. The base of the distributed backends, which override what differs."""

    name = "single"

    def __init__(self, device: str = "auto") -> None:
        self._device = pick_device(device)

    # ------------------------------------------------------------------------------------------------ identity

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------ training

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to(self.device)
        return model, build_optimizer(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        max_grad_norm: float,
    ) -> StepResult:
        params = [p for p in model.parameters() if p.grad is not None]
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = _total_norm([p.grad for p in params])  # type: ignore[misc]
        grad_norm = float(_full(norm))  # one host sync per step: the price of skipping non-finite steps
        applied = math.isfinite(grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips the update itself when it found inf/NaN while unscaling
            scaler.update()
        elif applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, applied)

    # ------------------------------------------------------------------------------------------------ collectives

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone()

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def broadcast_object(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------------ state

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().clone() for name, tensor in self.unwrap(model).state_dict().items()}

    def _optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.unwrap(model), optimizer)

    def save(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weights = self.full_state_dict(model)
        optimizer_state = self._optimizer_state(model, optimizer)
        if self.is_main:
            write_full_state(directory, weights, optimizer_state, self.name)

    def load(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        weights, optimizer_state = read_full_state(directory)
        module = self.unwrap(model)
        module.load_state_dict(weights, strict=True)
        set_optimizer_state_dict(module, optimizer, optimizer_state)

    def close(self) -> None:
        pass


class DDPBackend(SingleBackend):
    """``DistributedDataParallel``: every process holds the whole model; gradients are averaged in backward."""

    name = "ddp"

    def __init__(self, device: str = "auto", dist_backend: str = "auto") -> None:
        self._rank, self._world_size, local_rank, self._owns_group = _init_process_group(
            self.name, dist_backend, device
        )
        self._device = pick_device(device, local_rank)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        optimizer = build_optimizer(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return model.no_sync()  # type: ignore[operator]

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def all_gather_object(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


class FSDPBackend(DDPBackend):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded over the processes.

    By default the whole model is one unit: its parameters are gathered for each forward and backward pass, while
    gradients and optimizer state stay sharded. ``units`` names module classes (e.g. ``Attention``, ``FeedForward``)
    to shard as units of their own, so only one of them is gathered at a time; only modules that the model calls
    through ``__call__`` may be units (FSDP gathers in forward hooks). Checkpoints gather full weights and optimizer
    state (the same format as the other backends), so a sharded run resumes on any backend and its ``model/``
    directory serves generation directly.
    """

    name = "fsdp"

    def __init__(
        self,
        device: str = "auto",
        dist_backend: str = "auto",
        reshard_after_forward: bool = True,
        units: tuple[str, ...] = (),
    ) -> None:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"backend.kind=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.6); this is "
                f"PyTorch {torch.__version__}: upgrade it or use backend.kind=ddp"
            ) from None
        super().__init__(device, dist_backend)
        self.reshard_after_forward = reshard_after_forward
        self.units = tuple(units)

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        if self.units:
            found = [module for module in model.modules() if type(module).__name__ in self.units]
            if not found:
                raise ConfigError(
                    f"backend.fsdp_units={list(self.units)}: {type(model).__name__} has no module of these classes"
                )
            for module in found:
                fully_shard(module, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward)
        return model, build_optimizer(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def _no_sync(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return self._no_sync(model)

    def _options(self, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=self._options(cpu_offload=True)))

    def _optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))

    def load(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        # Every process reads the full files and keeps its shard: simple, and fine while a full copy fits in memory.
        weights, optimizer_state = read_full_state(directory)
        set_model_state_dict(model, cast(dict[str, Any], weights), options=self._options())
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=self._options())


def _init_process_group(kind: str, dist_backend: str, device: str) -> tuple[int, int, int, bool]:
    """Join the process group torchrun describes in the environment; returns rank, world size, local rank, owned."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(f"backend.kind={kind}: this PyTorch build has no torch.distributed support")
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(
            f"backend.kind={kind} must be launched by torchrun (e.g. `torchrun --nproc_per_node 2 -m dalle train "
            f"...`); {', '.join(missing)} not set"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        uses_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if dist_backend == "auto":
            dist_backend = "nccl" if uses_cuda else "gloo"
        if dist_backend == "nccl" and not (uses_cuda and dist.is_nccl_available()):
            raise ConfigError(
                "backend.dist_backend=nccl needs CUDA GPUs and an NCCL-enabled PyTorch; on this machine use gloo"
            )
        if uses_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=dist_backend)
        owns = True
    return dist.get_rank(), dist.get_world_size(), local_rank, owns

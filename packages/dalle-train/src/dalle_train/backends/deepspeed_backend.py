"""DeepSpeed ZeRO (stages 0-3) as a training backend: GPUs over NCCL, or CPUs over gloo.

Launch it like DDP (``torchrun --nproc_per_node N -m dalle_train ... --set backend.kind=deepspeed``), or as one plain
process (``dalle train --set backend.kind=deepspeed``), for which it fills in the rendezvous variables itself.

How the loop maps onto DeepSpeed's engine:

- The optimizer is ours (AdamW with weight-decay groups, from the factory), handed to ``deepspeed.initialize`` as the
  client optimizer. ZeRO steps it on its flat fp32 partitions through the same ``param_groups``, so the learning
  rate the loop writes there every step is the one applied.
- The DeepSpeed config comes from the run config, merged with ``backend.deepspeed_config`` (see
  :mod:`.deepspeed_config`): micro-batch, accumulation, ``gradient_clipping`` (= ``optimizer.grad_clip``; DeepSpeed's
  own default would be 1.0) and precision (weights fp32; bf16 as ``torch_autocast``).
- Accumulation: the loop divides the loss by ``grad_accum_steps`` itself, so ``backward`` does not divide again
  (``scale_wrt_gas=False``); ``no_sync`` marks the micro-batches before the last as off the accumulation boundary, so
  gradients are averaged over processes once per step (ZeRO 2/3 reduce partitions as they go, as they must).
- Non-finite gradients: ZeRO 1-3 skip the update themselves (``was_step_applied``); stage 0 steps a plain AdamW,
  so the backend checks the norm and skips. Either way the weights stay as they were.
- Checkpoints are the backend-neutral full state (:mod:`.state_files`): whole fp32 weights and AdamW state keyed by
  parameter name, gathered from the ZeRO partitions with DeepSpeed's tensor-fragment API (``safe_get_full_*``), so
  single/DDP/FSDP resume DeepSpeed checkpoints and DeepSpeed resumes theirs, at any stage and world size.
  ``full_state_dict`` gathers ZeRO-3 parameters, so ``model/`` of every checkpoint is a plain generation bundle.
- Refused with a ConfigError before any work: ``loop.precision=fp16`` (DeepSpeed's loss scaling would skip steps
  behind the loop's back) and an EMA under ZeRO-3 (the EMA averages whole parameters; ZeRO-3 has only partitions).
- On a CPU, DeepSpeed would JIT-compile a shared-memory all-reduce op (minutes of C++) that only inference uses;
  the backend skips it (:func:`_skip_shared_memory_op`), so no compiler is needed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.errors import CheckpointError, ConfigError
from dalle_core.extras import require_extra
from dalle_train.backends.base import LoopSettings, OptimizerFactory, StepResult
from dalle_train.backends.deepspeed_config import engine_config, read_user_config, zero_stage
from dalle_train.backends.state_files import read_full_state
from dalle_train.backends.torch_backends import DDPBackend, _total_norm, pick_device
from dalle_train.run_config import BackendConfig

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# AdamW hyperparameters a checkpoint carries per group (lr is rewritten by the loop every step anyway).
_GROUP_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def import_deepspeed() -> Any:
    """The ``deepspeed`` module, or ``MissingExtraError`` naming ``dalle-train[deepspeed]``."""
    return require_extra("deepspeed", "dalle-train", "deepspeed")


class DeepSpeedBackend(DDPBackend):
    """ZeRO data parallelism through a DeepSpeed engine; one engine per stage, built by :meth:`prepare`."""

    name = "deepspeed"

    def __init__(self, config: BackendConfig) -> None:
        self._user_config_path = config.deepspeed_config
        self._user_config = read_user_config(config.deepspeed_config)  # a bad file fails before any process starts
        self._zero_stage = zero_stage(config.deepspeed_zero_stage, self._user_config, config.deepspeed_config)
        self._filled_variables = _fill_rendezvous()
        try:
            self._start(config)
        except BaseException:
            self._restore_environment()
            raise
        self._engine_config: dict[str, Any] | None = None
        self._engine: Any = None
        self._group_names: list[list[str]] = []

    def _start(self, config: BackendConfig) -> None:
        import torch.distributed as dist

        self._device = pick_device(config.device, int(os.environ["LOCAL_RANK"]))
        if self._device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed picks a GPU it may find, and says so
        dist_backend = config.dist_backend
        if dist_backend == "auto":
            dist_backend = "nccl" if self._device.type == "cuda" else "gloo"
        if dist_backend == "nccl" and self._device.type != "cuda":
            raise ConfigError("backend.dist_backend=nccl needs CUDA GPUs; on this machine use gloo")
        deepspeed = import_deepspeed()
        _skip_shared_memory_op(deepspeed)
        self._owns_group = not dist.is_initialized()
        deepspeed.init_distributed(dist_backend=dist_backend, auto_mpi_discovery=False, verbose=False)
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def _restore_environment(self) -> None:
        for variable in self._filled_variables:
            os.environ.pop(variable, None)
        self._filled_variables = []

    # ------------------------------------------------------------------------------------------------ training

    def configure_loop(self, settings: LoopSettings) -> None:
        self._engine_config = engine_config(
            settings, self.world_size, self._zero_stage, self._user_config, self._user_config_path
        )

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self._engine_config is None:
            raise ConfigError("DeepSpeedBackend.prepare needs configure_loop(LoopSettings) first (train_loop calls it)")
        deepspeed = import_deepspeed()
        model.to(self.device)
        optimizer = build_optimizer(model)
        # ZeRO replaces the groups' parameters by flat partitions: remember which names each group holds.
        names = {id(param): name for name, param in model.named_parameters()}
        self._group_names = [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self._engine_config), dist_init_required=False
        )
        engine.set_gradient_accumulation_boundary(True)
        self._engine = engine
        return engine, optimizer

    @contextlib.contextmanager
    def _accumulating(self) -> Iterator[None]:
        self._engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self._engine.set_gradient_accumulation_boundary(True)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return self._accumulating()

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        self._engine.backward(loss, scale_wrt_gas=False)  # the loop has divided by grad_accum_steps already

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        max_grad_norm: float,
    ) -> StepResult:
        engine = self._engine
        if self._zero_stage == 0:
            # A plain AdamW under the engine: it would apply NaN gradients, so check first (gradients are averaged).
            grads = [param.grad for param in engine.module.parameters() if param.grad is not None]
            grad_norm = float(_total_norm(grads)) if grads else 0.0
            if not math.isfinite(grad_norm):
                engine.zero_grad()
                return StepResult(grad_norm, False)
            engine.step()  # clips to gradient_clipping = optimizer.grad_clip
            return StepResult(grad_norm, True)
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = math.nan if norm is None else float(norm)
        return StepResult(grad_norm, bool(engine.was_step_applied()))

    # ------------------------------------------------------------------------------------------------ state

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self._zero_stage < 3:
            return super().full_state_dict(model)  # stages 0-2 keep whole parameters on every process
        deepspeed = import_deepspeed()
        state: dict[str, torch.Tensor] = {}
        for name, value in self.unwrap(model).state_dict(keep_vars=True).items():
            if hasattr(value, "ds_id"):
                # A partitioned parameter, gathered alone (every process, same order): gathering all of them at once
                # would hold the whole model on every device, which is what ZeRO-3 is chosen to avoid.
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    if self.is_main:
                        state[name] = value.detach().cpu().clone()
            elif self.is_main:
                state[name] = value.detach().cpu().clone()
        return state

    def _optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._zero_stage == 0:
            return super()._optimizer_state(model, optimizer)  # plain AdamW on the module's own parameters
        from deepspeed.utils import safe_get_full_optimizer_state

        params = dict(self.unwrap(model).named_parameters())
        groups = [
            {**{key: value for key, value in group.items() if key != "params"}, "params": list(names)}
            for group, names in zip(optimizer.param_groups, self._group_names, strict=True)
        ]
        flat_states = [state for state in optimizer.state.values() if "step" in state]
        if not flat_states:  # no step yet: nothing to gather
            return {"state": {}, "param_groups": groups}
        self._link_fragments()
        step = torch.tensor(float(flat_states[0]["step"]), dtype=torch.float32)
        keys = [key for key in flat_states[0] if key != "step"]
        state: dict[str, dict[str, torch.Tensor]] = {}
        for names in self._group_names:
            for name in names:
                # Collective (each process holds a fragment): every process gathers every parameter, in one order.
                gathered = {key: safe_get_full_optimizer_state(params[name], key) for key in keys}
                state[name] = {"step": step.clone(), **{key: value.detach().cpu() for key, value in gathered.items()}}
        return {"state": state, "param_groups": groups}

    def load(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self._zero_stage == 0:
            super().load(directory, model, optimizer)
            return
        weights, optimizer_state = read_full_state(directory)
        module = self.unwrap(model)
        self._load_weights(module, weights)
        self._load_optimizer_state(module, optimizer, optimizer_state)

    def _load_weights(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        deepspeed = import_deepspeed()
        # The module's parameters (gathered for ZeRO-3, re-partitioned on exit) and ZeRO's fp32 master copies, which
        # are separate tensors: the forward pass reads the first, the optimizer updates the second.
        gathered = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)
            if self._zero_stage == 3
            else contextlib.nullcontext()
        )
        with gathered, torch.no_grad():
            module.load_state_dict(weights, strict=True)
        for name, param in module.named_parameters():
            if param.requires_grad:
                self._set_fp32_master(param, weights[name], None)

    def _load_optimizer_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any]
    ) -> None:
        saved: dict[str, dict[str, torch.Tensor]] = optimizer_state.get("state", {})
        if not saved:
            return
        steps = {float(entry["step"]) for entry in saved.values() if "step" in entry}
        if len(steps) != 1:
            raise CheckpointError(f"optimizer state: expected one AdamW step count for all parameters, got {steps}")
        keys = sorted({key for entry in saved.values() for key in entry if key != "step"})
        self._materialize_adam_state(optimizer, steps.pop(), keys)
        params = dict(module.named_parameters())
        for names in self._group_names:
            for name in names:
                entry = saved.get(name, {})  # a parameter that never had a gradient has no state: zeros
                for key in keys:
                    value = entry.get(key)
                    full = _zeros_of_full_shape(params[name]) if value is None else value
                    self._set_fp32_master(params[name], full, key)
        by_names = {tuple(group["params"]): group for group in optimizer_state.get("param_groups", [])}
        for group, names in zip(optimizer.param_groups, self._group_names, strict=True):
            match = by_names.get(tuple(names))
            if match is not None:
                group.update({key: match[key] for key in _GROUP_HYPERPARAMETERS if key in match})

    def _set_fp32_master(self, param: nn.Parameter, value: torch.Tensor, state_key: str | None) -> None:
        """Write a whole tensor into this process's part of ZeRO's fp32 copy of ``param`` (or of its AdamW state
        ``state_key``). ZeRO-3 goes through the local setter with the slice computed here: a partition is a
        contiguous range of the flattened parameter, zero-padded at the end of the last, and DeepSpeed's whole-tensor
        setter slices past the end of that padded last partition whenever the size does not divide evenly."""
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        value = value.to(self.device, torch.float32)
        if self._zero_stage == 3:
            size = safe_get_local_fp32_param(param).numel()
            padded = nn.functional.pad(value.flatten(), (0, size * self.world_size - value.numel()))
            value = padded.narrow(0, size * self.rank, size)
            if state_key is None:
                safe_set_local_fp32_param(param, value)
            else:
                safe_set_local_optimizer_state(param, value, state_key)
        elif state_key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, state_key)

    # The next two methods are the only ones that touch ZeRO internals (pinned by the extra's ``deepspeed<0.20``, and
    # exercised per stage by the tests).

    def _link_fragments(self) -> None:
        """Point every parameter's tensor fragment at its slice of the AdamW state (ZeRO 1/2).

        ZeRO 1/2 link them after their first optimizer step, but while stepping one parameter group at a time, so
        with more than one group (ours: decay and no-decay) only the first group's fragments get linked, and
        ``safe_get_full_optimizer_state`` fails for the rest. Relinking outside a step covers every group.
        """
        if self._zero_stage in (1, 2):
            zero_optimizer = self._engine.optimizer
            zero_optimizer._hp_optimizer_states_linked = False
            zero_optimizer._lazy_init_hp_params_optimizer_state()

    def _materialize_adam_state(self, optimizer: torch.optim.Optimizer, step: float, keys: list[str]) -> None:
        """Create AdamW's state on ZeRO's flat fp32 partitions, which only a first step would otherwise create:
        stage 1/2 hold one partition per group as the group's only parameter; stage 3 keeps them in
        ``fp32_partitioned_groups_flat`` (its groups' parameter lists are empty between steps)."""
        zero_optimizer = self._engine.optimizer
        if self._zero_stage == 3:
            flats = list(zero_optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [param for group in optimizer.param_groups for param in group["params"]]
        on_device = any(group.get("fused") or group.get("capturable") for group in optimizer.param_groups)
        for flat in flats:
            state = optimizer.state[flat]
            step_device = flat.device if on_device else torch.device("cpu")
            state["step"] = torch.tensor(step, dtype=torch.float32, device=step_device)
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        self._link_fragments()

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            from deepspeed import comm

            comm.destroy_process_group()
            self._owns_group = False
        self._restore_environment()


def _zeros_of_full_shape(param: torch.Tensor) -> torch.Tensor:
    """Zeros of a parameter's whole shape (a ZeRO-3 parameter is empty outside forward; ``ds_shape`` is its shape)."""
    shape = getattr(param, "ds_shape", None)
    return torch.zeros(shape if shape is not None else param.shape, dtype=torch.float32)


def _fill_rendezvous() -> list[str]:
    """Set what torchrun would for a single process when nothing launched this one; returns the names it set."""
    present = [name for name in _RENDEZVOUS if name in os.environ]
    if "RANK" in present or "WORLD_SIZE" in present:
        missing = [name for name in _RENDEZVOUS if name not in os.environ]
        if missing:
            raise ConfigError(
                f"backend.kind=deepspeed: the launcher set RANK/WORLD_SIZE but not {', '.join(missing)}; launch with "
                f"torchrun (or deepspeed --no_local_rank), or unset them to run one process"
            )
        return []
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    filled = []
    for name in _RENDEZVOUS:
        if name not in os.environ:
            os.environ[name] = defaults[name] if name in defaults else str(_free_port())
            filled.append(name)
    return filled


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _skip_shared_memory_op(deepspeed: Any) -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (minutes of C++ on first use).

    Its comm backend builds the op whenever it starts on a CPU accelerator, but only inference's all-reduce calls it;
    training reduces through torch.distributed (gloo). DeepSpeed consults its op-compatibility table, a dict it keeps
    in ``deepspeed.ops`` so that edits persist, before building; marking the op unavailable there skips the build.
    """
    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False

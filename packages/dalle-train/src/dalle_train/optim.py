"""AdamW with two parameter groups: weight decay for weight matrices and convolution kernels only.

Decaying a LayerNorm gain, a bias or an embedding row pulls it towards zero for no regularising benefit (an embedding
row that a batch does not use would shrink every step), so those go in a group with ``weight_decay=0``.
"""

from __future__ import annotations

import torch
from torch import nn

from dalle_train.config import OptimizerConfig

# Normalisation layers: their parameters are scales and shifts, never decayed.
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORMS = (*_NORMS, nn.RMSNorm)


def decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that do not, in model order."""
    no_decay_modules = (nn.Embedding, nn.EmbeddingBag, *_NORMS)
    owner: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{param_name}" if module_name else param_name] = module
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ndim < 2: biases, norm gains and free vectors such as a learned BOS embedding.
        if param.ndim < 2 or isinstance(owner.get(name), no_decay_modules):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def build_adamw(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, with the decay groups of :func:`decay_groups`."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model)
    groups = [
        {"params": [params[name] for name in decay], "weight_decay": config.weight_decay},
        {"params": [params[name] for name in no_decay], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    # The fused kernel updates every parameter in one pass instead of a dozen elementwise passes: about 8% of a
    # training step of the S benchmark on CPU (docs/benchmarks.md).
    fused = all(params[name].is_floating_point() and params[name].device.type in ("cpu", "cuda") for name in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)

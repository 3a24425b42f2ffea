"""The discrete VAE's training objective: reconstruction plus a KL term towards a uniform prior over codes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VAELoss:
    """What :meth:`dalle_vae.DiscreteVAE.loss` returns.

    - ``loss``: scalar to minimise, ``reconstruction_loss + kl_div_loss_weight * kl_loss``.
    - ``reconstruction_loss``: scalar MSE (or smooth L1) between decoder output and the normalized input.
    - ``kl_loss``: scalar ``KL(q(z|x) || uniform)`` summed over grid positions, averaged over the batch.
    - ``reconstructions``: ``float[B, C, H, W]`` in image space ``[0, 1]`` (normalization undone, clamped), detached.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_loss: torch.Tensor
    reconstructions: torch.Tensor


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logits) || uniform)`` over dim 1 of ``[B, num_tokens, ...]``, summed over positions, mean over B.

    Equals ``sum_{positions, k} q_k * log(q_k * num_tokens) / B``. Computed as DALLE-pytorch does, with ``F.kl_div`` on
    log-probabilities, except that the uniform log-prior is expanded to the full shape so that ``'batchmean'`` divides
    by the batch size (DALLE-pytorch passes a 1-element prior, so its ``'batchmean'`` divides by 1).
    """
    num_tokens = logits.shape[1]
    log_qy = logits.movedim(1, -1).reshape(logits.shape[0], -1, num_tokens).log_softmax(dim=-1)
    log_uniform = torch.full_like(log_qy, -math.log(num_tokens))
    return F.kl_div(log_uniform, log_qy, reduction="batchmean", log_target=True)

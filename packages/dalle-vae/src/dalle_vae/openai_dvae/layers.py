"""OpenAI's dVAE encoder and decoder, re-implemented with standard torch layers.

The layout follows the ``dall_e`` package (``blocks.input``, ``blocks.group_1.block_1.res_path.conv_1``, ...) so a
weight's name here is its name there with ``w``/``b`` spelled ``weight``/``bias``. Each residual block computes
``id_path(x) + post_gain * res_path(x)``: ``id_path`` is a 1x1 conv when the width changes (else identity),
``res_path`` four (ReLU, conv) pairs through a bottleneck a quarter of the block's output width, and
``post_gain = 1 / (4 * blocks_per_group) ** 2``. Every conv pads to keep the spatial size.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dalle_vae.openai_dvae.config import GROUP_COUNT, OpenAIDVAEConfig

ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


class ResidualBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)`` (see the module docstring)."""

    def __init__(self, n_in: int, n_out: int, kernels: tuple[int, int, int, int], post_gain: float) -> None:
        super().__init__()
        self.post_gain = post_gain
        self.id_path: nn.Module = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_out // 4, n_out // 4, n_out // 4, n_out)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for index, kernel in enumerate(kernels):
            layers[f"relu_{index + 1}"] = nn.ReLU()
            layers[f"conv_{index + 1}"] = _conv(widths[index], widths[index + 1], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths: list[tuple[int, int]], kernels: tuple[int, int, int, int], gain: float, resample: nn.Module | None):
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (n_in, n_out) in enumerate(widths):
        layers[f"block_{index + 1}"] = ResidualBlock(n_in, n_out, kernels, gain)
    if resample is not None:
        layers["pool" if isinstance(resample, nn.MaxPool2d) else "upsample"] = resample
    return nn.Sequential(layers)


def _block_widths(first_in: int, width: int, count: int) -> list[tuple[int, int]]:
    return [(first_in if index == 0 else width, width) for index in range(count)]


class OpenAIEncoder(nn.Module):
    """``[B, channels, S, S]`` (pixels mapped by :func:`map_pixels`) -> logits ``[B, vocab_size, S / 8, S / 8]``."""

    def __init__(self, config: OpenAIDVAEConfig) -> None:
        super().__init__()
        hidden, count = config.encoder_hidden, config.encoder_blocks_per_group
        gain = 1 / (GROUP_COUNT * count) ** 2
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(config.channels, hidden, 7))
        width = hidden
        for group in range(1, GROUP_COUNT + 1):
            out = hidden * 2 ** (group - 1)  # 1, 2, 4, 8 times hidden
            pool = nn.MaxPool2d(kernel_size=2) if group < GROUP_COUNT else None
            layers[f"group_{group}"] = _group(_block_widths(width, out, count), ENCODER_KERNELS, gain, pool)
            width = out
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(width, config.vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class OpenAIDecoder(nn.Module):
    """Code grids ``int64[B, f, f]`` -> ``[B, 2 * channels, 8f, 8f]`` statistics (the first ``channels`` are means)."""

    def __init__(self, config: OpenAIDVAEConfig) -> None:
        super().__init__()
        hidden, count = config.decoder_hidden, config.decoder_blocks_per_group
        gain = 1 / (GROUP_COUNT * count) ** 2
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(config.vocab_size, config.decoder_init, 1))
        width = config.decoder_init
        for group in range(1, GROUP_COUNT + 1):
            out = hidden * 2 ** (GROUP_COUNT - group)  # 8, 4, 2, 1 times hidden
            upsample = nn.Upsample(scale_factor=2, mode="nearest") if group < GROUP_COUNT else None
            layers[f"group_{group}"] = _group(_block_widths(width, out, count), DECODER_KERNELS, gain, upsample)
            width = out
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(width, 2 * config.channels, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # The input conv reads one-hot codes; a 1x1 conv of a one-hot vector is its weight column plus the bias, so
        # look the column up instead of building a [B, vocab_size, f, f] one-hot tensor (exactly the same values).
        # The permuted view is channels-last in memory, as a conv of DALLE-pytorch's permuted one-hot tensor is; the
        # convs after it then pick the same kernels, so outputs match the dall_e package bit for bit.
        conv = cast(nn.Conv2d, self.blocks.get_submodule("input"))
        columns = conv.weight.flatten(1).t()  # [vocab_size, decoder_init]
        x = (F.embedding(codes, columns) + cast(torch.Tensor, conv.bias)).permute(0, 3, 1, 2)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x

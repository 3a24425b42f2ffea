"""The VQGAN encoder and decoder of taming-transformers, re-implemented (parameter names kept for its checkpoints).

Building blocks: ``ResnetBlock`` (GroupNorm, swish, 3x3 conv, twice, plus a 1x1 shortcut when the width changes),
``AttnBlock`` (single-head self-attention over all positions, residual), ``Downsample`` (3x3 stride-2 conv after
padding right and bottom by one, or 2x2 average pooling) and ``Upsample`` (nearest 2x, then a 3x3 conv). Dropout is
left out: these are tokenizers, used in eval mode, where taming's dropout is the identity.

Some operations are written exactly as taming computes them (``x * sigmoid(x)`` rather than ``F.silu``, attention
as two batched matmuls rather than ``scaled_dot_product_attention``): the results are the same mathematically but
round differently, and VQ code choices must match the reference bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalle_vae.vqgan.config import GROUP_NORM_GROUPS, VQGanConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUP_NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, stride=1, padding=1)


def conv1x1(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=1, stride=1, padding=0)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.norm1 = group_norm(n_in)
        self.conv1 = conv3x3(n_in, n_out)
        self.norm2 = group_norm(n_out)
        self.conv2 = conv3x3(n_out, n_out)
        if n_in != n_out:
            self.nin_shortcut = conv1x1(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv1x1(channels, channels)
        self.k = conv1x1(channels, channels)
        self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        batch, channels, height, width = x.shape
        queries = self.q(normed).reshape(batch, channels, height * width).permute(0, 2, 1)  # [B, HW, C]
        keys = self.k(normed).reshape(batch, channels, height * width)  # [B, C, HW]
        values = self.v(normed).reshape(batch, channels, height * width)  # [B, C, HW]
        weights = torch.softmax(torch.bmm(queries, keys) * channels ** (-0.5), dim=2)  # [B, query, key]
        attended = torch.bmm(values, weights.permute(0, 2, 1)).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            # Asymmetric padding (right and bottom only), which Conv2d's padding cannot express.
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention at the attention resolutions, then resampling."""

    def __init__(
        self, widths: list[tuple[int, int]], with_attention: bool, resample: nn.Module | None, resample_name: str
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(n_in, n_out) for n_in, n_out in widths)
        self.attn = nn.ModuleList(AttnBlock(n_out) for _, n_out in widths) if with_attention else nn.ModuleList()
        # taming names it "downsample" in the encoder and "upsample" in the decoder; the name is in the weight keys.
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[index](x)
        if self.resample_name is None:
            return x
        return self.get_submodule(self.resample_name)(x)


class Middle(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """``[B, in_channels, S, S]`` in ``[-1, 1]`` -> ``[B, z_channels, S / f, S / f]``."""

    def __init__(self, config: VQGanConfig) -> None:
        super().__init__()
        levels = len(config.ch_mult)
        self.conv_in = conv3x3(config.in_channels, config.ch)
        self.down = nn.ModuleList()
        resolution, width = config.resolution, config.ch
        for index, multiplier in enumerate(config.ch_mult):
            out = config.ch * multiplier
            widths = [(width if block == 0 else out, out) for block in range(config.num_res_blocks)]
            last = index == levels - 1
            downsample = None if last else Downsample(out, config.resamp_with_conv)
            self.down.append(Level(widths, resolution in config.attn_resolutions, downsample, "downsample"))
            width = out
            resolution = resolution if last else resolution // 2
        self.mid = Middle(width)
        self.norm_out = group_norm(width)
        self.conv_out = conv3x3(width, config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(swish(self.norm_out(x)))


class Decoder(nn.Module):
    """``[B, z_channels, f, f]`` -> ``[B, out_ch, f * 2**(levels - 1), ...]`` in roughly ``[-1, 1]``.

    ``up[i]`` works at the same resolution as the encoder's ``down[i]``; they run from the last index to the first.
    """

    def __init__(self, config: VQGanConfig) -> None:
        super().__init__()
        levels = len(config.ch_mult)
        width = config.ch * config.ch_mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        self.conv_in = conv3x3(config.z_channels, width)
        self.mid = Middle(width)
        up: list[Level] = []
        for index in reversed(range(levels)):
            out = config.ch * config.ch_mult[index]
            widths = [(width if block == 0 else out, out) for block in range(config.num_res_blocks + 1)]
            upsample = Upsample(out, config.resamp_with_conv) if index != 0 else None
            up.append(Level(widths, resolution in config.attn_resolutions, upsample, "upsample"))
            width = out
            resolution = resolution * 2 if index != 0 else resolution
        self.up = nn.ModuleList(reversed(up))
        self.norm_out = group_norm(width)
        self.conv_out = conv3x3(width, config.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(swish(self.norm_out(x)))

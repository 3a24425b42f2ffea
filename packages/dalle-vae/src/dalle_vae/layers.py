"""The convolutional encoder and decoder of the discrete VAE (DALLE-pytorch's layout, no norm or dropout layers)."""

from __future__ import annotations

import torch
from torch import nn

from dalle_vae.config import DiscreteVAEConfig


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))``, channel count preserved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


def build_encoder(config: DiscreteVAEConfig) -> nn.Sequential:
    """``[B, channels, S, S]`` -> logits ``[B, num_tokens, S / 2**num_layers, S / 2**num_layers]``."""
    layers: list[nn.Module] = []
    in_channels = config.channels
    for _ in range(config.num_layers):
        layers += [nn.Conv2d(in_channels, config.hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
        in_channels = config.hidden_dim
    layers += [ResBlock(config.hidden_dim) for _ in range(config.num_resnet_blocks)]
    layers.append(nn.Conv2d(config.hidden_dim, config.num_tokens, 1))
    return nn.Sequential(*layers)


def build_decoder(config: DiscreteVAEConfig) -> nn.Sequential:
    """Codebook vectors ``[B, codebook_dim, f, f]`` -> images ``[B, channels, f * 2**num_layers, ...]`` (normalized).

    Without ``decoder_input_conv`` (DALLE-pytorch's layout when it has no resnet blocks) the first transposed conv
    reads the ``codebook_dim`` channels directly.
    """
    layers: list[nn.Module] = []
    in_channels = config.codebook_dim
    if config.decoder_input_conv:
        layers.append(nn.Conv2d(config.codebook_dim, config.hidden_dim, 1))
        in_channels = config.hidden_dim
    layers += [ResBlock(config.hidden_dim) for _ in range(config.num_resnet_blocks)]
    for _ in range(config.num_layers):
        layers += [nn.ConvTranspose2d(in_channels, config.hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
        in_channels = config.hidden_dim
    layers.append(nn.Conv2d(config.hidden_dim, config.channels, 1))
    return nn.Sequential(*layers)

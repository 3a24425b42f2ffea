from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TinyImages(Dataset):
    """Coloured squares on black, 16x16, with a caption naming the colour: learnable in a few steps."""

    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}

    def __init__(self, count: int = 16) -> None:
        self.items = []
        names = list(self.colours)
        for index in range(count):
            name = names[index % len(names)]
            image = torch.zeros(3, 16, 16)
            offset = (index // len(names)) % 8
            image[:, offset : offset + 8, offset : offset + 8] = torch.tensor(self.colours[name]).view(3, 1, 1)
            self.items.append((image, f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

"""End to end: the model memorises two (text, image) pairs, then greedy generation reproduces each image."""

from __future__ import annotations

import torch

from dalle_transformer import DALLE, DALLEConfig


def test_overfits_two_pairs_and_generates_them_back() -> None:
    torch.manual_seed(0)
    config = DALLEConfig(
        num_text_tokens=12,
        text_seq_len=4,
        num_image_tokens=16,
        image_fmap_size=3,
        dim=64,
        depth=2,
        heads=4,
        dim_head=16,
        ff_mult=2,
    )
    model = DALLE(config)
    text = torch.tensor([[3, 7, 0, 0], [5, 0, 0, 0]])
    image = torch.randint(
        0, config.num_image_tokens, (2, config.image_seq_len), generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(image[0], image[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        optimizer.zero_grad()
        loss = model.loss(text, image)
        loss.loss.backward()
        optimizer.step()
        first = first if first is not None else float(loss.loss.detach())
    assert float(loss.image_loss.detach()) < 0.05 < first
    for use_cache in (True, False):
        generated = model.generate_image_ids(text, top_k=1, use_cache=use_cache)
        assert torch.equal(generated, image)
    # Each text conditions its own image, also one at a time.
    for i in range(2):
        assert torch.equal(model.generate_image_ids(text[i : i + 1, :2], top_k=1), image[i : i + 1])

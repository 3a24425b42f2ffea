"""Pre-tokenized training data: image ids are computed once, so transformer training never runs the VAE encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from dalle_core.errors import DataError, ShapeError
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_train.progress import make_progress


@dataclass(frozen=True)
class TokenData:
    """``text_ids: int64[N, text_seq_len]`` beside ``image_ids: int64[N, image_seq_len]`` and the captions."""

    text_ids: torch.Tensor
    image_ids: torch.Tensor
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.text_ids.shape[0] != self.image_ids.shape[0] or self.text_ids.shape[0] != len(self.captions):
            raise ShapeError(
                f"expected as many texts as images and captions, got {self.text_ids.shape[0]} texts, "
                f"{self.image_ids.shape[0]} images and {len(self.captions)} captions"
            )
        if self.text_ids.shape[0] == 0:
            raise DataError("the tokenized dataset is empty")

    def __len__(self) -> int:
        return int(self.text_ids.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TokenData:
        index = torch.as_tensor(indices, dtype=torch.long)
        return TokenData(self.text_ids[index], self.image_ids[index], tuple(self.captions[i] for i in index.tolist()))


@torch.no_grad()
def pretokenize(
    dataset: Dataset,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    text_seq_len: int,
    batch_size: int = 64,
    description: str = "encode images",
) -> TokenData:
    """Encode every ``(image, caption)`` of ``dataset`` into token ids (captions longer than the context raise)."""
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise DataError("cannot tokenize an empty dataset")
    texts, images, captions = [], [], []
    with make_progress() as progress:
        task = progress.add_task(description, total=count, status="")
        for start in range(0, count, batch_size):
            items = [dataset[i] for i in range(start, min(count, start + batch_size))]
            batch_captions = [caption for _, caption in items]
            texts.append(text_tokenizer.encode(batch_captions, text_seq_len))
            images.append(image_tokenizer.encode(torch.stack([image for image, _ in items])))
            captions.extend(batch_captions)
            progress.advance(task, len(items))
    return TokenData(torch.cat(texts), torch.cat(images), tuple(captions))


class TokenDataset(Dataset):
    """:class:`TokenData` as a map-style dataset of ``{"text_ids", "image_ids", "caption"}`` items."""

    def __init__(self, data: TokenData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {
            "text_ids": self.data.text_ids[index],
            "image_ids": self.data.image_ids[index],
            "caption": self.data.captions[index],
        }

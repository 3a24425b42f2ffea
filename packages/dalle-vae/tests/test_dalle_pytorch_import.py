"""Import of DALLE-pytorch ``vae.pt`` files, checked against a naive re-implementation of its DiscreteVAE.

``DallePytorchVAE`` below is written from DALLE-pytorch 1.6.6's description of its DiscreteVAE (nested
``Sequential(conv, ReLU)`` pairs, ResBlocks with ``net.{0,2,4}``, a decoder input conv only with resnet blocks, its
default normalization, ``F.gumbel_softmax`` and the ReinMax formula): its ``state_dict`` supplies DALLE-pytorch's
parameter names, its forward the reference numbers.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle_core import CheckpointError
from dalle_vae import DiscreteVAE, discrete_vae_from_dalle_pytorch, load_dalle_pytorch_vae


class ResBlock(nn.Module):
    def __init__(self, chan: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(chan, chan, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class DallePytorchVAE(nn.Module):
    def __init__(
        self,
        image_size=256,
        num_tokens=512,
        codebook_dim=512,
        num_layers=3,
        num_resnet_blocks=0,
        hidden_dim=64,
        channels=3,
        temperature=0.9,
        straight_through=False,
        reinmax=False,
        normalization=((0.5, 0.5, 0.5, 0.0), (0.5, 0.5, 0.5, 1.0)),
    ) -> None:
        super().__init__()
        self.temperature, self.straight_through, self.reinmax = temperature, straight_through, reinmax
        self.codebook = nn.Embedding(num_tokens, codebook_dim)
        encoder: list[nn.Module] = []
        widths = [channels] + [hidden_dim] * num_layers
        for layer in range(num_layers):
            encoder.append(
                nn.Sequential(nn.Conv2d(widths[layer], widths[layer + 1], 4, stride=2, padding=1), nn.ReLU())
            )
        encoder += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        encoder.append(nn.Conv2d(hidden_dim, num_tokens, 1))
        decoder: list[nn.Module] = []
        if num_resnet_blocks > 0:
            decoder.append(nn.Conv2d(codebook_dim, hidden_dim, 1))
            decoder += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        first = hidden_dim if num_resnet_blocks > 0 else codebook_dim
        for layer in range(num_layers):
            n_in = first if layer == 0 else hidden_dim
            decoder.append(nn.Sequential(nn.ConvTranspose2d(n_in, hidden_dim, 4, stride=2, padding=1), nn.ReLU()))
        decoder.append(nn.Conv2d(hidden_dim, channels, 1))
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.normalization = None if normalization is None else tuple(t[:channels] for t in normalization)

    def norm(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalization is None:
            return images
        means, stds = (torch.as_tensor(t).view(1, -1, 1, 1) for t in self.normalization)
        return (images - means) / stds

    def codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.norm(images)).argmax(dim=1).flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        embeds = self.codebook(ids)
        side = int(math.sqrt(ids.shape[1]))
        return self.decoder(embeds.view(ids.shape[0], side, side, -1).permute(0, 3, 1, 2))

    def reconstruction_loss(self, images: torch.Tensor) -> torch.Tensor:
        images = self.norm(images)
        logits = self.encoder(images)
        one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=self.straight_through)
        if self.straight_through and self.reinmax:
            one_hot = one_hot.detach()
            pi0 = logits.softmax(dim=1)
            pi1 = (one_hot + (logits / self.temperature).softmax(dim=1)) / 2
            pi1 = ((torch.log(pi1.clamp(min=1e-20)) - logits).detach() + logits).softmax(dim=1)
            pi2 = 2 * pi1 - 0.5 * pi0
            one_hot = pi2 - pi2.detach() + one_hot
        sampled = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook.weight)
        return F.mse_loss(images, self.decoder(sampled))


def _reference(seed: int = 0, **hparams: object) -> DallePytorchVAE:
    torch.manual_seed(seed)
    model = DallePytorchVAE(**hparams)  # type: ignore[arg-type]
    with torch.no_grad():  # biases are zero-initialised in places; make every tensor matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def _write_vae_pt(path: Path, model: nn.Module, hparams: dict) -> Path:
    torch.save({"hparams": hparams, "weights": model.state_dict()}, path)
    return path


TRAIN_VAE_HPARAMS = [  # what DALLE-pytorch's train_vae.py writes into vae.pt
    dict(image_size=16, num_layers=2, num_tokens=24, channels=3, codebook_dim=12, hidden_dim=16, num_resnet_blocks=0),
    dict(image_size=16, num_layers=2, num_tokens=24, channels=3, codebook_dim=12, hidden_dim=16, num_resnet_blocks=2),
    dict(image_size=8, num_layers=1, num_tokens=10, channels=1, codebook_dim=6, hidden_dim=8, num_resnet_blocks=1),
]


@pytest.mark.parametrize("hparams", TRAIN_VAE_HPARAMS, ids=["no-resblocks", "two-resblocks", "grayscale"])
def test_imported_vae_matches_dalle_pytorch(tmp_path: Path, hparams: dict) -> None:
    reference = _reference(**hparams)
    ours = load_dalle_pytorch_vae(_write_vae_pt(tmp_path / "vae.pt", reference, hparams))
    assert isinstance(ours, DiscreteVAE) and not ours.training
    assert ours.config.decoder_input_conv == (hparams["num_resnet_blocks"] > 0)
    channels, size = hparams["channels"], hparams["image_size"]
    assert ours.config.normalization == ((0.5,) * channels, (0.5,) * channels)  # DALLE-pytorch's default, cut
    images = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.logits(images), reference.encoder(reference.norm(images)))
        ids = ours.encode(images)
        assert torch.equal(ids, reference.codebook_indices(images))
        random_ids = torch.randint(0, hparams["num_tokens"], ids.shape, generator=torch.Generator().manual_seed(2))
        for codes in (ids, random_ids):
            # DALLE-pytorch decodes to its normalized space, roughly [-1, 1]; ours maps back to [0, 1] images.
            expected = (reference.decode(codes) * 0.5 + 0.5).clamp(0, 1)
            assert torch.allclose(ours.decode(codes), expected, atol=1e-6)
    assert ours.decode(random_ids).std() > 0.01  # not a constant image: the comparison means something


@pytest.mark.parametrize(("straight_through", "reinmax"), [(False, False), (True, False), (True, True)])
def test_training_loss_and_gradients_match_dalle_pytorch(tmp_path: Path, straight_through: bool, reinmax: bool):
    hparams = dict(TRAIN_VAE_HPARAMS[1], straight_through=straight_through, reinmax=reinmax, temperature=0.7)
    reference = _reference(**hparams)
    ours = load_dalle_pytorch_vae(_write_vae_pt(tmp_path / "vae.pt", reference, hparams))
    assert (ours.config.straight_through, ours.config.reinmax, ours.config.temperature) == (*hparams.values(),)[-3:]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)  # both draw their Gumbel noise from the global generator, in the same order
    expected = reference.reconstruction_loss(images)
    torch.manual_seed(4)
    result = ours.loss(images)
    assert result.reconstruction_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    result.reconstruction_loss.backward()
    theirs = reference.encoder[0][0].weight.grad
    assert theirs is not None and theirs.abs().sum() > 0
    assert torch.allclose(ours.encoder[0].weight.grad, theirs, rtol=1e-4, atol=1e-7)


def test_hparams_are_carried_over_and_defaults_are_dalle_pytorchs() -> None:
    reference = _reference(image_size=16, num_layers=2)  # every other option at DALLE-pytorch's default
    hparams = {
        "image_size": 16,
        "num_layers": 2,
        "smooth_l1_loss": True,
        "kl_div_loss_weight": 0.5,
        "normalization": None,
    }
    model = discrete_vae_from_dalle_pytorch(hparams, reference.state_dict())
    config = model.config
    assert (config.num_tokens, config.codebook_dim, config.hidden_dim, config.channels) == (512, 512, 64, 3)
    assert (config.num_resnet_blocks, config.temperature, config.smooth_l1_loss) == (0, 0.9, True)
    assert config.kl_div_loss_weight == 0.5 and config.normalization is None
    # DALLE-pytorch ignores reinmax without straight_through; so does the import.
    assert not discrete_vae_from_dalle_pytorch({**hparams, "reinmax": True}, reference.state_dict()).config.reinmax


def test_a_dalle_pt_vae_can_be_imported_from_its_parts() -> None:
    """dalle.pt keeps the VAE as vae_params plus weights under 'vae.'; stripping the prefix is all it takes."""
    hparams = TRAIN_VAE_HPARAMS[0]
    reference = _reference(**hparams)
    dalle_weights = {f"vae.{name}": tensor for name, tensor in reference.state_dict().items()}
    dalle_weights["transformer.layers.0.weight"] = torch.zeros(1)
    vae_weights = {name[4:]: tensor for name, tensor in dalle_weights.items() if name.startswith("vae.")}
    model = discrete_vae_from_dalle_pytorch(hparams, vae_weights, "dalle.pt")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.encode(images), reference.codebook_indices(images))


def test_mismatched_weights_raise(tmp_path: Path) -> None:
    hparams = TRAIN_VAE_HPARAMS[1]
    weights = _reference(**hparams).state_dict()
    missing = {name: tensor for name, tensor in weights.items() if name != "decoder.0.bias"}
    with pytest.raises(CheckpointError, match=r"missing decoder\.0\.bias, unexpected none") as info:
        discrete_vae_from_dalle_pytorch(hparams, missing, "vae.pt")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match=r"unexpected extra\.weight"):
        discrete_vae_from_dalle_pytorch(hparams, {**weights, "extra.weight": torch.zeros(1)}, "vae.pt")
    # Weights of a model without resnet blocks under hparams that promise two: names do not line up.
    with pytest.raises(CheckpointError, match="missing"):
        discrete_vae_from_dalle_pytorch(hparams, _reference(**TRAIN_VAE_HPARAMS[0]).state_dict(), "vae.pt")
    wrong_shape = dict(weights, **{"codebook.weight": torch.zeros(5, 12)})
    with pytest.raises(CheckpointError, match=r"codebook\.weight has shape \(5, 12\), expected \(24, 12\)"):
        discrete_vae_from_dalle_pytorch(hparams, wrong_shape, "vae.pt")
    with pytest.raises(CheckpointError, match="unknown DALLE-pytorch DiscreteVAE option attn_types"):
        discrete_vae_from_dalle_pytorch({**hparams, "attn_types": ["full"]}, weights, "vae.pt")
    with pytest.raises(CheckpointError, match="channels: DALLE-pytorch's default normalization covers 1 to 4"):
        discrete_vae_from_dalle_pytorch({**hparams, "channels": 5}, weights, "vae.pt")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_dalle_pytorch_vae(tmp_path / "nowhere.pt")
    torch.save({"weights": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="expected a DALLE-pytorch vae.pt with 'hparams' and 'weights'"):
        load_dalle_pytorch_vae(tmp_path / "partial.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch.save file"):
        load_dalle_pytorch_vae(tmp_path / "garbage.pt")


class CustomHparams(dict):
    """A dict subclass from a user's training script: not a plain container, so weights_only refuses it."""


def test_pickled_objects_need_an_explicit_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hparams = TRAIN_VAE_HPARAMS[0]
    reference = _reference(**hparams)
    module = types.ModuleType("user_training_script")
    CustomHparams.__module__ = "user_training_script"
    module.CustomHparams = CustomHparams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "user_training_script", module)
    path = tmp_path / "vae.pt"
    torch.save({"hparams": CustomHparams(hparams), "weights": reference.state_dict()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="hparams holds a pickled user_training_script.CustomHparams") as info:
        load_dalle_pytorch_vae(path)
    assert "trust_pickle=True" in str(info.value) and len(str(info.value).splitlines()) == 1
    model = load_dalle_pytorch_vae(path, trust_pickle=True)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(model.encode(images), reference.codebook_indices(images))


def test_hparams_with_bad_values_raise_checkpoint_error() -> None:
    weights = _reference(**TRAIN_VAE_HPARAMS[0]).state_dict()
    with pytest.raises(CheckpointError, match=r"hparams: num_layers must be"):
        discrete_vae_from_dalle_pytorch({**TRAIN_VAE_HPARAMS[0], "num_layers": "two"}, weights, "vae.pt")
    with pytest.raises(CheckpointError, match=r"hparams: normalization must be a pair"):
        discrete_vae_from_dalle_pytorch({**TRAIN_VAE_HPARAMS[0], "normalization": 0.5}, weights, "vae.pt")

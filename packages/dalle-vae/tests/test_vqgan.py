"""VQGAN tokenizers from taming-transformers checkpoints: strict loading, quantizers, the tokenizer contract.

Numerical parity with the taming package itself is in test_taming_parity.py (``taming`` extra).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from vqgan_files import TINY_DDCONFIG, taming_parameter_shapes, write_taming_files

from dalle_core import CheckpointError, ConfigError, ImageTokenizer, registry
from dalle_core.testing import ImageTokenizerContract
from dalle_vae import VQGanConfig, VQGanVAE
from dalle_vae.vqgan.layers import AttnBlock


@pytest.mark.parametrize("gumbel", [False, True], ids=["VQModel", "GumbelVQ"])
def test_loads_taming_checkpoint_strictly(tmp_path: Path, gumbel: bool) -> None:
    checkpoint, config, state = write_taming_files(tmp_path, gumbel=gumbel)
    # The file holds a Lightning callback class: torch's weights_only loader refuses it, ours reads around it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint, weights_only=True)
    model = VQGanVAE.from_taming(checkpoint, config)
    assert model.config.quantizer == ("gumbel" if gumbel else "vector")
    assert (model.num_tokens, model.image_size, model.fmap_size, model.channels) == (48, 16, 8, 3)
    ours = model.state_dict()
    assert set(ours) == set(state)  # exactly taming's names, nothing left at random initialisation
    assert all(torch.equal(ours[name], state[name]) for name in state)


def test_config_from_yaml(tmp_path: Path) -> None:
    _, config_path, _ = write_taming_files(tmp_path, gumbel=True)
    model = VQGanVAE.from_taming(tmp_path / "model.ckpt", config_path, image_size=32)
    expected = VQGanConfig(
        quantizer="gumbel",
        n_embed=48,
        embed_dim=32,
        z_channels=32,
        resolution=16,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        image_size=32,
    )
    assert model.config == expected and model.fmap_size == 16
    # The DALLE-pytorch defaults: f16 1024 codes, as in taming's configs/imagenet_vqgan.yaml.
    imagenet = {
        "double_z": False,
        "z_channels": 256,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "dropout": 0.0,
    }
    data = {
        "model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {"embed_dim": 256, "n_embed": 1024, "ddconfig": imagenet},
        }
    }
    (tmp_path / "imagenet.yaml").write_text(yaml.safe_dump(data))
    from dalle_vae.vqgan import read_taming_yaml

    config = read_taming_yaml(tmp_path / "imagenet.yaml")
    assert (config.n_embed, config.fmap_size, config.size) == (1024, 16, 256)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(target="taming.models.vqgan.EMAVQ"), "model.target must be one of"),
        (lambda m: m["params"].pop("n_embed"), "missing model.params.n_embed"),
        (lambda m: m["params"]["ddconfig"].update(double_z=True), "double_z must be false"),
        (lambda m: m["params"]["ddconfig"].update(ch=48), "ch must be a multiple of 32"),
        (lambda m: m["params"]["ddconfig"].update(num_res_blocks="two"), "num_res_blocks: expected an integer"),
        (lambda m: m["params"].update(remap="used_codes.npy"), "remap"),
        (lambda m: m["params"]["ddconfig"].update(out_ch=1), "out_ch must equal in_channels"),
    ],
)
def test_bad_yaml_raises_config_error(tmp_path: Path, edit, message: str) -> None:
    checkpoint, config_path, _ = write_taming_files(tmp_path, lightning_objects=False)
    data = yaml.safe_load(config_path.read_text())
    edit(data["model"])
    config_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as info:
        VQGanVAE.from_taming(checkpoint, config_path)
    assert str(config_path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_missing_unexpected_and_misshapen_weights_raise(tmp_path: Path) -> None:
    checkpoint, config, _ = write_taming_files(tmp_path / "a", drop=("decoder.up.1.attn.0.q.weight",))
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.up\.1\.attn\.0\.q\.weight, unexpected keys none"):
        VQGanVAE.from_taming(checkpoint, config)
    extra = {"encoder.down.0.block.0.temb_proj.weight": torch.zeros(32, 512)}
    checkpoint, config, _ = write_taming_files(tmp_path / "b", extra_weights=extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys encoder\.down\.0\.block\.0\.temb_proj\.weight"):
        VQGanVAE.from_taming(checkpoint, config)
    # A Gumbel checkpoint under a VQModel config: quantize.proj/embed are unexpected, quantize.embedding is missing.
    checkpoint, _, _ = write_taming_files(tmp_path / "c", gumbel=True)
    _, config, _ = write_taming_files(tmp_path / "d", gumbel=False)
    with pytest.raises(
        CheckpointError, match=r"missing keys quantize\.embedding\.weight, unexpected keys quantize\.embed"
    ):
        VQGanVAE.from_taming(checkpoint, config)
    checkpoint, config, _ = write_taming_files(tmp_path / "e", n_embed=64)
    _, small_config, _ = write_taming_files(tmp_path / "f", n_embed=48)
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight has shape \(64, 32\), expected \(48, 32\)"):
        VQGanVAE.from_taming(checkpoint, small_config)


def test_checkpoint_without_state_dict_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, config, _ = write_taming_files(tmp_path)
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="expected a Lightning checkpoint with a 'state_dict' entry"):
        VQGanVAE.from_taming(tmp_path / "other.ckpt", config)
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match=r"VQGAN files not found: .*vqgan\.1024\.model\.ckpt, .*config\.yml"):
        VQGanVAE.from_taming()


def test_lightning_objects_never_run(tmp_path: Path) -> None:
    """The callback class in the checkpoint is recorded, not imported: loading works without pytorch_lightning."""
    checkpoint, config, _ = write_taming_files(tmp_path)
    from dalle_vae.pickles import PickledObject, load_torch_file

    data = load_torch_file(checkpoint)
    (key,) = data["callbacks"]
    assert issubclass(key, PickledObject) and key.pickled_name.endswith("model_checkpoint.ModelCheckpoint")
    assert torch.equal(data["callbacks"][key]["best_model_score"], torch.tensor(0.5))
    assert VQGanVAE.from_taming(checkpoint, config).num_tokens == 48


def _model(gumbel: bool) -> VQGanVAE:
    config = VQGanConfig(
        quantizer="gumbel" if gumbel else "vector",
        n_embed=48,
        embed_dim=32,
        z_channels=32,
        resolution=16,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
    )
    torch.manual_seed(0)
    return VQGanVAE(config)


def test_vector_quantizer_picks_nearest_code() -> None:
    model = _model(gumbel=False)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.quant_conv(model.encoder(2 * images - 1))  # images enter as [-1, 1]
        flat = features.permute(0, 2, 3, 1).reshape(-1, 32)
        distances = torch.cdist(flat.double(), model.quantize.embedding.weight.double())
    assert torch.equal(model.encode(images).flatten(), distances.argmin(dim=1))
    with pytest.raises(ConfigError, match="sample=True needs a Gumbel quantizer"):
        model.encode(images, sample=True)


def test_gumbel_quantizer_argmax_by_default_and_sampling_on_request() -> None:
    model = _model(gumbel=True)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(2 * images - 1)))
    ids = model.encode(images)
    assert torch.equal(ids, logits.argmax(dim=1).flatten(1))  # noise-free, deterministic
    first = model.encode(images, sample=True, generator=torch.Generator().manual_seed(2))
    again = model.encode(images, sample=True, generator=torch.Generator().manual_seed(2))
    other = model.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, ids)
    # Gumbel-max: argmax(logits - log(E)), E ~ Exponential(1), from the same generator.
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(2)).log()
    assert torch.equal(first, (logits - noise).argmax(dim=1).flatten(1))


@pytest.mark.parametrize("gumbel", [False, True])
def test_decode_is_codebook_rows_through_decoder_in_unit_range(gumbel: bool) -> None:
    model = _model(gumbel)
    ids = torch.randint(0, 48, (2, 64), generator=torch.Generator().manual_seed(4))
    codebook = model.quantize.embed.weight if gumbel else model.quantize.embedding.weight
    vectors = codebook[ids].view(2, 8, 8, 32).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        output = model.decoder(model.post_quant_conv(vectors))
    expected = (output.clamp(-1, 1) + 1) / 2
    assert torch.allclose(model.decode(ids), expected, atol=1e-6)


def test_attention_block_is_softmax_attention() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        normed = block.norm(x)
        q, k, v = (layer(normed).flatten(2).transpose(1, 2) for layer in (block.q, block.k, block.v))  # [B, HW, C]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 32, 4, 4)
        expected = x + block.proj_out(attended)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_taming_key_list_covers_each_layer_kind() -> None:
    shapes = taming_parameter_shapes(TINY_DDCONFIG, 48, 32, gumbel=False)
    for name in (
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.attn.0.proj_out.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.mid.attn_1.k.bias",
    ):
        assert name in shapes, name
    assert "encoder.down.0.attn.0.q.weight" not in shapes  # 16 px is not an attention resolution


def test_avg_pool_downsampling_variant(tmp_path: Path) -> None:
    ddconfig = dict(TINY_DDCONFIG, resamp_with_conv=False)
    config = VQGanConfig(
        quantizer="vector",
        n_embed=8,
        embed_dim=32,
        z_channels=32,
        resolution=16,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resamp_with_conv=False,
    )
    names = set(VQGanVAE(config).state_dict())
    assert not any("downsample" in name or "upsample" in name for name in names)
    shapes = taming_parameter_shapes({**ddconfig, "attn_resolutions": []}, 8, 32, gumbel=False)
    assert names == {name for name in shapes if "sample.conv" not in name}


class TestVQGanContract(ImageTokenizerContract):
    def make_image_tokenizer(self) -> ImageTokenizer:
        return _model(gumbel=False)


class TestGumbelVQGanContract(ImageTokenizerContract):
    def make_image_tokenizer(self) -> ImageTokenizer:
        return _model(gumbel=True)


def test_saved_directory_reloads_through_the_registry(tmp_path: Path) -> None:
    checkpoint, config, _ = write_taming_files(tmp_path / "taming", gumbel=True)
    model = VQGanVAE.from_taming(checkpoint, config)
    model.save(tmp_path / "saved")
    loaded = registry.load_image_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, VQGanVAE) and loaded.config == model.config
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded.encode(images), model.encode(images))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quantizer": "gumbel", "embed_dim": 16}, "embed_dim must equal z_channels for a Gumbel quantizer"),
        ({"image_size": 21}, r"image_size must be divisible by 2\*\*\(len\(ch_mult\) - 1\)=2, got 21"),
        ({"quantizer": "ema"}, "quantizer must be 'vector' or 'gumbel'"),
        ({"ch_mult": ()}, "ch_mult must list at least one multiplier"),
        ({"ch_mult": "12"}, "ch_mult must be a list of integers"),
        ({"n_embed": 1}, "n_embed must be an integer >= 2"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    fields = dict(quantizer="vector", n_embed=8, embed_dim=32, z_channels=32, resolution=16, ch=32, ch_mult=(1, 2))
    with pytest.raises(ConfigError, match=message) as info:
        VQGanConfig(**{**fields, **overrides})
    assert len(str(info.value).splitlines()) == 1

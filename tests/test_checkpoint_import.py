"""`dalle checkpoint import`: DALLE-pytorch dalle.pt files (written here in train_dalle.py's format) become bundles
that `dalle generate` uses, with their VAE (DiscreteVAE, OpenAI's dVAE, taming VQGAN) and their text tokenizer.

The transformer's numbers are checked option by option in packages/dalle-transformer/tests/test_dalle_pytorch_*.py;
here: the whole file, the image and text tokenizers, the errors, and (when dalle_pytorch is installed) DALLE-pytorch
1.6.6 itself end to end.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.checkpoint_import import import_dalle_pytorch
from dalle.cli import main
from dalle_core.errors import CheckpointError, ConfigError

PACKAGE_TESTS = Path(__file__).resolve().parents[1] / "packages"
CLIP_VOCAB_SIZE = 49408
VAE_PARAMS = dict(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)
HPARAMS = dict(
    num_text_tokens=CLIP_VOCAB_SIZE,
    text_seq_len=6,
    dim=16,
    depth=1,
    heads=2,
    dim_head=8,
    reversible=False,
    loss_img_weight=7,
    attn_types=("full",),
    ff_dropout=0.0,
    attn_dropout=0.0,
    stable=False,
    shift_tokens=False,
    rotary_emb=False,
    shared_attn_ids=None,
    shared_ff_ids=None,
    share_input_output_emb=False,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The test machine's cores are shared: one thread each keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _empty_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DALLE-pytorch's download cache (default VQGAN / OpenAI files) points at an empty directory."""
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "no-cache"))


def package_test_helpers(package: str, name: str) -> ModuleType | None:
    """A helper module of packages/<package>/tests (they write DALLE-pytorch, taming and OpenAI files), if present."""
    path = PACKAGE_TESTS / package / "tests" / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"{package.replace('-', '_')}_tests_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the format of CLIP's bpe_simple_vocab_16e6.txt.gz (a header, then 48894 merges), with made-up
    merges: it tokenizes like CLIP's BPE, into CLIP's 49408 ids, without shipping CLIP's vocabulary."""
    from dalle_tokenizers.clip_vocab import NUM_MERGES, byte_symbols

    symbols = byte_symbols()
    pairs = itertools.product(symbols, [*symbols, *(symbol + "</w>" for symbol in symbols)])
    lines = ["#version: made up for tests", *(f"{a} {b}" for a, b in itertools.islice(pairs, NUM_MERGES))]
    path = tmp_path_factory.mktemp("clip") / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    return path


def dalle_pytorch_transformer(hparams: dict, image_tokens: int, fmap: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random transformer weights named as DALLE-pytorch 1.6.6 names them (full attention, learned positions)."""
    generator = torch.Generator().manual_seed(seed)
    dim, inner, text = hparams["dim"], hparams["heads"] * hparams["dim_head"], hparams["text_seq_len"]
    vocab = hparams["num_text_tokens"] + text

    def rand(*shape: int) -> torch.Tensor:
        return 0.5 * torch.randn(*shape, generator=generator)

    weights = {
        "text_emb.weight": rand(vocab, dim),
        "image_emb.weight": rand(image_tokens, dim),
        "text_pos_emb.weight": rand(text + 1, dim),
        "image_pos_emb.weights.0": rand(1, fmap, 1, dim),
        "image_pos_emb.weights.1": rand(1, 1, fmap, dim),
        "to_logits.0.weight": 1 + rand(dim),
        "to_logits.0.bias": rand(dim),
        "to_logits.1.weight": rand(vocab + image_tokens, dim),
        "to_logits.1.bias": rand(vocab + image_tokens),
    }
    for layer in range(hparams["depth"]):
        attn, ff = f"transformer.layers.layers.{layer}.0.", f"transformer.layers.layers.{layer}.1."
        for branch in (attn, ff):  # LayerScale(PreNorm(...))
            weights |= {branch + "scale": rand(1, 1, dim), branch + "fn.norm.weight": 1 + rand(dim)}
            weights[branch + "fn.norm.bias"] = rand(dim)
        module = attn + "fn.fn.fn."  # LayerScale -> PreNorm -> CachedAs -> Attention
        weights |= {module + "to_qkv.weight": rand(3 * inner, dim), module + "to_out.0.weight": rand(dim, inner)}
        weights[module + "to_out.0.bias"] = rand(dim)
        module = ff + "fn.fn."  # LayerScale -> PreNorm -> FeedForward (GEGLU)
        weights |= {module + "net.0.weight": rand(8 * dim, dim), module + "net.0.bias": rand(8 * dim)}
        weights |= {module + "net.3.weight": rand(dim, 4 * dim), module + "net.3.bias": rand(dim)}
    return weights


def dalle_pytorch_discrete_vae(vae_params: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A DiscreteVAE and its weights under DALLE-pytorch's names (dalle-vae's test reference when present)."""
    helpers = package_test_helpers("dalle-vae", "test_dalle_pytorch_import")
    if helpers is not None:
        reference = helpers._reference(**vae_params)
        return reference, reference.state_dict()
    from dalle_vae import DiscreteVAE
    from dalle_vae.dalle_pytorch import config_from_dalle_pytorch, dalle_pytorch_key_map

    config = config_from_dalle_pytorch(vae_params)
    model = DiscreteVAE(config).eval()
    ours = model.state_dict()
    return model, {theirs: ours[name] for theirs, name in dalle_pytorch_key_map(config).items()}


def write_dalle_pt(path: Path, model_hparams: dict, model_weights: dict, **entries: object) -> Path:
    """train_dalle.py's save_model(): hparams, vae_params, epoch, version, vae_class_name, weights, optimizer.

    ``entries`` replace those (``...`` removes one)."""
    save_obj = {
        "hparams": model_hparams,
        "vae_params": None,
        "epoch": 4,
        "version": "1.6.6",
        "vae_class_name": "DiscreteVAE",
        "weights": model_weights,
        "opt_state": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1]}]},
        "scheduler_state": None,
        **entries,
    }
    torch.save({key: value for key, value in save_obj.items() if value is not ...}, path)
    return path


def discrete_vae_dalle_pt(path: Path, **changes: object) -> tuple[Path, torch.nn.Module, dict]:
    """A dalle.pt trained with a DiscreteVAE (the VAE's weights saved beside the transformer's, under vae.)."""
    hparams = {**HPARAMS, **changes.pop("hparams", {})}  # type: ignore[dict-item]
    vae, vae_weights = dalle_pytorch_discrete_vae(VAE_PARAMS)
    weights = dalle_pytorch_transformer(hparams, VAE_PARAMS["num_tokens"], 4)
    weights |= {f"vae.{name}": tensor for name, tensor in vae_weights.items()}
    return write_dalle_pt(path, hparams, weights, vae_params=VAE_PARAMS, **changes), vae, weights


def test_import_then_generate(tmp_path: Path, clip_vocab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dalle_core.checkpoint import read_json
    from dalle_train.bundle import load_bundle

    dalle_pt, vae, weights = discrete_vae_dalle_pt(tmp_path / "dalle.pt")
    bundle_dir = tmp_path / "imported"
    assert (
        main(["checkpoint", "import", str(dalle_pt), "--output", str(bundle_dir), "--clip-vocab", str(clip_vocab)]) == 0
    )
    assert f"imported {dalle_pt} into {bundle_dir}" in capsys.readouterr().out

    bundle = load_bundle(bundle_dir)
    config = bundle.model.config
    assert (config.num_text_tokens, config.text_seq_len, config.num_image_tokens, config.image_fmap_size) == (
        CLIP_VOCAB_SIZE,
        6,
        16,
        4,
    )
    # DALLE-pytorch's BOS is text id 0 at position 0: its embedding row plus position 0.
    torch.testing.assert_close(bundle.model.bos.data, weights["text_emb.weight"][0] + weights["text_pos_emb.weight"][0])
    # DALLE-pytorch's default text tokenizer: CLIP's BPE, no start/end tokens, padded with 0.
    assert read_json(bundle_dir / "text_tokenizer" / "spec.json")["kind"] == "clip-bpe"
    assert (bundle.text_tokenizer.add_special_tokens, bundle.text_tokenizer.pad_id) == (False, 0)
    # The VAE: the same codes as the DiscreteVAE it was trained with.
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = getattr(vae, "codebook_indices", None) or vae.encode
        assert torch.equal(bundle.image_tokenizer.encode(images), reference(images))
    provenance = read_json(bundle_dir / "training_config.json")["dalle_pytorch"]
    assert (provenance["version"], provenance["epoch"], provenance["vae_class_name"]) == ("1.6.6", 4, "DiscreteVAE")

    output = tmp_path / "generated"
    args = ["generate", "--checkpoint", str(bundle_dir), "--prompt", "a cat", "--num-images", "2"]
    assert main([*args, "--output", str(output)]) == 0
    pictures = sorted((output / "images").glob("*.png"))
    assert len(pictures) == 2 and (output / "grid.png").is_file()
    assert Image.open(pictures[0]).size == (16, 16)


def test_files_without_plain_data_need_trust(tmp_path: Path, clip_vocab: Path) -> None:
    """A numpy scalar in hparams: torch.load(weights_only=True) refuses it, the error says how to opt in."""
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt", hparams={"loss_img_weight": np.float64(7.0)})
    with pytest.raises(CheckpointError, match=r"hparams holds a pickled numpy\..* --trust-pickle"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab)
    assert not (tmp_path / "out").exists()
    import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab, trust_pickle=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_objects_in_unused_entries_are_read_as_inert_stand_ins(tmp_path: Path, clip_vocab: Path) -> None:
    """Only hparams, vae_params and weights must be plain data: an optimizer state holding objects still loads."""
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt", scheduler_state={"best": np.float64(0.5)})
    assert import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab) == tmp_path / "out"


def test_openai_dvae_from_the_copy_saved_in_the_checkpoint(tmp_path: Path, clip_vocab: Path) -> None:
    """DALLE-pytorch's state dict holds OpenAI's dVAE under vae.enc / vae.dec (dall_e's names: w, b). A file from
    before December 2021 (no vae_class_name, no version) is recognised by those names."""
    openai = package_test_helpers("dalle-vae", "test_openai_dvae")
    if openai is None:
        pytest.skip("dalle-vae's test helpers (stand-in dall_e modules) are not in this checkout")
    encoder = openai.Encoder(n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=24).eval()
    decoder = openai.Decoder(n_init=6, n_hid=8, n_blk_per_group=1, output_channels=3, vocab_size=24).eval()
    weights = dalle_pytorch_transformer(HPARAMS, image_tokens=24, fmap=32)  # 256 px, 8x down: a 32x32 grid
    weights |= {f"vae.enc.{name}": tensor for name, tensor in encoder.state_dict().items()}
    weights |= {f"vae.dec.{name}": tensor for name, tensor in decoder.state_dict().items()}
    dalle_pt = write_dalle_pt(tmp_path / "dalle.pt", HPARAMS, weights, vae_class_name=..., version=...)
    import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab)

    from dalle_core import registry

    dvae = registry.load_image_tokenizer(tmp_path / "out" / "image_tokenizer")
    assert (dvae.kind, dvae.num_tokens, dvae.image_size, dvae.fmap_size) == ("openai_dvae", 24, 256, 32)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # DALLE-pytorch: map_pixels, encoder, argmax, row-major
        expected = encoder(0.8 * image + 0.1).argmax(dim=1).flatten(1)
    assert torch.equal(dvae.encode(image), expected)


def test_openai_dvae_files_are_asked_for_when_missing(tmp_path: Path, clip_vocab: Path) -> None:
    weights = dalle_pytorch_transformer(HPARAMS, image_tokens=8192, fmap=32)  # no vae.* entries
    dalle_pt = write_dalle_pt(tmp_path / "dalle.pt", HPARAMS, weights, vae_class_name="OpenAIDiscreteVAE")
    with pytest.raises(CheckpointError, match=r"holds no copy of its weights: pass --openai-dir DIR.*encoder\.pkl"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab)
    with pytest.raises(CheckpointError, match="--openai-dir not found"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab, openai_dir=tmp_path / "nowhere")


# A VQGAN at 256 px, downsampling 16x (five levels), attention at 16: DALLE-pytorch's grid is 256 / (256 / 16) = 16.
VQGAN_DDCONFIG = dict(
    double_z=False,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=32,  # the least taming's GroupNorm(32) allows
    ch_mult=[1, 1, 1, 1, 1],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
)


@pytest.fixture
def vqgan_dalle_pt(tmp_path: Path) -> tuple[Path, Path, Path]:
    """taming files (model.ckpt, model.yaml) and a dalle.pt trained with them (their copy under vae.model.)."""
    taming = package_test_helpers("dalle-vae", "vqgan_files")
    if taming is None:
        pytest.skip("dalle-vae's test helpers (taming file writers) are not in this checkout")
    ckpt, yaml_path, state = taming.write_taming_files(
        tmp_path / "taming", ddconfig=VQGAN_DDCONFIG, n_embed=12, embed_dim=4
    )
    weights = dalle_pytorch_transformer(HPARAMS, image_tokens=12, fmap=16)
    weights |= {f"vae.model.{name}": tensor for name, tensor in state.items()}
    weights["vae.model.loss.logvar"] = torch.zeros(())  # its training loss, saved too: dropped on import
    dalle_pt = write_dalle_pt(tmp_path / "dalle.pt", HPARAMS, weights, vae_class_name="VQGanVAE")
    return dalle_pt, ckpt, yaml_path


def test_vqgan_from_its_config_and_the_saved_copy(vqgan_dalle_pt, tmp_path: Path, clip_vocab: Path) -> None:
    from dalle_core import registry
    from dalle_vae import VQGanVAE

    dalle_pt, ckpt, yaml_path = vqgan_dalle_pt
    reference = VQGanVAE.from_taming(ckpt, yaml_path, image_size=256)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    for name, options in {"saved": {}, "ckpt": {"taming_checkpoint": ckpt}}.items():
        import_dalle_pytorch(dalle_pt, tmp_path / name, clip_vocab=clip_vocab, taming_config=yaml_path, **options)
        vqgan = registry.load_image_tokenizer(tmp_path / name / "image_tokenizer")
        assert (vqgan.kind, vqgan.num_tokens, vqgan.image_size, vqgan.fmap_size) == ("vqgan", 12, 256, 16)
        assert torch.equal(vqgan.encode(image), reference.encode(image))


def test_vqgan_config_is_asked_for_when_missing(vqgan_dalle_pt, tmp_path: Path, clip_vocab: Path) -> None:
    dalle_pt, ckpt, _ = vqgan_dalle_pt
    with pytest.raises(CheckpointError, match=r"trained with a taming VQGAN: pass .* --taming-config .*vqgan\.1024"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab, taming_checkpoint=ckpt)


def test_options_for_another_vae_are_refused(tmp_path: Path, clip_vocab: Path) -> None:
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt")
    with pytest.raises(ConfigError, match="--openai-dir is for a model trained with OpenAIDiscreteVAE.*DiscreteVAE"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab, openai_dir=tmp_path)


def test_text_tokenizer_must_fit_the_model(tmp_path: Path, clip_vocab: Path) -> None:
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt", hparams={"num_text_tokens": 500})
    with pytest.raises(ConfigError, match="has 49408 ids but the checkpoint's num_text_tokens is 500.*--bpe-path"):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab)
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(ConfigError, match="pass its vocabulary with --clip-vocab"):
            import_dalle_pytorch(dalle_pt, tmp_path / "out")


def test_hugging_face_tokenizer_from_bpe_path(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocabulary = {
        "[UNK]": 0,
        **{word: i + 1 for i, word in enumerate(["a", "small", "red", "cat", "sat", "on", "the", "mat"])},
    }
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "bpe.json"))
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt", hparams={"num_text_tokens": len(vocabulary)})
    import_dalle_pytorch(dalle_pt, tmp_path / "out", bpe_path=tmp_path / "bpe.json")

    from dalle_train.bundle import load_bundle

    text_tokenizer = load_bundle(tmp_path / "out").text_tokenizer
    assert (text_tokenizer.vocab_size, text_tokenizer.pad_id) == (9, 0)
    assert text_tokenizer.encode(["the red cat"], 6).tolist() == [[7, 3, 4, 0, 0, 0]]  # padded with 0, as DALLE-pytorch


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"weights": "To get a working standard checkpoint, look into consolidating DeepSpeed checkpoints."},
            "DeepSpeed",
        ),
        ({"hparams": ...}, "expected a DALLE-pytorch dalle.pt with 'hparams' and 'weights'"),
        ({"vae_params": None, "vae_class_name": "DiscreteVAE"}, "vae_class_name is DiscreteVAE but vae_params"),
        ({"vae_class_name": "CLIP"}, "unknown vae_class_name 'CLIP'"),
    ],
)
def test_malformed_files(tmp_path: Path, clip_vocab: Path, entries: dict, message: str) -> None:
    weights = dalle_pytorch_transformer(HPARAMS, 16, 4)
    dalle_pt = write_dalle_pt(tmp_path / "dalle.pt", HPARAMS, weights, **{"vae_params": VAE_PARAMS, **entries})
    with pytest.raises(CheckpointError, match=message):
        import_dalle_pytorch(dalle_pt, tmp_path / "out", clip_vocab=clip_vocab)


def test_output_is_replaced_only_when_it_is_a_bundle(tmp_path: Path, clip_vocab: Path) -> None:
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a dalle bundle: refusing to replace it"):
        import_dalle_pytorch(dalle_pt, tmp_path / "notes", clip_vocab=clip_vocab)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty directory, then the bundle written there
        assert (import_dalle_pytorch(dalle_pt, tmp_path / "empty", clip_vocab=clip_vocab) / "config.json").is_file()


def test_cli_errors_are_one_line(tmp_path: Path, clip_vocab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoint", "import", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: file not found: {tmp_path / 'missing.pt'}"
    # conv_like before DALLE-pytorch 1.5 was another pattern: refused, naming the file
    hparams = {"attn_types": ("full", "conv_like")}
    dalle_pt, _, _ = discrete_vae_dalle_pt(tmp_path / "dalle.pt", hparams=hparams, version="1.4.2")
    args = ["checkpoint", "import", str(dalle_pt), "--output", str(tmp_path / "out"), "--clip-vocab", str(clip_vocab)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {dalle_pt}: hparams: attn_types 'conv_like' of DALLE-pytorch 1.4.2") and len(
        err.splitlines()
    ) == (1)


# ---------------------------------------------------------------------------------------------- DALLE-pytorch itself


@pytest.fixture(scope="module")
def dalle_pytorch() -> Iterator[ModuleType]:
    """DALLE-pytorch 1.6.6 and its tokenizer module, when installed (nox -s dalle_pytorch_parity).

    Its imports that these tests do not use get placeholders while importing (removed afterwards): taming (its VQGAN
    wrapper), and youtokentome / transformers when absent (its YTTM and Chinese tokenizers).
    """
    if importlib.util.find_spec("dalle_pytorch") is None:
        pytest.skip("dalle-pytorch is not installed (see nox -s dalle_pytorch_parity)")
    stubs = {
        "taming": (),
        "taming.models": (),
        "taming.models.vqgan": ("VQModel", "GumbelVQ"),
        "youtokentome": ("BPE", "OutputType"),
        "transformers": ("BertTokenizer",),
        "tokenizers": ("Tokenizer",),
        "tokenizers.processors": ("ByteLevel",),
    }
    missing = {name.split(".")[0] for name in stubs if importlib.util.find_spec(name.split(".")[0]) is None}
    added = []
    for name, classes in stubs.items():
        if name.split(".")[0] in missing and name not in sys.modules:
            module = types.ModuleType(name)
            for cls in classes:
                setattr(module, cls, type(cls, (), {}))
            sys.modules[name] = module
            added.append(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("dalle_pytorch")
            importlib.import_module("dalle_pytorch.tokenizer")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    yield module


def test_dalle_pytorch_end_to_end(dalle_pytorch: ModuleType, tmp_path: Path) -> None:
    """A real DALLE-pytorch 1.6.6 model with its default tokenizer and a DiscreteVAE, saved as train_dalle.py saves
    it: the imported bundle encodes text and images to the same ids and gives the same logits."""
    from dalle_pytorch.tokenizer import default_bpe, tokenizer

    from dalle_train.bundle import load_bundle

    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(**VAE_PARAMS)
    hparams = {
        **HPARAMS,
        "num_text_tokens": tokenizer.vocab_size,
        "depth": 2,
        "dim_head": 16,
        "attn_types": ("full", "axial_row"),
        "shift_tokens": True,
        "rotary_emb": True,
    }
    model = dalle_pytorch.DALLE(vae=vae, **hparams).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("vae."):
                parameter.normal_(0.0, 0.4)
    save_obj = {
        "hparams": hparams,
        "vae_params": VAE_PARAMS,
        "epoch": 1,
        "version": dalle_pytorch.__version__,
        "vae_class_name": type(vae).__name__,
        "weights": model.state_dict(),
        "opt_state": torch.optim.Adam(model.parameters()).state_dict(),
        "scheduler_state": None,
    }
    torch.save(save_obj, tmp_path / "dalle.pt")
    bundle = load_bundle(import_dalle_pytorch(tmp_path / "dalle.pt", tmp_path / "out", clip_vocab=default_bpe()))

    texts = ["a red circle", "Hello, World!! &amp; more", ""]
    text_ids = tokenizer.tokenize(texts, 6, truncate_text=True)
    assert torch.equal(bundle.text_tokenizer.encode(texts, 6, truncate=True), text_ids)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    image_ids = vae.get_codebook_indices(images)
    assert torch.equal(bundle.image_tokenizer.encode(images), image_ids)
    with torch.no_grad():
        theirs = model(text_ids.clone(), image_ids)
        ours = bundle.model(text_ids, image_ids)
    vocab = bundle.model.config.num_text_logits
    torch.testing.assert_close(ours.text_logits, theirs[:, :6, :vocab], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.image_logits, theirs[:, 6:, vocab:], rtol=0, atol=1e-4)

"""DALLE-pytorch's DALLE, the slow obvious way, straight from its own state-dict names (helpers; no tests here).

:func:`write_weights` builds a random state dict named and shaped exactly as DALLE-pytorch's ``DALLE.state_dict()``
for some hparams, in the 1.4-1.6.6 layout or the older one (see :func:`module_chain`), with either naming of the axial
position tables; :func:`reference_logits` runs DALLE-pytorch's forward pass on such a dict in float64. Neither uses
the import code under test: paths come from the module trees described here, positions, masks, rotary angles and
token shifts from the per-element helpers of ``transformer_naive``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import cycle, islice
from typing import Any

import torch
from transformer_naive import gelu, naive_heads_attention, naive_layers, naive_mask, naive_shift

from dalle_transformer import DALLEConfig

# DALLE-pytorch 1.6.6's constructor defaults (what train_dalle.py always writes into hparams since 2022).
DEFAULTS: dict[str, Any] = dict(
    num_text_tokens=10000,
    text_seq_len=256,
    heads=8,
    dim_head=64,
    reversible=False,
    attn_types=None,
    stable=False,
    sandwich_norm=False,
    shift_tokens=False,  # a missing key: the option did not exist yet
    rotary_emb=False,
    shared_attn_ids=None,
    shared_ff_ids=None,
    share_input_output_emb=False,
)


@dataclass(frozen=True)
class Spec:
    """A DALLE-pytorch model: its hparams and its VAE's grid side and code count."""

    hparams: dict[str, Any]
    fmap: int = 4
    image_tokens: int = 20
    options: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", {**DEFAULTS, **self.hparams})

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(name)

    @property
    def text_vocab(self) -> int:  # their num_text_tokens after `+= text_seq_len`
        return self.num_text_tokens + self.text_seq_len

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.fmap**2

    def attn_kinds(self) -> list[str]:
        kinds = self.attn_types or ("full",)
        kinds = (kinds,) if isinstance(kinds, str) else kinds
        return list(islice(cycle(kinds), self.depth))

    def owners(self, ids: Any) -> list[int]:
        """Per layer, the first layer holding the same module (DALLE-pytorch keeps one module per id)."""
        cycled = list(islice(cycle(ids if ids is not None else range(self.depth)), self.depth))
        return [cycled.index(share_id) for share_id in cycled]

    def geometry(self) -> DALLEConfig:
        """The sizes as a DALLEConfig, only for the geometry helpers of transformer_naive (masks, angles, shifts)."""
        return DALLEConfig(
            num_text_tokens=self.num_text_tokens,
            text_seq_len=self.text_seq_len,
            num_image_tokens=self.image_tokens,
            image_fmap_size=self.fmap,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=max(self.dim_head, 6),
            conv_kernel_size=5,
        )


def module_chain(branch: str, shift: bool, wrapped: bool) -> list[str]:
    """The wrappers from a layer's LayerScale down to its attention / feed-forward module; each holds the next as
    ``.fn``. 1.4+: ``LayerScale(PreNorm(CachedAs(PreShiftToken(CachedAs|NonCached(Attention)))))`` (CachedAs around
    the shift only with shift_tokens, the inner one for attention only); before: ``LayerScale(PreNorm(
    PreShiftToken(module)))`` (PreShiftToken only with shift_tokens)."""
    chain = ["LayerScale", "PreNorm"]
    if shift:
        chain += ["CachedAs", "PreShiftToken"] if wrapped else ["PreShiftToken"]
    if wrapped and branch == "attn":
        chain.append("CachedAs")
    return chain


def layer_prefix(spec: Spec, layer: int, branch: str) -> str:
    if spec.reversible:  # ReversibleSequence.blocks[i] = ReversibleBlock(f=Deterministic(attn), g=Deterministic(ff))
        return f"transformer.layers.blocks.{layer}.{'f' if branch == 'attn' else 'g'}.net."
    return f"transformer.layers.layers.{layer}.{0 if branch == 'attn' else 1}."


def module_path(spec: Spec, layer: int, branch: str, wrapped: bool) -> str:
    return layer_prefix(spec, layer, branch) + "fn." * len(module_chain(branch, spec.shift_tokens, wrapped))


def write_weights(
    spec: Spec,
    *,
    wrapped: bool = True,
    axial: tuple[str, str] = ("weights.0", "weights.1"),
    old_rotary_table: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random DALLE-pytorch ``DALLE.state_dict()`` for ``spec`` (plus ``vae.*`` entries, as a real one has)."""
    generator = torch.Generator().manual_seed(seed)
    dim, inner = spec.dim, spec.heads * spec.dim_head

    def rand(*shape: int, mean: float = 0.0, std: float = 0.4) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=generator)

    weights: dict[str, torch.Tensor] = {}
    to_logits_weight = rand(spec.text_vocab + spec.image_tokens, dim)
    to_logits_bias = rand(spec.text_vocab + spec.image_tokens)
    if spec.share_input_output_emb:  # SharedEmbedding keeps to_logits[1] as a submodule: its tensors appear again
        for table in ("text_emb", "image_emb"):
            weights[f"{table}.linear.weight"], weights[f"{table}.linear.bias"] = to_logits_weight, to_logits_bias
    else:
        weights["text_emb.weight"] = rand(spec.text_vocab, dim)
        weights["image_emb.weight"] = rand(spec.image_tokens, dim)
    if spec.rotary_emb:
        angles = rotary_table(spec)  # [seq_len + 1, R]
        # Before November 2021 the table dropped its last position and had an extra leading axis.
        weights["transformer.pos_emb"] = angles[None, None, :-1] if old_rotary_table else angles[None]
    else:
        weights["text_pos_emb.weight"] = rand(spec.text_seq_len + 1, dim)
        weights[f"image_pos_emb.{axial[0]}"] = rand(1, spec.fmap, 1, dim)
        weights[f"image_pos_emb.{axial[1]}"] = rand(1, 1, spec.fmap, dim)
    modules: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for layer in range(spec.depth):
        for branch, ids in (("attn", spec.shared_attn_ids), ("ff", spec.shared_ff_ids)):
            prefix = layer_prefix(spec, layer, branch)
            weights[prefix + "scale"] = rand(1, 1, dim, mean=0.5, std=0.3)
            weights[prefix + "fn.norm.weight"] = rand(dim, mean=1.0, std=0.3)
            weights[prefix + "fn.norm.bias"] = rand(dim, std=0.2)
            if spec.sandwich_norm:
                weights[prefix + "fn.norm_out.weight"] = rand(dim, mean=1.0, std=0.3)
                weights[prefix + "fn.norm_out.bias"] = rand(dim, std=0.2)
            owner = spec.owners(ids)[layer]
            if (branch, owner) not in modules:  # the first layer of a sharing id makes the module
                if branch == "attn":
                    params = {
                        "to_qkv.weight": rand(3 * inner, dim, std=0.3),
                        "to_out.0.weight": rand(dim, inner, std=0.3),
                        "to_out.0.bias": rand(dim, std=0.2),
                    }
                else:
                    params = {
                        "net.0.weight": rand(8 * dim, dim, std=0.3),
                        "net.0.bias": rand(8 * dim, std=0.2),
                        "net.3.weight": rand(dim, 4 * dim, std=0.2),
                        "net.3.bias": rand(dim, std=0.2),
                    }
                modules[(branch, owner)] = params
            path = module_path(spec, layer, branch, wrapped)
            for name, tensor in modules[(branch, owner)].items():
                weights[path + name] = tensor  # shared: the same tensor under every user's name
    weights["to_logits.0.weight"] = rand(dim, mean=1.0, std=0.3)
    weights["to_logits.0.bias"] = rand(dim, std=0.2)
    weights["to_logits.1.weight"], weights["to_logits.1.bias"] = to_logits_weight, to_logits_bias
    weights["vae.codebook.weight"] = rand(spec.image_tokens, 8)  # the VAE's entries, not the transformer's
    weights.update(extra or {})
    return weights


def rotary_table(spec: Spec) -> torch.Tensor:
    """DALLE-pytorch's ``transformer.pos_emb`` rows, one position at a time: ``float32[seq_len + 1, R]``.

    Each head's first ``R = 3 * 2 * (dim_head // 3 // 2)`` features rotate in pairs, in three groups: text positions
    (BOS and text at 0..T, image tokens all at 8192) with frequencies ``10000 ** (-2m / r)``; then image row and
    column (``linspace(-1, 1, fmap)``, text at -10) with frequencies ``linspace(1, 5, r // 2) * pi``. Angles are
    float32 products, as rotary-embedding-torch computes them.
    """
    f32 = torch.float32
    r = spec.dim_head // 3
    pairs = r // 2
    lang = [float(1.0 / torch.tensor(10000.0, dtype=f32) ** torch.tensor(2 * m / r, dtype=f32)) for m in range(pairs)]
    pixel = [(1.0 + 4.0 * m / (pairs - 1) if pairs > 1 else 1.0) * math.pi for m in range(pairs)]
    axis = [-1.0 + 2.0 * a / (spec.fmap - 1) for a in range(spec.fmap)]

    def angles(position: float, freqs: list[float]) -> list[float]:
        products = [float(torch.tensor(position, dtype=f32) * torch.tensor(freq, dtype=f32)) for freq in freqs]
        return [angle for angle in products for _ in range(2)]

    rows = []
    text_len = spec.text_seq_len + 1
    for p in range(spec.seq_len + 1):
        if p < text_len:
            rows.append(angles(p, lang) + angles(-10.0, pixel) + angles(-10.0, pixel))
        else:
            row, col = divmod(p - text_len, spec.fmap)
            rows.append(angles(8192.0, lang) + angles(axis[row], pixel) + angles(axis[col], pixel))
    return torch.tensor(rows, dtype=f32)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def reference_logits(
    weights: Mapping[str, torch.Tensor], spec: Spec, text: torch.Tensor, image: torch.Tensor, *, wrapped: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """DALLE-pytorch's ``DALLE(text, image)`` logits, split as ours: ``([B, T, V + T], [B, N, image_tokens])``.

    ``text``: ``[B, text_seq_len]`` with 0 as padding; ``image``: ``[B, fmap ** 2]``.
    """
    w = {name: tensor.double() for name, tensor in weights.items()}
    geometry = spec.geometry()
    t, n, dim = spec.text_seq_len, spec.fmap**2, spec.dim
    length = spec.seq_len
    text_table = w["to_logits.1.weight"][: spec.text_vocab] if spec.share_input_output_emb else w["text_emb.weight"]
    image_table = w["to_logits.1.weight"][spec.text_vocab :] if spec.share_input_output_emb else w["image_emb.weight"]
    kinds = spec.attn_kinds()
    masks = {kind: naive_mask(geometry, kind, length) for kind in set(kinds)}
    angles = (
        w["transformer.pos_emb"].reshape(-1, w["transformer.pos_emb"].shape[-1]).tolist() if spec.rotary_emb else None
    )
    axial = [name for name in w if name.startswith("image_pos_emb.")]
    text_out, image_out = [], []
    for b in range(text.shape[0]):
        # Text id 0 (padding) at position i becomes its own token V + i; BOS is text id 0 at position 0.
        ids = [0] + [int(v) if int(v) != 0 else spec.num_text_tokens + i for i, v in enumerate(text[b])]
        x = torch.zeros(length, dim, dtype=torch.float64)
        for p, token in enumerate(ids):
            x[p] = text_table[token] + (0 if spec.rotary_emb else w["text_pos_emb.weight"][p])
        for j in range(n - 1):
            x[t + 1 + j] = image_table[int(image[b, j])]
            if not spec.rotary_emb:
                row, col = divmod(j, spec.fmap)
                rows, cols = sorted(axial)  # weights.0 / weights_0 is the row table
                x[t + 1 + j] += w[rows][0, row, 0] + w[cols][0, 0, col]

        def branch(layer: int, kind: str, h: torch.Tensor) -> torch.Tensor:
            prefix = layer_prefix(spec, layer, kind)
            h = layer_norm(h, w[prefix + "fn.norm.weight"], w[prefix + "fn.norm.bias"])
            if spec.shift_tokens:
                h = naive_shift(geometry, h)
            module = module_path(spec, layer, kind, wrapped)
            if kind == "attn":
                h = attention(h, module, masks[kinds[layer]])
            else:
                hidden = h @ w[module + "net.0.weight"].T + w[module + "net.0.bias"]
                value, gate = hidden.chunk(2, dim=-1)
                h = (value * gelu(gate)) @ w[module + "net.3.weight"].T + w[module + "net.3.bias"]
            if spec.sandwich_norm:
                h = layer_norm(h, w[prefix + "fn.norm_out.weight"], w[prefix + "fn.norm_out.bias"])
            return h * w[prefix + "scale"].reshape(dim)

        def attention(h: torch.Tensor, module: str, mask: torch.Tensor) -> torch.Tensor:
            weights = (w[module + "to_qkv.weight"], w[module + "to_out.0.weight"], w[module + "to_out.0.bias"])
            return naive_heads_attention(h, *weights, spec.heads, spec.dim_head, mask, angles)

        x = naive_layers(x, spec.depth, spec.reversible, branch)
        if spec.stable:
            x = x / x.max(dim=-1, keepdim=True).values
        x = layer_norm(x, w["to_logits.0.weight"], w["to_logits.0.bias"])
        logits = x @ w["to_logits.1.weight"].T + w["to_logits.1.bias"]
        text_out.append(logits[:t, : spec.text_vocab])
        image_out.append(logits[t:, spec.text_vocab :])
    return torch.stack(text_out), torch.stack(image_out)

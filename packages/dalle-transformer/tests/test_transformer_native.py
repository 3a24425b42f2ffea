"""The C kernels of dalle_transformer.native: built with this machine's C compiler; attention and GEGLU checked
against float64 formulas (and SDPA), sampling against the PyTorch operators it replaces; in the model's decoding
and training steps; their failures to build."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_core.errors import DalleError, ShapeError
from dalle_transformer import DALLE, DALLEConfig, native
from dalle_transformer.kernels import attend_decode
from dalle_transformer.layers import FeedForward, layer_scaled
from dalle_transformer.linear import onednn_linear
from dalle_transformer.loss import cross_entropy
from dalle_transformer.masks import AttentionPattern
from dalle_transformer.plans import kernel_groups
from dalle_transformer.sampling import sample_logits

needs_compiler = pytest.mark.skipif(
    not sys.platform.startswith("linux") or native.find_compiler() is None,
    reason="the kernel builds on Linux with a C compiler",
)


def counted_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """One entry per call of ``native.<name>`` from now on (the function itself still runs)."""
    calls: list[int] = []
    function = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *args, **kwargs: calls.append(1) or function(*args, **kwargs))
    return calls


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q . k / sqrt(D)) v in float64, written out."""
    q, keys, values = q.double(), keys.double(), values.double()
    scores = (q * keys).sum(-1, keepdim=True) / q.shape[-1] ** 0.5  # [B, H, n, 1]
    weights = (scores - scores.amax(2, keepdim=True)).exp()
    return ((weights * values).sum(2, keepdim=True) / weights.sum(2, keepdim=True)).float()


@needs_compiler
def test_the_kernel_builds_here() -> None:
    # A machine with a C compiler must get the kernel: a silent fallback would hide a broken build.
    assert native.available(), native.unavailable_reason()


@needs_compiler
@pytest.mark.parametrize(
    ("batch", "heads", "n", "dim"),
    [(1, 1, 1, 8), (2, 3, 5, 32), (4, 8, 193, 64), (2, 2, 300, 80), (1, 2, 129, 1024)],
)
def test_matches_the_formula_and_sdpa_on_strided_views(batch: int, heads: int, n: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(n)
    # q as a decoding step makes it (one head of a [B, 3, H, 1, D] projection), keys as a slice of a longer cache,
    # values in position-major layout: every stride the kernel takes differs from a contiguous tensor's.
    q = torch.randn(batch, 3, heads, 1, dim, generator=generator)[:, 0]
    keys = torch.randn(batch, heads, n + 7, dim, generator=generator)[:, :, :n]
    values = torch.randn(batch, n, heads, dim, generator=generator).transpose(1, 2)
    out = native.decode_attention(q, keys, values)
    assert out.shape == (batch, heads, 1, dim) and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, keys, values), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, keys, values), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_a_larger_maximum_in_a_later_block_rescales_the_earlier_sums() -> None:
    # Scores rising from 0 to ~50 along the positions: the kernel's running maximum grows in each of its blocks of
    # 128 keys, and the earlier blocks' sums must be rescaled (by e^-16 or so) or the output is far off.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 16, generator=generator)
    ramp = torch.linspace(0.0, 50.0, 400)[None, None, :, None] * 16**0.5 / q.square().sum(-1, keepdim=True)
    keys = q * ramp + 0.1 * torch.randn(2, 2, 400, 16, generator=generator)
    values = torch.randn(2, 2, 400, 16, generator=generator)
    torch.testing.assert_close(native.decode_attention(q, keys, values), reference(q, keys, values))


@needs_compiler
@pytest.mark.parametrize("kind", ["full", "axial_row", "axial_col", "conv_like", "sparse"])
def test_attend_decode_on_the_auto_backend_agrees_with_sdpa(kind: str) -> None:
    pattern = AttentionPattern(kind, text_len=4, fmap_size=4, kernel_size=3, dilation=1, block_size=3, local_blocks=2)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, pattern.max_len, 8, generator=generator) for _ in range(3))
    for position in range(1, pattern.max_len):
        args = (q[:, :, position : position + 1], k[:, :, : position + 1], v[:, :, : position + 1], pattern, position)
        torch.testing.assert_close(attend_decode(*args, "auto"), attend_decode(*args, "efficient"))


def test_bad_tensors_get_a_shape_error() -> None:
    q, keys = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ShapeError, match=r"q \[B, H, 1, D\].*\[1, 2, 2, 8\]"):
        native.decode_attention(torch.randn(1, 2, 2, 8), keys, keys)
    with pytest.raises(ShapeError, match="float32 CPU tensors, got .*torch.float64"):
        native.decode_attention(q.double(), keys, keys)
    with pytest.raises(ShapeError, match=r"keys \[B, H, n >= 1, D\]"):
        native.decode_attention(q, keys[:, :, :0], keys[:, :, :0])
    with pytest.raises(ShapeError, match="last dim is contiguous"):
        native.decode_attention(q, keys, torch.randn(1, 2, 8, 5).transpose(2, 3))
    assert not native.decode_attention_takes(q.requires_grad_(), keys, keys)  # autograd: SDPA's business


@needs_compiler
def test_sampling_keeps_exactly_the_top_k_values_ties_included() -> None:
    # At a huge temperature every kept value scores ~1 / -log(u): the largest uniform among the kept ids wins. The
    # k-th largest value gets u = 0.99 and the largest value below it u = 0.999: the draw is the former exactly when
    # the kept set ends at the k-th largest value (a threshold one value too high or too low picks another id).
    library = native.default_library()
    assert library is not None
    generator = torch.Generator().manual_seed(0)
    for n, k in [(2, 1), (7, 3), (1024, 512), (1024, 1), (1000, 999), (333, 128), (50, 50)]:
        logits = torch.randint(-20, 20, (1, n), generator=generator).float()  # ties everywhere
        kth = torch.kthvalue(logits[0], n - k + 1).values
        uniform = torch.full((1, n), 0.5)
        at_threshold = int(torch.nonzero(logits[0] == kth)[-1])
        uniform[0, at_threshold] = 0.99
        below = logits[0] < kth
        if below.any():
            uniform[0, int(torch.nonzero(logits[0] == logits[0][below].max())[0])] = 0.999
        assert native.sample_rows(library, logits, uniform, k, 1e9).tolist() == [at_threshold], (n, k)


@needs_compiler
def test_sample_logits_draws_the_same_ids_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def cases():
        for seed in range(60):
            generator = torch.Generator().manual_seed(seed)
            rows, vocab = [(1, 1), (3, 7), (4, 1024), (2, 50), (3, 8192)][seed % 5]
            if seed % 3 == 0:
                logits = torch.randint(-3, 3, (rows, vocab), generator=generator).float()  # ties at the threshold
            else:
                logits = torch.randn(rows, vocab, generator=generator) * [0.1, 1.0, 10.0][seed % 3]
            if seed % 4 == 0 and vocab > 2:
                logits[:, 1] = float("-inf")
            top_k = [None, 1, max(1, vocab // 2), vocab, max(1, vocab // 8)][seed % 5]
            yield seed, logits, top_k, [1.0, 0.7, 2.5][seed % 3]

    def draw_all() -> list[torch.Tensor]:
        return [
            sample_logits(logits, top_k=top_k, temperature=t, generator=torch.Generator().manual_seed(seed))
            for seed, logits, top_k, t in cases()
        ]

    calls = counted_calls(monkeypatch, "sample_rows")
    with_kernel = draw_all()
    assert len(calls) == 60
    monkeypatch.setattr(native, "default_library", lambda: None)
    for ids, reference_ids in zip(with_kernel, draw_all(), strict=True):
        assert torch.equal(ids, reference_ids)


@needs_compiler
def test_rows_without_anything_to_draw_raise_the_samplers_error() -> None:
    library = native.default_library()
    assert library is not None
    logits = torch.randn(4, 10)
    logits[0, 3], logits[2, :] = float("nan"), float("-inf")
    with pytest.raises(native.UnsampleableRow, match="row 0 of the logits"):
        native.sample_rows(library, logits, torch.rand(4, 10), None, 1.0)
    with pytest.raises(DalleError, match=r"got rows \[0, 2\] without"):  # every such row, as without the kernel
        sample_logits(logits, top_k=5)
    logits[0, 3], logits[2, :] = float("inf"), 0.0
    with pytest.raises(native.UnsampleableRow, match="row 0 of the logits"):
        native.sample_rows(library, logits, torch.rand(4, 10), 5, 1.0)
    with pytest.raises(ShapeError, match="uniforms of the logits' shape"):
        native.sample_rows(library, logits, torch.rand(4, 9), 5, 1.0)


@needs_compiler
@pytest.mark.parametrize("width", [1, 5, 16, 37, 2048])
def test_geglu_and_its_gradient_match_the_formula_in_float64(width: int) -> None:
    library = native.default_library()
    assert library is not None
    generator = torch.Generator().manual_seed(width)
    # Gates from -12 to 12 (the exponential's clamp and both tails) and a vector-sized body with a scalar tail.
    h = torch.randn(3, 7, 2 * width, generator=generator) * 4.0
    h[0, 0, width:] = torch.linspace(-12.0, 12.0, width)
    grad = torch.randn(3, 7, width, generator=generator)
    exact = h.double().requires_grad_()
    x, gate = exact.chunk(2, dim=-1)
    expected = x * F.gelu(gate)
    expected.backward(grad.double())
    out, grad_h = native.geglu(library, h), native.geglu_backward(library, h, grad)
    # As close to the formula as PyTorch's own float32 operators get (their erf is the same approximation).
    single = h.clone().requires_grad_()
    x, gate = single.chunk(2, dim=-1)
    (x * F.gelu(gate)).backward(grad)
    torch_errors = ((x * F.gelu(gate)).double() - expected).abs().max(), (single.grad.double() - exact.grad).abs().max()
    assert (out.double() - expected).abs().max() <= 2 * torch_errors[0] + 1e-6
    assert (grad_h.double() - exact.grad).abs().max() <= 2 * torch_errors[1] + 1e-6
    with pytest.raises(ShapeError, match=r"geglu_backward: expected a float32 CPU gradient \[3, 7, " + str(width)):
        native.geglu_backward(library, h, grad[:, :1])


@needs_compiler
def test_a_geglu_feed_forward_trains_alike_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        ff = FeedForward(24, 4, 0.0, "geglu")
        x = torch.randn(2, 9, 24, requires_grad=True)
        out = ff(x)
        out.square().sum().backward()
        assert x.grad is not None
        return out.detach(), [x.grad, *(p.grad for p in ff.parameters() if p.grad is not None)]

    calls = counted_calls(monkeypatch, "geglu_backward")
    with_kernels = step()
    assert calls == [1]
    assert_alike_without_the_kernels(monkeypatch, step, with_kernels)


@needs_compiler
@pytest.mark.parametrize(("rows", "width"), [(1, 1), (3, 17), (5, 16), (64, 1024), (7, 40)])
def test_geglu_backward_sums_its_gradient_over_rows_as_it_writes_it(rows: int, width: int) -> None:
    # The bias gradient of the projection before GEGLU: the columns of the gradient the kernel writes, summed (rows
    # fewer than the threads' bands, and widths that end in a partial vector).
    library = native.default_library()
    assert library is not None
    generator = torch.Generator().manual_seed(rows * width)
    h, grad = torch.randn(rows, 2 * width, generator=generator), torch.randn(rows, width, generator=generator)
    sums = torch.full((2 * width,), float("nan"))
    grad_h = native.geglu_backward(library, h, grad, column_sums=sums)
    assert torch.equal(grad_h, native.geglu_backward(library, h, grad))  # the same gradient, sums or not
    torch.testing.assert_close(sums.double(), grad_h.double().sum(0), rtol=0, atol=1e-6 * rows)
    with pytest.raises(ShapeError, match=rf"expected contiguous float32 CPU column sums \[{2 * width}\]"):
        native.geglu_backward(library, h, grad, column_sums=torch.zeros(width))


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 17), (8, 96, 256), (2, 40)])
def test_a_layer_scale_backward_is_one_pass_with_pytorchs_gradients(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(*shape, generator=generator).requires_grad_()
    scale = torch.randn(shape[-1], generator=generator).requires_grad_()
    grad = torch.randn(*shape, generator=generator)
    calls = counted_calls(monkeypatch, "scale_backward")
    out = layer_scaled(h, scale)
    assert torch.equal(out, h * scale)
    out.backward(grad)
    assert calls == [1]
    h_exact, scale_exact = h.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    (h_exact * scale_exact).backward(grad.double())
    assert h.grad is not None and scale.grad is not None
    assert h_exact.grad is not None and scale_exact.grad is not None
    assert torch.equal(h.grad, grad * scale.detach())  # one product per element, as PyTorch's
    rows = h.numel() // shape[-1]
    torch.testing.assert_close(scale.grad.double(), scale_exact.grad, rtol=0, atol=1e-6 * rows)


def assert_alike_without_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
    step: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]],
    with_kernels: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    """``step()`` (an output and gradients) run again as where the kernels did not build gives ``with_kernels``,
    to float rounding."""
    monkeypatch.setattr(native, "default_library", lambda: None)
    (out, grads), (reference_out, reference_grads) = with_kernels, step()
    torch.testing.assert_close(out, reference_out)
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 3), (31, 33), (64, 32), (130, 257), (48, 1024)])
def test_transposed_copies_rows_into_columns_exactly(rows: int, cols: int) -> None:
    library = native.default_library()
    assert library is not None
    wide = torch.randn(rows, cols + 9)
    for x in (wide[:, :cols].contiguous(), wide[:, 4 : 4 + cols]):  # contiguous, and rows further apart
        out = native.transposed(library, x)
        assert out.is_contiguous() and torch.equal(out, x.T)
    assert not native.transpose_takes(wide.T)  # its rows are not contiguous


@needs_compiler
def test_transposed_writes_into_rows_of_a_larger_tensor() -> None:
    library = native.default_library()
    assert library is not None
    x, whole = torch.randn(40, 24), torch.zeros(30, 40)
    assert native.transposed(library, x, out=whole[3:27]).data_ptr() == whole[3].data_ptr()
    assert torch.equal(whole[3:27], x.T) and not whole[:3].any() and not whole[27:].any()
    with pytest.raises(ShapeError, match=r"\[24, 40\], got a strided torch.float32 \[24, 40\] on cpu"):
        native.transposed(library, x, out=torch.zeros(40, 24).T)  # the right shape, in columns


@needs_compiler
@pytest.mark.parametrize(("in_features", "out_features"), [(24, 40), (40, 24)])
def test_linear_gradients_are_the_same_with_and_without_the_kernels(
    monkeypatch: pytest.MonkeyPatch, in_features: int, out_features: int
) -> None:
    # Both branches of the weight gradient (out > in is computed transposed): the copies are exact, so the gradients
    # must be equal, not close.
    def gradients() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 7, in_features, generator=generator, requires_grad=True)
        weight = torch.randn(out_features, in_features, generator=generator, requires_grad=True)
        bias = torch.randn(out_features, generator=generator, requires_grad=True)
        onednn_linear(x, weight, bias).square().sum().backward()
        return [t.grad for t in (x, weight, bias) if t.grad is not None]

    calls = counted_calls(monkeypatch, "transposed")
    with_kernels = gradients()
    assert len(calls) == 1 + (out_features > in_features)
    monkeypatch.setattr(native, "default_library", lambda: None)
    for grad, reference in zip(with_kernels, gradients(), strict=True):
        assert torch.equal(grad, reference)


def wide_library() -> ctypes.CDLL:
    """The library, on a CPU its AVX-512 kernels (causal attention, streamed products) run on (the test is skipped
    elsewhere)."""
    library = native.default_library()
    assert library is not None, native.unavailable_reason()
    if not native.wide_kernels_run(library):
        pytest.skip("the causal attention and streamed product kernels run on x86-64-v4 (AVX-512) CPUs only")
    return library


@needs_compiler
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (63, 37), (64, 16), (65, 512), (200, 2048)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_streamed_product_matches_float64_at_every_row_count(
    out_features: int, in_features: int, with_bias: bool
) -> None:
    # Blocks of 64 features whole and in part, rows in groups of 4 whole and in part, x's rows further apart.
    library = wide_library()
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    blocks = native.stream_blocks(weight)
    assert blocks.shape == (-(-out_features // 64), in_features, 64) and blocks.is_contiguous()
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, in_features + 3, generator=generator)[:, 2 : 2 + in_features]
        out = native.stream_product(library, x, blocks, out_features, bias)
        exact = x.double() @ weight.double().T + (0.0 if bias is None else bias.double())
        assert out.shape == (rows, out_features) and out.is_contiguous()
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6 * in_features**0.5 * 4)
    with pytest.raises(ShapeError, match=r"stream_product: expected a bias \[" + str(out_features)):
        native.stream_product(library, x, blocks, out_features, torch.zeros(out_features + 1))


@needs_compiler
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (5, 15), (7, 16), (9, 17), (64, 10032), (12, 1024)])
def test_cross_entropy_and_its_gradient_match_float64(rows: int, vocab: int) -> None:
    # Vocabularies a vector wide, less and more; logits spread over hundreds (the exponential's clamp), one -inf.
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=generator) * 40.0
    logits[0, -1] = -float("inf") if vocab > 1 else logits[0, -1]
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[0] = 0
    exact = logits.double().requires_grad_()
    F.cross_entropy(exact, targets).backward()
    single = logits.clone().requires_grad_()
    F.cross_entropy(single, targets).backward()  # PyTorch's own float32 errors, the bound for the kernel's
    assert single.grad is not None and exact.grad is not None
    library = native.default_library()
    assert library is not None
    grad = torch.empty_like(logits)
    losses = native.cross_entropy(library, logits, targets, grad, grad_scale=1 / rows)
    assert losses is not None and losses.shape == (rows,)
    exact_losses = F.cross_entropy(logits.double(), targets, reduction="none")
    torch_loss_error = (F.cross_entropy(logits, targets, reduction="none").double() - exact_losses).abs().max()
    assert (losses.double() - exact_losses).abs().max() <= 2 * torch_loss_error + 1e-5
    # The kernel's gradient is of each row's loss times grad_scale: here 1 / rows, the mean's.
    torch_grad_error = (single.grad.double() - exact.grad).abs().max()
    assert (grad.double() - exact.grad).abs().max() <= 2 * torch_grad_error + 1e-8
    assert grad[0, -1] == 0.0 or vocab == 1  # a -inf logit: probability 0, exactly
    without_grad = native.cross_entropy(library, logits, targets)
    assert without_grad is not None and torch.equal(without_grad, losses)
    unwritable_grads = [torch.empty_like(logits, dtype=torch.float64), torch.empty(rows, vocab + 1)]
    for unwritable in unwritable_grads + ([torch.empty(vocab, rows).T] if rows > 1 and vocab > 1 else []):
        with pytest.raises(ShapeError, match=rf"cross_entropy: expected contiguous float32 CPU gradient \[{rows}, "):
            native.cross_entropy(library, logits, targets, unwritable)


@needs_compiler
def test_cross_entropy_leaves_targets_outside_the_vocabulary_to_pytorch() -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    library = native.default_library()
    assert library is not None
    for outside in (10, -1, -100):
        targets = torch.tensor([1, outside, 2])
        assert native.cross_entropy(library, logits.detach(), targets) is None  # nothing computed
    # Through the model's loss function: PyTorch's error for a target past the vocabulary, and its ignore_index.
    with pytest.raises(IndexError):
        cross_entropy(logits, torch.tensor([1, 10, 2]))
    torch.testing.assert_close(
        cross_entropy(logits, torch.tensor([1, -100, 2])), F.cross_entropy(logits, torch.tensor([1, -100, 2]))
    )
    nan_logits = torch.randn(2, 20)
    nan_logits[1, 3] = float("nan")
    assert cross_entropy(nan_logits, torch.tensor([0, 1])).isnan()  # as F.cross_entropy


@needs_compiler
@pytest.mark.parametrize("received", [0.25, 0.7, 0.0, 1.0])
def test_the_loss_gradient_is_written_for_its_weight_and_exact_for_any_other(received: float) -> None:
    # Written for a weight of 0.25: receiving that passes the kernel's gradient on as it is, anything else rescales.
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 40, generator=generator) * 3).requires_grad_()
    targets = torch.randint(0, 40, (6,), generator=generator)
    loss = cross_entropy(logits, targets, gradient_weight=0.25)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))  # the mean, whatever the weight
    (loss * received).backward()
    reference = logits.detach().double().requires_grad_()
    (F.cross_entropy(reference, targets) * received).backward()
    assert logits.grad is not None and reference.grad is not None
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)


@needs_compiler
def test_a_model_computes_its_losses_in_the_kernel_and_trains_alike_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # DALLE-pytorch's blocks (GEGLU, LayerScale): their bias and scale gradients are summed in the kernels too.
    config = DALLEConfig(
        num_text_tokens=30, text_seq_len=7, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2, heads=2,
        dim_head=16, loss_img_weight=3, ff_activation="geglu", layer_scale=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    text, image = torch.randint(1, 30, (3, 7), generator=generator), torch.randint(0, 16, (3, 16), generator=generator)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = DALLE(config).train()
        output = model(text, image)
        output.loss.backward()
        exact = F.cross_entropy(output.text_logits.detach().double().flatten(0, 1), model.prepare_text(text).flatten())
        torch.testing.assert_close(output.text_loss.double(), exact)
        return output.loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    calls = counted_calls(monkeypatch, "cross_entropy")
    geglu_calls, scale_calls = (
        counted_calls(monkeypatch, "geglu_backward"),
        counted_calls(monkeypatch, "scale_backward"),
    )
    with_kernels = step()
    assert len(calls) == 2  # the text loss and the image loss
    assert len(geglu_calls) == 2 and len(scale_calls) == 4  # per layer: one feed-forward, two scaled branches
    assert_alike_without_the_kernels(monkeypatch, step, with_kernels)


@needs_compiler
@pytest.mark.parametrize(
    ("batch", "heads", "n", "dim", "magnitude"),
    [(1, 1, 1, 1, 1.0), (2, 3, 5, 7, 1.0), (1, 2, 33, 16, 1.0), (2, 2, 64, 32, 1.0), (1, 2, 65, 80, 1.0),
     (2, 1, 130, 64, 1.0), (1, 2, 97, 64, 6.0), (1, 1, 40, 1024, 1.0)],
)  # fmt: skip
@pytest.mark.parametrize("layout", ["projection", "contiguous"])
def test_causal_attention_and_its_gradient_match_float64_sdpa(
    batch: int, heads: int, n: int, dim: int, magnitude: float, layout: str
) -> None:
    # Sequences across the kernel's blocks of 32 keys and 64 queries and its rows of 6, head widths that are not
    # whole vectors, and (magnitude 6) scores in the hundreds, where a softmax without its row maximum overflows.
    library = wide_library()
    generator = torch.Generator().manual_seed(n * dim)
    if layout == "projection":  # as the attention layer makes it: a view of the QKV projection's [B, n, 3, H, D]
        qkv = torch.randn(batch, n, 3, heads, dim, generator=generator).permute(2, 0, 3, 1, 4) * magnitude
    else:
        qkv = torch.randn(3, batch, heads, n, dim, generator=generator) * magnitude
    # A contiguous gradient (the kernel's output is [B, n, H, D] underneath): the backward copies it to that layout.
    grad = torch.randn(batch, heads, n, dim, generator=generator)
    expected, sdpa, expected_grad, sdpa_grad = sdpa_references(qkv, grad, None)

    out, lse = native.causal_attention(library, qkv)
    assert_as_close_as(out, sdpa, expected)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    torch.testing.assert_close(lse, masked_logsumexp(qkv, causal), rtol=1e-5, atol=1e-5)
    grad_qkv = native.causal_attention_backward(library, qkv, out, lse, grad)
    assert grad_qkv.shape == qkv.shape and grad_qkv.permute(1, 3, 0, 2, 4).is_contiguous()
    assert_as_close_as(grad_qkv, sdpa_grad, expected_grad)


def sdpa_references(
    qkv: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA under ``mask`` (None: ``is_causal``) over ``q, k, v = qkv``: its output in float64 and float32, then its
    gradient for ``qkv`` (for ``grad``, the output's) in float64 and float32."""
    exact, in_float32 = qkv.detach().double().requires_grad_(), qkv.detach().clone().requires_grad_()
    expected = F.scaled_dot_product_attention(*exact.unbind(0), attn_mask=mask, is_causal=mask is None)
    expected.backward(grad.double())
    sdpa = F.scaled_dot_product_attention(*in_float32.unbind(0), attn_mask=mask, is_causal=mask is None)
    sdpa.backward(grad)
    assert exact.grad is not None and in_float32.grad is not None
    return expected, sdpa, exact.grad, in_float32.grad


def masked_logsumexp(qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each query's log-sum-exp of its scaled scores under ``mask``, in float64, as float32 ``[B, H, n]``."""
    q, k, _ = qkv.double().unbind(0)
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, -math.inf)
    return scores.logsumexp(-1).float()


def assert_as_close_as(actual: torch.Tensor, float32_reference: torch.Tensor, exact: torch.Tensor) -> None:
    """``actual`` is at most twice as far from ``exact`` (float64) as PyTorch's float32 result (plus 1e-6)."""
    error, reference_error = ((t.double() - exact).abs().max().item() for t in (actual, float32_reference))
    assert error <= 2 * reference_error + 1e-6, f"off by {error:.3g}, PyTorch's float32 by {reference_error:.3g}"


GROUPED_PATTERNS = [
    AttentionPattern("axial_row", 9, 5),
    AttentionPattern("axial_col", 17, 6),
    AttentionPattern("conv_like", 5, 7, kernel_size=3, dilation=2),
    AttentionPattern("conv_like", 65, 9, kernel_size=5),
    AttentionPattern("conv_like", 9, 20, kernel_size=2),  # groups of 16 queries, one of 4 at each row's end
    AttentionPattern("sparse", 3, 9, block_size=7, local_blocks=2, stride=3),
]


@needs_compiler
@pytest.mark.parametrize("pattern", GROUPED_PATTERNS, ids=lambda pattern: f"{pattern.kind}-{pattern.fmap_size}")
@pytest.mark.parametrize(("cut", "dim", "magnitude"), [(1, 16, 1.0), (7, 40, 1.0), (1, 64, 6.0)])
def test_grouped_attention_and_its_gradient_match_float64_masked_sdpa(
    pattern: AttentionPattern, cut: int, dim: int, magnitude: float
) -> None:
    # A training input (every image token but the last) and a shorter one; head widths that are not whole vectors;
    # scores in the hundreds. Text parts shorter and longer than a block of 64 queries.
    library = wide_library()
    batch, heads, n = 2, 2, pattern.text_len + pattern.fmap_size**2 - cut
    generator = torch.Generator().manual_seed(n * dim)
    qkv = torch.randn(batch, n, 3, heads, dim, generator=generator).permute(2, 0, 3, 1, 4) * magnitude
    grad = torch.randn(batch, heads, n, dim, generator=generator)
    mask = pattern.square_mask(n)
    expected, sdpa, expected_grad, sdpa_grad = sdpa_references(qkv, grad, mask)

    groups = kernel_groups(pattern, n)
    out, lse = native.causal_attention(library, qkv, groups=groups)
    assert_as_close_as(out, sdpa, expected)
    torch.testing.assert_close(lse, masked_logsumexp(qkv, mask), rtol=1e-5, atol=1e-5)
    grad_qkv = native.causal_attention_backward(library, qkv, out, lse, grad, groups=groups)
    assert_as_close_as(grad_qkv, sdpa_grad, expected_grad)
    with pytest.raises(ShapeError, match=f"groups made for {n} positions, got a sequence of {n - 1}"):
        native.causal_attention(library, qkv[:, :, :, :-1], groups=groups)


def test_kernel_groups_hold_every_image_query_once_with_exactly_its_allowed_keys() -> None:
    for pattern in GROUPED_PATTERNS:
        n = pattern.max_len
        groups = kernel_groups(pattern, n)
        mask = pattern.square_mask(n)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[: pattern.text_len, : pattern.text_len] = mask[: pattern.text_len, : pattern.text_len]
        allowed[pattern.text_len :, : pattern.text_len] = True
        for g in range(groups.count):
            queries = groups.queries[groups.query_start[g] : groups.query_start[g + 1]]
            keys = groups.keys[groups.key_start[g] : groups.key_start[g + 1]]
            rows = groups.allowed[groups.mask_start[g] : groups.mask_start[g + 1]].view(len(queries), len(keys))
            assert not allowed[queries, pattern.text_len :].any(), "a query in two groups"
            allowed[queries[:, None], keys[None, :]] = rows.bool()
            assert (keys >= pattern.text_len).all() and rows.bool().any(dim=0).all()  # no key gathered for nothing
        assert torch.equal(allowed, mask), pattern
        assert mask.sum() <= groups.pairs < n * (n + 1) // 2, pattern  # less work than causal attention
    with pytest.raises(ValueError, match=r"axial_row: expected a sequence of 10\.\.34 positions, got 9"):
        kernel_groups(AttentionPattern("axial_row", 9, 5), 9)


def test_groups_the_kernel_would_read_past_are_refused() -> None:
    groups = kernel_groups(AttentionPattern("axial_row", 9, 5), 33)
    keys = groups.keys.clone()
    keys[-1] = 33  # one past the sequence
    wrong = {
        "keys": (keys, r"expected keys among the image positions 9\.\.32"),
        "allowed": (groups.allowed.bool(), "expected a contiguous uint8 mask, got torch.bool"),
        "mask_start": (groups.mask_start[:-1], r"expected as many starts of each kind"),
        "queries": (groups.queries.int(), "expected contiguous int64 positions and starts"),
        "max_keys": (groups.max_keys - 1, r"expected max_queries and max_keys \(5, 5\), got \(5, 4\)"),
    }
    for field, (value, message) in wrong.items():
        with pytest.raises(ShapeError, match="AttentionGroups: " + message):
            dataclasses.replace(groups, **{field: value})


@needs_compiler
@pytest.mark.parametrize("kind", ["full", "conv_like"])
def test_attention_dropout_drops_probabilities_by_seed_and_its_gradient_follows(kind: str) -> None:
    library = wide_library()
    batch, heads, n, dim, p, seed = 2, 3, 24, 32, 0.3, 1234
    pattern = AttentionPattern(kind, 8, 4, kernel_size=3)
    groups = None if kind == "full" else kernel_groups(pattern, n)
    mask = pattern.square_mask(n)
    # The kept factors, read off: with q = k = 0 each query's probabilities are 1 / (its allowed keys) over those
    # keys, and with v the identity the output row is those probabilities times the factors.
    probe = torch.zeros(3, batch, heads, n, dim)
    probe[2] = torch.eye(n, dim)
    factors = native.causal_attention(library, probe, p, seed, groups)[0][..., :n] * mask.sum(1, keepdim=True)
    kept = factors[..., mask]
    assert torch.allclose(factors[..., ~mask], torch.zeros(())), "keys the mask disallows must have no weight"
    assert torch.all(torch.isclose(kept, torch.zeros(())) | torch.isclose(kept, torch.tensor(1 / (1 - p))))
    assert abs(kept.bool().float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5  # 4 sigma
    other_seed = native.causal_attention(library, probe, p, seed + 1, groups)[0][..., :n] * mask.sum(1, keepdim=True)
    assert not torch.allclose(other_seed, factors)

    # Random q, k, v with the same seed: the float64 formula with those factors, forward and backward.
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, n, 3, heads, dim, generator=generator).permute(2, 0, 3, 1, 4)
    grad = torch.randn(batch, heads, n, dim, generator=generator)
    exact = qkv.detach().double().requires_grad_()
    q, k, v = exact.unbind(0)
    scores = (q @ k.transpose(-1, -2) / dim**0.5).masked_fill(~mask, -math.inf)
    expected = (scores.softmax(-1) * factors.double()) @ v
    expected.backward(grad.double())
    assert exact.grad is not None
    out, lse = native.causal_attention(library, qkv, p, seed, groups)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1).float(), rtol=1e-5, atol=1e-5)
    grad_qkv = native.causal_attention_backward(library, qkv, out, lse, grad, p, seed, groups)
    torch.testing.assert_close(grad_qkv, exact.grad.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected a dropout probability in \[0, 1\), got 1.0"):
        native.causal_attention(library, qkv, 1.0, seed, groups)


@needs_compiler
def test_a_model_with_attention_dropout_trains_on_the_kernels_reproducibly(monkeypatch: pytest.MonkeyPatch) -> None:
    wide_library()
    config = DALLEConfig(
        num_text_tokens=30, text_seq_len=7, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2, heads=2,
        dim_head=16, attn_dropout=0.2,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    text, image = torch.randint(1, 30, (2, 7), generator=generator), torch.randint(0, 16, (2, 16), generator=generator)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)  # the model's weights and the dropout seeds
        model = DALLE(config).train()
        loss = model.loss(text, image).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    calls = counted_calls(monkeypatch, "causal_attention_backward")
    loss, grads = step()
    assert len(calls) == config.depth and torch.isfinite(loss)
    again_loss, again_grads = step()
    assert torch.equal(loss, again_loss) and all(map(torch.equal, grads, again_grads))


@needs_compiler
@pytest.mark.parametrize("option", ["plain", "rotary_emb", "reversible", "gradient_checkpointing"])
def test_a_model_trains_alike_with_and_without_the_attention_kernels(
    monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    wide_library()
    config = DALLEConfig(
        num_text_tokens=30, text_seq_len=7, num_image_tokens=16, image_fmap_size=5, dim=48, depth=5, heads=3,
        dim_head=16, attn_types=("full", "axial_row", "axial_col", "conv_like", "sparse"), sparse_block_size=4,
        **({} if option == "plain" else {option: True}),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    text, image = torch.randint(1, 30, (2, 7), generator=generator), torch.randint(0, 16, (2, 25), generator=generator)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = DALLE(config).train()
        loss = model.loss(text, image).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    forwards, backwards = (
        counted_calls(monkeypatch, "causal_attention"),
        counted_calls(monkeypatch, "causal_attention_backward"),
    )
    with_kernels = step()
    recomputed = option in ("reversible", "gradient_checkpointing")  # their backward runs each forward again
    assert len(forwards) == config.depth * (2 if recomputed else 1) and len(backwards) == config.depth
    assert_alike_without_the_kernels(monkeypatch, step, with_kernels)


@needs_compiler
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")  # the recording backend's
def test_compiled_training_calls_the_kernels_and_gives_the_eager_step() -> None:
    """torch.compile cannot trace the kernels' ctypes calls; it calls them as operators (attention forward and
    backward, for causal and grouped layers, and the loss with its gradient) where it traced PyTorch's attention and
    log-softmax before, which made compiled training on the CPU slower than eager. With dropout, the compiled graph
    draws its seeds as eager code does, a new one at every call."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    wide_library()
    config = DALLEConfig(
        num_text_tokens=30, text_seq_len=7, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2, heads=2,
        dim_head=16, attn_types=("full", "axial_row"), attn_dropout=0.2,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    text, image = torch.randint(1, 30, (2, 7), generator=generator), torch.randint(0, 16, (2, 16), generator=generator)
    torch.manual_seed(0)
    model = DALLE(config).train()

    def step(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(seed)  # the dropout seeds
        loss = model.loss(text, image).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = step(1)
    backend = AotEagerAndRecordGraphs()  # runs the traced graphs as they are: the same random draws as eager
    model.compile(backend=backend)
    loss, grads = step(1)
    torch.testing.assert_close(loss, eager_loss)
    for grad, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(step(2)[0], loss)  # another seed, other probabilities dropped
    forward = "".join(graph.code for graph in backend.fw_graphs)
    backward = "".join(graph.code for graph in backend.bw_graphs)
    assert forward.count("dalle_transformer.causal_attention.default") == config.depth
    assert forward.count("dalle_transformer.cross_entropy_with_gradient.default") == 2  # text and image losses
    assert backward.count("dalle_transformer.causal_attention_backward.default") == config.depth


@needs_compiler
def test_the_kernels_operators_refuse_what_the_kernels_would_read_past() -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    with pytest.raises(IndexError, match=r"expected targets in \[0, 10\), got 12"):
        torch.ops.dalle_transformer.cross_entropy_with_gradient(logits, torch.tensor([1, 12, 2]))
    with pytest.raises(ShapeError, match=r"int64 targets \[rows\], got torch.float32 \[3, 10\] and torch.int64 \[2\]"):
        torch.ops.dalle_transformer.cross_entropy_with_gradient(logits, torch.tensor([1, 2]))
    seed = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ShapeError, match=r"expected a float32 CPU qkv \[3, B, H, n, D\], got torch.float64"):
        torch.ops.dalle_transformer.causal_attention(
            torch.randn(3, 1, 2, 5, 8, dtype=torch.float64), 0.0, seed, "full", []
        )


@needs_compiler
def test_text_only_passes_of_other_patterns_use_the_causal_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Text queries attend causally in every pattern, so a pass over text alone is full attention in axial layers too.
    wide_library()
    config = DALLEConfig(
        num_text_tokens=30, text_seq_len=7, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2, heads=2,
        dim_head=16, attn_types=("axial_row", "conv_like"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = DALLE(config).eval()
    prefix = torch.randint(1, 30, (3, 2), generator=torch.Generator().manual_seed(4))

    def complete() -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        return model.generate_text_ids(prefix, top_k=5, generator=generator, use_cache=False)

    calls = counted_calls(monkeypatch, "causal_attention")
    with_kernel = complete()
    assert len(calls) >= config.depth  # every layer of every uncached pass
    monkeypatch.setattr(native, "default_library", lambda: None)
    assert torch.equal(with_kernel, complete())


@needs_compiler
def test_a_build_is_made_once_and_then_loaded(tmp_path: Path) -> None:
    compiler = native.find_compiler()
    assert compiler is not None
    native.load_library(tmp_path, compiler)
    (built,) = tmp_path.glob("native/*/*.so")
    stamp = built.stat().st_mtime_ns
    native.load_library(tmp_path, compiler)
    assert built.stat().st_mtime_ns == stamp
    assert list(built.parent.iterdir()) == [built]  # no scratch left behind
    # Without a compiler (a container image without one), the library built earlier is loaded.
    library = native.load_library(tmp_path, None)
    q, keys = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(native.attend(library, q, keys, keys), reference(q, keys, keys))
    with pytest.raises(native.NativeBuildError, match="no C compiler found .* and no library built in"):
        native.load_library(tmp_path / "empty", None)


def fake_compiler(tmp_path: Path, exit_code: int) -> list[str]:
    """A 'compiler' that answers --version and fails every build with a message (a stand-in for a broken toolchain)."""
    script = tmp_path / "fake-cc"
    script.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake-cc 1.0"; exit 0; fi\n'
        f'echo "native.c:1: error: no such thing" >&2\nexit {exit_code}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)]


def test_a_failing_compiler_raises_with_its_message_and_leaves_no_library(tmp_path: Path) -> None:
    with pytest.raises(native.NativeBuildError, match="exited with 3: native.c:1: error: no such thing"):
        native.load_library(tmp_path / "cache", fake_compiler(tmp_path, 3))
    assert not list((tmp_path / "cache").glob("native/*/*"))
    with pytest.raises(native.NativeBuildError, match="cannot run the C compiler"):
        native.load_library(tmp_path / "cache", [str(tmp_path / "missing-cc")])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(native.NativeBuildError, match="cannot build in"):  # a cache folder that cannot be made
        native.load_library(tmp_path / "a-file", fake_compiler(tmp_path, 0))


def test_the_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "mine"))
    assert native.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DALLE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.default_cache_dir() == tmp_path / "xdg" / "dalle"
    monkeypatch.setenv("CC", "gcc -m64")
    assert native.find_compiler() == ["gcc", "-m64"]


def small_model() -> DALLE:
    config = DALLEConfig(
        num_text_tokens=20, text_seq_len=6, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2, heads=2,
        dim_head=16, attn_types=("full", "axial_row"),
    )  # fmt: skip
    torch.manual_seed(0)
    return DALLE(config).eval()


@needs_compiler
def test_generation_is_the_same_with_the_kernel_without_it_and_on_the_efficient_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = small_model()
    text = torch.randint(1, 20, (3, 6), generator=torch.Generator().manual_seed(2))

    def generate() -> torch.Tensor:
        return model.generate_image_ids(text, top_k=8, generator=torch.Generator().manual_seed(3))

    calls = counted_calls(monkeypatch, "attend")
    with_kernel = generate()
    assert len(calls) == 2 * (model.config.image_seq_len - 1)  # each layer of each decoding step
    model.set_attention_backend("efficient")
    on_efficient = generate()
    model.set_attention_backend("auto")
    monkeypatch.setattr(native, "default_library", lambda: None)  # as on a machine where it did not build
    without_kernel = generate()
    assert torch.equal(with_kernel, on_efficient) and torch.equal(with_kernel, without_kernel)

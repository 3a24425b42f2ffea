"""The linear layer's CPU paths (the few-row ``(W @ x^T)^T``, alone or over column blocks, oneDNN's products forward
and backward, and the native library's streamed product) against a float64 ``x @ W^T + b`` computed
independently."""

from __future__ import annotations

import pytest
import torch

from dalle_transformer import native
from dalle_transformer.linear import (
    BLOCKED_MAX_ROWS,
    NATIVE_STREAMING_MAX_ROWS,
    ONEDNN_IS_FASTER,
    STREAMING_MAX_ROWS,
    Linear,
    StreamedWeight,
    column_blocks,
    few_row_copy,
    linear,
    native_streaming_library,
    onednn_linear,
    partitioned_linear,
    streaming_max_rows,
    without_gaps,
)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).float()


@pytest.mark.parametrize(
    "shape",
    [(1, 48), (3, 48), (4, 1, 48), (2, 5, 48), (streaming_max_rows() + 1, 48), (STREAMING_MAX_ROWS + 1, 48), (0, 48)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_the_matrix_product(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(80, 48, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    with torch.no_grad():
        out = linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 80)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [2, 3, 4, 5])
@pytest.mark.parametrize("in_features", [2048, 3072])
@pytest.mark.parametrize("with_bias", [True, False])
def test_column_blocks_give_the_matrix_product(rows, in_features, with_bias):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 1, in_features, generator=generator)
    weight = torch.randn(40, in_features, generator=generator)
    bias = torch.randn(40, generator=generator) if with_bias else None
    blocks = column_blocks(weight, rows)
    assert blocks is not None and blocks.is_contiguous()
    size = 1024 if rows <= 4 else 512
    assert blocks.shape == (in_features // size, 40, size)
    torch.testing.assert_close(blocks[1], weight[:, size : 2 * size])  # a copy of the weight's columns, in order
    with torch.no_grad():
        out = linear(x, weight, bias, blocks)
    assert out.shape == (rows, 1, 40) and out.is_contiguous()
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-3, rtol=1e-5)


def test_column_blocks_only_where_they_are_faster():
    wide = torch.zeros(8, 2048)
    assert column_blocks(wide, 4) is not None
    assert column_blocks(torch.zeros(8, 1024), 4) is None  # products over 1024 columns are already fast
    assert column_blocks(wide, 1) is None  # one row: a matrix-vector product, fast as it is
    assert column_blocks(wide, BLOCKED_MAX_ROWS + 1) is None
    assert column_blocks(wide.double(), 4) is None  # the few-row path is float32 only
    assert column_blocks(torch.zeros(8, 1536), 4) is None  # not a multiple of the 1024-column blocks
    assert column_blocks(torch.zeros(8, 1536), 5) is not None  # of 512 at 5 to 8 rows
    # Where oneDNN is faster, 6 rows and more are its products, not the streamed ones.
    assert (column_blocks(wide, 8) is None) == ONEDNN_IS_FASTER


def test_linear_keeps_gradients_flowing_through_the_standard_path():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    expected_x = 2 * (x.detach() @ layer.weight.detach().T + layer.bias.detach()) @ layer.weight.detach()
    torch.testing.assert_close(x.grad, expected_x)
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_linear_layer_has_nn_linear_state_dict_names():
    assert set(Linear(4, 3).state_dict()) == set(torch.nn.Linear(4, 3).state_dict()) == {"weight", "bias"}
    assert set(Linear(4, 3, bias=False).state_dict()) == {"weight"}


def _float64_linear_and_grads(x, weight, bias, grad_out):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, bias) if t is not None]
    x64, w64 = leaves[0], leaves[1]
    out = x64 @ w64.T + (leaves[2] if bias is not None else 0)
    out.backward(grad_out.double())
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("out_features", [24, 200])  # narrower and wider than the input: both weight-gradient forms
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_forward_and_gradients(out_features, with_bias):
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(3, 40, 64, generator=generator)
    x = base[:, 3:, :48].requires_grad_()  # a strided input, as the logits' slices of the hidden states
    parameter = torch.randn(out_features + 5, 48, generator=generator, requires_grad=True)
    weight = parameter[5:]  # a row slice of a larger weight, as the text and image logits' parts
    bias = torch.randn(out_features, generator=generator, requires_grad=True) if with_bias else None
    grad_out = torch.randn(3, 37, out_features, generator=generator)
    out = onednn_linear(x, weight, bias)
    out.backward(grad_out)
    expected, (grad_x, grad_w, *grad_b) = _float64_linear_and_grads(x, weight, bias, grad_out)
    assert out.shape == (3, 37, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_x.float(), atol=1e-4, rtol=1e-5)
    assert parameter.grad is not None
    torch.testing.assert_close(parameter.grad[5:], grad_w.float(), atol=1e-3, rtol=1e-5)
    assert torch.count_nonzero(parameter.grad[:5]) == 0
    if bias is not None:
        torch.testing.assert_close(bias.grad, grad_b[0].float(), atol=1e-4, rtol=1e-5)


def test_product_factors_with_gaps_are_copied_and_others_are_not():
    """oneDNN runs its reference kernel, hundreds of times slower, on a second factor whose rows (or columns) have
    gaps between them: those are copied to rows first, the layouts its fast kernels take are passed as they are."""
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(6, 10, generator=generator)
    columns = torch.randn(10, 6, generator=generator).T
    one_row = torch.randn(3, 10, generator=generator)[1:2]
    for plain in (rows, columns, one_row):
        assert without_gaps(plain) is plain
    wider = torch.randn(6, 16, generator=generator)[:, :10]  # rows 16 floats apart
    taller = torch.randn(10, 9, generator=generator).T[:6]  # columns 9 floats apart, [6, 10]
    for gapped in (wider, taller):
        copy = without_gaps(gapped)
        assert copy.is_contiguous() and torch.equal(copy, gapped)
    if ONEDNN_IS_FASTER:
        packed = torch.ops.mkldnn._reorder_linear_weight(rows, 4)
        assert without_gaps(packed) is packed


def test_onednn_linear_gradients_with_an_input_sliced_from_wider_rows():
    """A 2-D input whose rows have gaps (columns sliced from a wider tensor) is viewed, not copied, as the rows of
    the products; its transpose, the weight gradient's second factor, goes to oneDNN without gaps."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(30, 64, generator=generator)[:, :48].requires_grad_()
    weight = torch.randn(24, 48, generator=generator, requires_grad=True)  # narrower: the gradient's x^T factor
    grad_out = torch.randn(30, 24, generator=generator)
    onednn_linear(x, weight).backward(grad_out)
    _, (grad_x, grad_w) = _float64_linear_and_grads(x, weight, None, grad_out)
    torch.testing.assert_close(weight.grad, grad_w.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_x.float(), atol=1e-4, rtol=1e-5)


def test_onednn_linear_gradients_only_where_asked():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=generator)
    weight = torch.randn(8, 16, generator=generator, requires_grad=True)
    onednn_linear(x, weight).sum().backward()  # an input without gradient: the weight's alone
    torch.testing.assert_close(weight.grad, x.sum(0).expand(8, 16), atol=1e-5, rtol=1e-5)
    frozen = weight.detach()
    x.requires_grad_()
    onednn_linear(x, frozen).sum().backward()  # a frozen weight: the input's alone
    torch.testing.assert_close(x.grad, frozen.sum(0).expand(10, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_grad", ["all", "no weight", "no input"])
def test_partitioned_linear_is_two_layers_over_the_weights_parts(with_grad):
    # 100 and 20 output features over 48 inputs: both forms of the weight gradient (and of the bias's: summed in the
    # product for the wider part, by a sum for the narrower), written into parts of one gradient.
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(3, 11, 48, generator=generator)
    weight = torch.randn(120, 48, generator=generator).requires_grad_(with_grad != "no weight")
    bias = torch.randn(120, generator=generator, requires_grad=True)
    x = base.clone().requires_grad_(with_grad != "no input")
    first, second = partitioned_linear(x, 4, weight, bias, 100)
    grads = torch.randn(3, 4, 100, generator=generator), torch.randn(3, 7, 20, generator=generator)
    torch.autograd.backward((first, second), grads)
    if ONEDNN_IS_FASTER:
        assert type(first.grad_fn).__name__ == "_PartitionedLinearBackward"
    leaves = [t.detach().double().requires_grad_() for t in (base, weight, bias)]
    x64, w64, b64 = leaves
    expected = x64[:, :4] @ w64[:100].T + b64[:100], x64[:, 4:] @ w64[100:].T + b64[100:]
    torch.autograd.backward(expected, [g.double() for g in grads])
    for out, reference in zip((first, second), expected, strict=True):
        torch.testing.assert_close(out, reference.float(), atol=1e-4, rtol=1e-5)
    for leaf, reference in zip((x, weight, bias), leaves, strict=True):
        if leaf.requires_grad:
            torch.testing.assert_close(leaf.grad, reference.grad.float(), atol=1e-4, rtol=1e-5)
        else:
            assert leaf.grad is None


def test_onednn_linear_follows_a_weight_changed_in_place():
    # An optimizer updates weights in place, at the same address: no packed copy of an old weight may be reused.
    generator = torch.Generator().manual_seed(4)
    x, weight = torch.randn(64, 32, generator=generator), torch.randn(48, 32, generator=generator)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(onednn_linear(x, weight), (x.double() @ weight.double().T).float())
            weight.add_(torch.randn(48, 32, generator=generator))


def test_mismatched_shapes_get_f_linear_errors():
    x, weight = torch.randn(100, 10), torch.randn(8, 12)
    with pytest.raises(RuntimeError, match=r"cannot be multiplied \(100x10 and 12x8\)"):
        linear(x, weight)
    with pytest.raises(RuntimeError, match="size"):
        linear(torch.randn(100, 12), weight, torch.randn(5))


def test_linear_leaves_autocast_to_f_linear():
    x, weight = torch.randn(100, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight).dtype == torch.bfloat16


def test_compiled_onednn_linear_has_no_graph_breaks_and_eager_gradients():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(70, 32, generator=generator, requires_grad=True)
    first = torch.randn(96, 32, generator=generator, requires_grad=True)
    bias = torch.randn(96, generator=generator, requires_grad=True)
    second = torch.randn(16, 96, generator=generator, requires_grad=True)
    leaves = (x, first, bias, second)

    def loss(x, first, bias, second):
        return onednn_linear(torch.relu(onednn_linear(x, first, bias)), second).square().sum()

    assert torch._dynamo.explain(loss)(*leaves).graph_break_count == 0
    torch.compile(loss, fullgraph=True)(*leaves).backward()
    compiled = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    loss(*leaves).backward()
    for got, t in zip(compiled, leaves, strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_row_copies_give_the_matrix_product(rows, with_bias):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 1, 2048, generator=generator)
    weight = torch.randn(96, 2048, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    copy = few_row_copy(weight, rows)
    if native_streaming_library() is not None:  # the native library's blocks, holding the weight's values
        assert isinstance(copy, StreamedWeight) and torch.equal(copy.values(), weight)
    elif ONEDNN_IS_FASTER:  # oneDNN's blocked layout at any number of rows, holding the weight's values
        assert isinstance(copy, torch.Tensor) and copy.is_mkldnn
        assert torch.equal(copy.to_dense(), weight)
    else:
        assert (copy is None) == (column_blocks(weight, rows) is None)
    unpacked = few_row_copy(weight, rows, packed=False)  # for torch.compile: neither of those layouts
    assert unpacked is None or (isinstance(unpacked, torch.Tensor) and not unpacked.is_mkldnn)
    with torch.no_grad():
        out = linear(x, weight, bias, copy)
    assert out.shape == (rows, 1, 96) and out.is_contiguous()
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-3, rtol=1e-5)


@pytest.mark.skipif(native_streaming_library() is None, reason="the native streamed product runs on AVX-512 CPUs")
def test_streamed_copies_give_the_product_up_to_their_rows_and_the_standard_path_past_them(monkeypatch):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(100, 37, generator=generator, requires_grad=True)  # one whole block of 64 and a part
    bias = torch.randn(100, generator=generator, requires_grad=True)
    copy = few_row_copy(weight, 4)
    assert isinstance(copy, StreamedWeight) and copy.blocks.shape == (2, 37, 64)
    assert not isinstance(few_row_copy(weight, NATIVE_STREAMING_MAX_ROWS + 1), StreamedWeight)
    calls = []
    product = native.stream_product
    monkeypatch.setattr(native, "stream_product", lambda *args: calls.append(1) or product(*args))
    for rows in (1, 5, NATIVE_STREAMING_MAX_ROWS, NATIVE_STREAMING_MAX_ROWS + 3):  # the last: the standard path
        x = torch.randn(rows, 1, 37, generator=generator)
        with torch.no_grad():
            out = linear(x, weight, bias, copy)
        assert out.shape == (rows, 1, 100) and out.is_contiguous()
        torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-4, rtol=1e-5)
    assert len(calls) == 3
    x = torch.randn(3, 37, generator=generator, requires_grad=True)
    linear(x, weight, bias, copy).sum().backward()  # with autograd: the weight as stored, gradients flowing
    assert len(calls) == 3 and x.grad is not None and bias.grad is not None
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(100, 37))

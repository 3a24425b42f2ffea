"""The few-row linear layer (``(W @ x^T)^T``, alone or over column blocks) against a float64 ``x @ W^T + b`` computed
independently."""

from __future__ import annotations

import pytest
import torch

from dalle_transformer.linear import BLOCKED_MAX_ROWS, STREAMING_MAX_ROWS, Linear, column_blocks, linear


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).float()


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (4, 1, 48), (2, 5, 48), (STREAMING_MAX_ROWS + 1, 48), (0, 48)])
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


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8])
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
    assert column_blocks(torch.zeros(8, 1536), 8) is not None  # of 512 at 5 to 8 rows


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

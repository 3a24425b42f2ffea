"""The few-row linear layer (``(W @ x^T)^T``) against a float64 ``x @ W^T + b`` computed independently."""

from __future__ import annotations

import pytest
import torch

from dalle_transformer.linear import STREAMING_MAX_ROWS, Linear, linear


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

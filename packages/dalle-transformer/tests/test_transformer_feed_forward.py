"""The feed-forward's GEGLU (values, gradients and what it keeps for backward) and its one-position decoding form
against float64 references computed independently."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_transformer.decoding_weights import ProjectionCopies
from dalle_transformer.layers import FeedForward, geglu
from dalle_transformer.linear import ONEDNN_IS_FASTER, StreamedWeight, native_streaming_library


def naive_geglu(h: torch.Tensor) -> torch.Tensor:
    x, gate = h.chunk(2, dim=-1)
    return x * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))  # GELU from its formula


@pytest.mark.parametrize("shape", [(3, 5, 8), (12, 4)])
def test_geglu_values_and_gradients_match_the_formula(shape):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=generator, requires_grad=True)
    weights = torch.randn(naive_geglu(h).shape, generator=generator)
    (geglu(h) * weights).sum().backward()
    assert h.grad is not None
    grad = h.grad.clone()
    h64 = h.detach().double().requires_grad_()
    expected = naive_geglu(h64)
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(geglu(h).double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(geglu(h).double(), expected.detach(), atol=1e-6, rtol=1e-5)


def test_geglu_keeps_only_its_input_for_backward():
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    h = torch.randn(6, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = geglu(h)
    assert [t.data_ptr() for t in kept] == [h.data_ptr()]  # not gelu(gate): recomputed in backward
    out.sum().backward()
    assert h.grad is not None and h.grad.shape == h.shape


def test_compiled_geglu_feed_forward_has_no_graph_break_and_eager_gradients():
    """Under ``torch.compile`` the GEGLU is the plain formula (dynamo cannot trace the autograd function's backward
    and broke the graph there); the loss and gradients are eager's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ff = FeedForward(16, mult=4, dropout=0.0, activation="geglu")
    x = torch.randn(2, 3, 16, requires_grad=True)
    ff(x).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in ff.named_parameters() if p.grad is not None}
    expected_x = x.grad.clone()
    ff.zero_grad()
    x.grad = None
    counters.clear()
    torch.compile(ff)(x).square().sum().backward()
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name, p in ff.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
@pytest.mark.parametrize(("rows", "dim"), [(4, 256), (3, 512), (1, 64)])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "blocks"])
def test_one_position_matches_forward(activation, rows, dim, packed):
    torch.manual_seed(0)
    ff = FeedForward(dim, mult=4, dropout=0.0, activation=activation).eval()
    x = torch.randn(rows, 1, dim)
    with torch.no_grad():
        expected = ff.net.double()(x.double())
        ff.float()
        first, last = (ProjectionCopies(rows, packed=packed, copies=True)(layer) for layer in ff.projections)
        if packed and native_streaming_library() is not None:  # both weights in the native library's blocks
            assert isinstance(first.prepared, StreamedWeight) and isinstance(last.prepared, StreamedWeight)
        elif packed and ONEDNN_IS_FASTER:  # both weights in oneDNN's layout
            assert isinstance(first.prepared, torch.Tensor) and isinstance(last.prepared, torch.Tensor)
            assert last.prepared.is_mkldnn
        else:  # the blocked product is exercised too
            assert first.prepared is None and (last.prepared is not None) == (4 * dim > 1024 and rows > 1)
        got = ff.one_position(x, first, last)
        got_rows = ff.one_position(x[:, 0], first, last)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_rows, got[:, 0])

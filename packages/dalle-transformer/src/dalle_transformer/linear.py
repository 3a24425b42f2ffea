"""Linear layers computed by whichever CPU kernels are fastest for the rows going through them.

For ``x`` of a few rows (KV-cached decoding), ``F.linear`` (``x @ W^T``) makes the CPU BLAS repack the whole weight
matrix on every call; computing ``(W @ x^T)^T`` instead streams the weight once in its stored row-major order. On a
2-core AMD EPYC machine (docs/benchmarks.md) that is 2.0-3.2x faster at 4 rows, 1.3-1.6x at 8 to 16 and 1.2x at 64,
and the same at 1 row or hundreds. The result is the same product, summed in another order (float rounding only).

That product is fast while the few rows of ``x`` are small next to the CPU's caches: on the same machine MKL streams
a weight at 40-50 GB/s while ``rows x in_features`` stays at or below 4096 floats, and at 13-18 GB/s above (an
``[out, 2048]`` weight at 4 rows, the feed-forward's output projection of a 512-wide model). :func:`column_blocks`
copies such a weight into contiguous blocks of its input columns, each product of a block being under that size,
and :func:`linear` sums the blocks' products: 2.3-2.5x faster for those weights at 4 rows, 1.5-1.8x at 6 to 8
(docs/benchmarks.md). Decoding makes these copies when a pass starts on an empty KV cache, for that sequence.

On a CPU whose vector width PyTorch runs at AVX-512 (:data:`ONEDNN_IS_FASTER`), the other products go to oneDNN's
float32 matrix multiply, forward and backward, instead of the BLAS behind ``F.linear``: MKL runs its AVX2 code on
AMD processors, oneDNN the AVX-512 code the processor has. On that machine (Zen 5) oneDNN multiplies at 400-460
GFLOP/s where MKL reaches 190-210 (the forward and input-gradient products of the benchmark models; weight gradients
300-400), and streams a decoding step's weights faster than the form above from 6 rows on (2x at 32). Decoding
there reads every projection from a copy in oneDNN's own blocked layout (:func:`few_row_copy`, made per sequence
like the column blocks), which oneDNN streams faster still, at any number of rows: a medium model's step weights in
3.4 ms at 4 rows against 4.0 for the column blocks, 3.8 against 5.9 at 8. Still float32 products, summed in another
order. Where the native library's AVX-512 kernels run, up to 16 rows, the copies are its blocks instead
(:class:`StreamedWeight`, :func:`dalle_transformer.native.stream_product`), which stream faster than oneDNN's
layout (1.2-1.6x for a medium model's step weights on a Zen 4 machine, 2.2x for a small model's).
"""

from __future__ import annotations

import ctypes
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from dalle_transformer import native

# Up to this many rows the weight-streaming form is used (it was still 1.2x faster than MKL's F.linear at 64 rows;
# larger products, training's among them, go through F.linear or oneDNN).
STREAMING_MAX_ROWS = 64
# Where oneDNN is faster, streaming only up to this many rows: a medium model's decoding-step weights (8 layers,
# cold caches) took 3.8 ms streamed and 4.9 in oneDNN at 4 rows, 6.2 and 5.1 at 6, 7.3 and 5.7 at 8, 17 and 9 at 32.
ONEDNN_STREAMING_MAX_ROWS = 5
# Column blocks: up to 4 rows, blocks of 1024 input columns; 5 to 8 rows, 512; above 8 rows the products are no
# faster in blocks. Only weights of more than 1024 input columns are copied: in models up to 1024 wide (and heads x
# dim_head up to 1024) the feed-forward's output projections alone, a third of the layers' weights.
BLOCKED_MAX_ROWS = 8
BLOCKED_MIN_COLUMNS = 1025
# Up to this many rows, decoding's products go to the native library's streamed product where it runs (AVX-512
# CPUs): on a 2-core Zen 4 machine, a medium model's step weights (cold) took 3.3-4.5 ms there against 5.5-6.5 in
# oneDNN's layout at 4 rows, 5.1-5.8 against 6.4-7.1 at 8, 7.0-7.6 against 8.1-8.7 at 16 (docs/benchmarks.md).
NATIVE_STREAMING_MAX_ROWS = 16


def onednn_is_faster() -> bool:
    """Whether this CPU runs float32 products faster in oneDNN than in PyTorch's BLAS: where PyTorch's kernels use
    AVX-512 (MKL may not, see the module's docstring) and oneDNN is built in."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    )


# A fact of the machine, read once (and a constant to torch.compile, which cannot trace the capability queries).
ONEDNN_IS_FASTER = onednn_is_faster()


def streaming_max_rows() -> int:
    """The most rows :func:`linear` computes by streaming the weight, on this machine."""
    return ONEDNN_STREAMING_MAX_ROWS if ONEDNN_IS_FASTER else STREAMING_MAX_ROWS


class StreamedWeight(NamedTuple):
    """A weight ``[out_features, in]`` copied for the native library's streamed product
    (:func:`dalle_transformer.native.stream_blocks`), and that library."""

    blocks: torch.Tensor
    out_features: int
    library: ctypes.CDLL

    def values(self) -> torch.Tensor:
        """The ``[out_features, in]`` weight the blocks hold (a copy)."""
        return self.blocks.transpose(1, 2).flatten(0, 1)[: self.out_features].clone()


def native_streaming_library() -> ctypes.CDLL | None:
    """The native library where its streamed product runs (built here, on an AVX-512 CPU), outside
    ``torch.compile``'s tracing; else None."""
    library = native.default_library()
    if library is None or torch.compiler.is_compiling() or not native.wide_kernels_run(library):
        return None
    return library


def few_row_copy(weight: torch.Tensor, rows: int, *, packed: bool = True) -> torch.Tensor | StreamedWeight | None:
    """A copy of ``weight`` in the layout that :func:`linear`'s products of ``rows`` rows are fastest with (its
    ``prepared`` argument). Where the native library's AVX-512 kernels run, up to :data:`NATIVE_STREAMING_MAX_ROWS`
    rows: a :class:`StreamedWeight`; else where :data:`ONEDNN_IS_FASTER`, oneDNN's blocked layout (an opaque oneDNN
    tensor); neither with ``packed=False`` (for ``torch.compile``, which cannot take them); else
    :func:`column_blocks`. None where :func:`linear` is as fast on the weight as stored."""
    if packed and weight.device.type == "cpu" and weight.dtype == torch.float32 and rows > 0:
        library = native_streaming_library()
        if library is not None and rows <= NATIVE_STREAMING_MAX_ROWS:
            return StreamedWeight(native.stream_blocks(weight), weight.shape[0], library)
        if ONEDNN_IS_FASTER:
            return cast(torch.Tensor, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows))
    return column_blocks(weight, rows)


def column_blocks(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A copy of ``weight`` (``[out, in]``) as contiguous blocks of its input columns, ``[in // size, out, size]``,
    for products with ``rows`` rows on the CPU; None where :func:`linear` is as fast on the weight itself."""
    out_features, in_features = weight.shape
    size = 1024 if rows <= 4 else 512
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not 2 <= rows <= min(BLOCKED_MAX_ROWS, streaming_max_rows())
        or in_features < BLOCKED_MIN_COLUMNS
        or in_features % size
    ):
        return None
    return weight.detach().view(out_features, in_features // size, size).transpose(0, 1).contiguous()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    prepared: torch.Tensor | StreamedWeight | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``. ``prepared``: ``weight``'s :func:`few_row_copy` (the same values), for a
    product without autograd. On the CPU, without autograd, with 2 to :func:`streaming_max_rows` rows:
    ``(W @ x^T)^T + b``, summed over the column blocks when prepared; other float32 CPU products in oneDNN where
    :data:`ONEDNN_IS_FASTER`."""
    if isinstance(prepared, StreamedWeight):
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a decoding step's rows are 2-D already)
        if flat.shape[0] <= NATIVE_STREAMING_MAX_ROWS and native.stream_product_takes(flat, prepared.blocks, bias):
            out = native.stream_product(prepared.library, flat, prepared.blocks, prepared.out_features, bias)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], prepared.out_features)
        prepared = None
    if prepared is not None and prepared.is_mkldnn and _PACKED_PRODUCT is not None:  # never under torch.compile
        if x.dim() == 2:
            return _PACKED_PRODUCT(x, prepared, bias, "none", [], "")
        flat = x.reshape(-1, x.shape[-1])
        return _PACKED_PRODUCT(flat, prepared, bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        2 <= rows <= streaming_max_rows()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        flat = x.reshape(rows, x.shape[-1]).T
        if prepared is not None:
            out = _blocked_product(prepared, flat, bias)
        else:
            out = weight @ flat if bias is None else torch.addmm(bias[:, None], weight, flat)
        # Copied back to contiguous rows (a few rows: cheap): elementwise ops, residual adds and SDPA's fused CPU
        # kernel are slower on the transposed view, more than the next projection gains from it.
        return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
    if ONEDNN_IS_FASTER and rows and _onednn_applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _blocked_product(blocks: torch.Tensor, flat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    size = blocks.shape[-1]
    out = blocks[0] @ flat[:size] if bias is None else torch.addmm(bias[:, None], blocks[0], flat[:size])
    for i in range(1, blocks.shape[0]):
        out.addmm_(blocks[i], flat[i * size : (i + 1) * size])
    return out


# oneDNN's product as one resolved overload, for products with few_row_copy's packed weights (made only where
# ONEDNN_IS_FASTER): a decoding step makes tens of them, and the overload packet's lookup is a noticeable part of each.
_PACKED_PRODUCT = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_IS_FASTER else None


def onednn_trains(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear` computes ``F.linear(x, weight, bias)`` with autograd in oneDNN (:func:`onednn_linear`):
    float32 CPU tensors of PyTorch's own class, at least one row, where :data:`ONEDNN_IS_FASTER`."""
    return ONEDNN_IS_FASTER and x.numel() > 0 and _onednn_applies(x, weight, bias)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # Autocast must see F.linear (to run it in its dtype), tensor subclasses (DTensor, ...) dispatch it their way, and
    # mismatched shapes get its error message (oneDNN's names no shapes).
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1] > 0
        and type(x) in native.PLAIN_TENSOR_TYPES
        and type(weight) in native.PLAIN_TENSOR_TYPES
        and (
            bias is None
            or (
                type(bias) in native.PLAIN_TENSOR_TYPES
                and bias.dtype == torch.float32
                and bias.shape == weight.shape[:1]
            )
        )
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors (at least one row and one input feature), computed by
    oneDNN, forward and backward, on any CPU."""
    flat = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    out = _OneDNNLinear.apply(flat, weight, bias) if needs_grad else _product(flat, weight, bias)
    return cast(torch.Tensor, out).view(*x.shape[:-1], weight.shape[0])


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b^T + bias`` (2-D ``a``; ``b`` 2-D, either may be a strided view, or a :func:`few_row_copy` in oneDNN's
    layout outside torch.compile) in oneDNN."""
    if torch.compiler.is_compiling():
        return onednn_product(a, b, bias)
    return torch.ops.mkldnn._linear_pointwise(a, without_gaps(b), bias, "none", [], "")


# The same product as an operator that torch.compile keeps whole: inductor lowers oneDNN's own op only for a constant
# weight (its inference-time weight packing). Eager code calls oneDNN directly, without the custom op's dispatch.
@torch.library.custom_op("dalle_transformer::onednn_product", mutates_args=())
def onednn_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, without_gaps(b), bias, "none", [], "")


def without_gaps(b: torch.Tensor) -> torch.Tensor:
    """A product's second factor ``b`` (``[N, K]``) as oneDNN's fast kernels take it: ``b`` itself where its rows or
    its columns lie side by side (strides ``(K, 1)`` or ``(1, N)``, or a tensor in oneDNN's own layout), else a
    contiguous copy. With gaps between them (a weight sliced from a wider one) oneDNN runs its reference kernel:
    400-900x slower here ([512, 256] with rows 320 floats apart: 442 ms a product, against 1.1 ms contiguous)."""
    if b.layout != torch.strided or b.is_contiguous() or b.T.is_contiguous():
        return b
    return b.contiguous()


@onednn_product.register_fake
def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # As F.linear's backward: the input only for the weight's gradient, the weight only for the input's.
        ctx.save_for_backward(flat if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        return _product(flat, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight = ctx.saved_tensors
        grad_input = onednn_input_gradient(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = onednn_weight_gradient(grad, flat) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias


def onednn_input_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``: the gradient for the input rows of ``flat @ weight^T`` (float32 CPU, in oneDNN)."""
    return _product(grad, weight.T)


def onednn_weight_gradient(
    grad: torch.Tensor, flat: torch.Tensor, out: torch.Tensor | None = None, bias_out: torch.Tensor | None = None
) -> torch.Tensor:
    """``grad^T @ flat`` (``[out, in]``): the gradient for ``weight`` of ``flat @ weight^T`` (float32 CPU, 2-D
    ``grad`` and ``flat``, in oneDNN); written into ``out`` (returned) where given, a contiguous ``[out, in]``.
    ``bias_out``: also writes the bias's gradient there (``grad``'s column sums)."""
    # For out > in computed as (flat^T @ grad)^T and copied to rows: oneDNN is slow writing a result of many more
    # rows than columns (an [4096, 512] weight gradient from 2,560 rows: 200 GFLOP/s, against 340 this way with the
    # copy). oneDNN copies a transposed first factor to rows itself: the native library copies it (and the result
    # below) on every thread where it is built, where PyTorch's and oneDNN's copies run on one.
    if grad.shape[1] <= flat.shape[1]:
        if bias_out is not None:
            torch.sum(grad, 0, out=bias_out)
        result = _product(_transposed(grad), flat.T)
        return result if out is None else out.copy_(result)
    # A row of ones under flat^T makes the product's last row the bias's gradient: summed as the product reads grad,
    # where a sum afterwards reads it back from memory (0.7 ms of an S benchmark step for the text logits' bias).
    inputs = flat.shape[1]
    if bias_out is None:
        factor = _transposed(flat)  # (a view for oneDNN to copy where the native library does not copy it)
    else:
        factor = flat.new_empty(inputs + 1, flat.shape[0])
        _transposed(flat, factor[:inputs])
        factor[inputs].fill_(1.0)
    result = _product(factor, grad.T)
    if bias_out is not None:
        bias_out.copy_(result[inputs])
    weights = result[:inputs]
    return _transposed(weights, weights.new_empty(weights.shape[::-1]) if out is None else out)


def _transposed(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.T``: copied to rows of its own by the native library where it takes ``x`` (into ``out`` where given),
    else a view, copied into ``out`` where given."""
    library = native.library_for(x)
    if library is not None and native.transpose_takes(x):
        return native.transposed(library, x, out)
    return x.T if out is None else out.copy_(x.T)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def partitioned_linear(
    x: torch.Tensor, split: int, weight: torch.Tensor, bias: torch.Tensor, features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(x[:, :split], weight[:features], bias[:features])`` and ``linear(x[:, split:], weight[features:],
    bias[features:])`` for ``x`` ``[B, L, in]``: one layer whose output features are divided between two runs of
    positions (the logits layer: text positions predict text ids, image positions image ids). Where oneDNN trains
    the products, one autograd function (:class:`_PartitionedLinear`) whose backward writes both parts' weight and
    bias gradients into one gradient each."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if needs_grad and 0 < split < x.shape[1] and 0 < features < weight.shape[0] and onednn_trains(x, weight, bias):
        first, second = _PartitionedLinear.apply(x, split, weight, bias, features)
        return first, second
    sizes = [features, weight.shape[0] - features]
    first_weight, second_weight = weight.split(sizes)
    first_bias, second_bias = bias.split(sizes)
    return linear(x[:, :split], first_weight, first_bias), linear(x[:, split:], second_weight, second_bias)


class _PartitionedLinear(torch.autograd.Function):
    """:func:`partitioned_linear` in oneDNN. Two layers over split views of the weight would each compute their
    part's gradient, which the split's backward then copies into a whole-size gradient: the text part of a DALL-E
    logits layer is 10 MB, and the copy took 1-3 ms of a 170-200 ms training step of the S benchmark config, where
    the parts' products write their gradients in place here (docs/benchmarks.md)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, split: int, weight: torch.Tensor, bias: torch.Tensor, features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim = x.shape[0], x.shape[-1]
        first, second = x[:, :split].reshape(-1, dim), x[:, split:].reshape(-1, dim)
        ctx.save_for_backward(first, second, weight)
        ctx.features = features
        first_out = _product(first, weight[:features], bias[:features])
        second_out = _product(second, weight[features:], bias[features:])
        return first_out.view(batch, split, -1), second_out.view(batch, x.shape[1] - split, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_first: torch.Tensor, grad_second: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        first, second, weight = ctx.saved_tensors
        rows = (slice(None, ctx.features), slice(ctx.features, None))
        parts = [
            (grad.reshape(-1, grad.shape[-1]), inputs, part)
            for grad, inputs, part in ((grad_first, first, rows[0]), (grad_second, second, rows[1]))
        ]
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            batch = grad_first.shape[0]
            grads = [
                onednn_input_gradient(grad, weight[part]).view(batch, -1, weight.shape[1]) for grad, _, part in parts
            ]
            grad_x = torch.cat(grads, dim=1)
        grad_weight = weight.new_empty(weight.shape) if needs[2] else None
        grad_bias = weight.new_empty(weight.shape[0]) if needs[3] else None
        for grad, inputs, part in parts:
            bias_part = grad_bias[part] if grad_bias is not None else None
            if grad_weight is not None:
                onednn_weight_gradient(grad, inputs, out=grad_weight[part], bias_out=bias_part)
            elif bias_part is not None:
                torch.sum(grad, 0, out=bias_part)
        return grad_x, None, grad_weight, grad_bias, None

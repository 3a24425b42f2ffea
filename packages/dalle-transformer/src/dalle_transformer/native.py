"""Small C kernels (``native.c``) for what PyTorch's CPU operators do slowly here, compiled at first use.

A decoding step on the CPU streams the layers' weights through the caches between a few hundred small operations,
so each of those runs with cold caches, and three of them lose most to that:

- Products: a few rows (one position of each sequence) times each weight, at the rate the weight streams from
  memory. oneDNN, in its own layout, streamed a medium model's step weights at 20-25 GB/s on a 2-core Zen 4 machine
  (docs/benchmarks.md) where a plain sum reads 30; :func:`stream_product`, on a copy of each weight in blocks of 64
  output features made once per sequence (:func:`stream_blocks`), each block one contiguous read whose products
  are in registers, at 28-43 GB/s (small weights, in the caches, 2.2x faster). That model generates 17% faster, the
  small one 31%. AVX-512 CPUs only (:func:`wide_kernels_run`).

- Attention: one query per head against every cached key, reading each layer's keys and values once. SDPA's CPU
  kernel, made for blocks of queries, reads them at about half the rate a plain sum over the same tensors does: on
  the 2-core machine of docs/benchmarks.md 150-165 us per layer of the medium benchmark model at 193 positions,
  against 85 for the sum and 85 for :func:`decode_attention`, which streams each (row, head)'s keys and then values,
  prefetching a few rows ahead. That model generates 8-11% faster with it. SDPA's result up to float rounding.
- Sampling: top-k, temperature and :func:`dalle_transformer.sampling.draw`'s exponential race are a dozen small
  operations (about 260 us a step there, 50 in a loop of their own); :func:`sample_rows` is one pass over each row,
  from the same uniform draws, so it picks the same ids (up to float rounding at near-ties).

And in training, GEGLU (DALLE-pytorch's feed-forward activation) is three elementwise passes forward and five
backward over the feed-forward's widest activations; :func:`geglu` and :func:`geglu_backward` make one each (the
medium benchmark model trains 2.6-3.7% faster, the small one 2.4-3.7%). The weight gradients of oneDNN's products
need transposed copies, which PyTorch and oneDNN make on one thread; :func:`transposed` makes them on all
(1.1-2.9x faster; training steps 0.7-1.6% faster for the medium model, 2.0-3.3% for the small one), on AVX-512 CPUs
in blocks of 16 x 16 transposed in registers (3.5-12x faster again on the benchmark models' gradients, whose
rows, 8 KB apart, fell in one set of the L1 cache element by element). The
loss's cross-entropy (:func:`cross_entropy`) reads the logits once and writes their gradient in the same pass,
where PyTorch's log-softmax and gather make six passes forward and backward (1.8x faster on the small model's text
logits, 1% of its training step).

Training's causal attention over whole sequences (the ``full`` pattern, and the first pass of decoding) runs in
SDPA's flash kernel, whose products go through a BLAS that runs AVX2 code on AMD processors: 34 ms forward and
backward per layer of the medium model there. :func:`causal_attention` and :func:`causal_attention_backward` do
the same work (the backward recomputes the probabilities from each query's saved log-sum-exp, as flash attention
does) in register-blocked products of their own on AVX-512 CPUs (:func:`wide_kernels_run`): 11 ms, and the
medium model trains 12% faster, the small one 5%. Their gradient for QKV comes out in the projection's layout.
They drop probabilities (attention dropout) by a hash of a seed and each probability's place, so the backward drops
the same ones without a stored mask; with dropout 0.1 the medium model trains 30% faster than on SDPA, the small
one 19% (SDPA's CPU flash kernel takes no dropout: its math path keeps the n x n probabilities). Given
:class:`AttentionGroups` (the axial, conv-like and sparse patterns), the same kernels score each image query against
the text keys and its group's gathered image keys only, under the pattern's mask: 1.8-2.7x faster than PyTorch's
grouped path forward and backward at the medium model's shapes on a 2-core Zen 4 machine, and those layers then
train about as fast as ``full`` ones there (they were 4-19% slower).

The system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) builds them once per source and compiler, in
about a second, under ``$DALLE_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/dalle`` or ``~/.cache/dalle``);
later processes load the built library. Where that cannot happen (not Linux, no compiler, a failed build, or a
library that would bring an OpenMP runtime of its own instead of running on PyTorch's), :func:`available` is False,
:func:`unavailable_reason` says why, and PyTorch's operators run instead. The ``efficient`` attention backend
(``model.set_attention_backend``) attends with SDPA too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from dalle_core.errors import ShapeError

SOURCE_NAME = "native.c"
MAX_DIM = 1024  # native.c's MAX_DIM: the largest dim_head its attention takes
STREAM_COLS = 64  # native.c's STREAM_COLS: the output features in each block of stream_blocks' layout
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")
# dalle_decode_attention's parameters: four pointers, twelve sizes and strides, the scale, the thread count.
_ATTENTION_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 12, ctypes.c_float, ctypes.c_int]
# dalle_sample_rows's: logits, rows, vocab, row stride, uniforms, top-k, temperature, scratch, ids.
_SAMPLING_ARGUMENTS: list[type] = [
    ctypes.c_void_p,
    *[ctypes.c_int64] * 3,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_float,
    *[ctypes.c_void_p] * 2,
]
# dalle_geglu's: h, out, rows, width, threads; dalle_geglu_backward's: h, grad, grad_h, sums, rows, width, threads.
_GEGLU_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 2, ctypes.c_int]
_GEGLU_BACKWARD_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 2, ctypes.c_int]
# dalle_scale_backward's: h, grad, scale, grad_h, grad_scale, rows, width, threads.
_SCALE_BACKWARD_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 2, ctypes.c_int]
# dalle_cross_entropy's: logits, rows, vocab, row stride, targets, losses, grad, grad scale, threads.
_CROSS_ENTROPY_ARGUMENTS: list[type] = [
    ctypes.c_void_p,
    *[ctypes.c_int64] * 3,
    *[ctypes.c_void_p] * 3,
    ctypes.c_float,
    ctypes.c_int,
]
# dalle_transpose's: src, dst, rows, cols, src row stride, threads.
_TRANSPOSE_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 3, ctypes.c_int]
# dalle_causal_attention's: qkv, out, lse, batch, heads, n, dim, qkv strides, out strides, scale, dropout, seed,
# threads, groups (NULL or a group_plan); its backward's: qkv, out, grad, lse, grad_qkv, the four sizes, three
# arrays of strides, scale, dropout, seed, threads, groups.
_DROPOUT_AND_THREADS: list[type] = [ctypes.c_float, ctypes.c_float, ctypes.c_uint32, ctypes.c_int]
_CAUSAL_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 2]
_CAUSAL_ARGUMENTS += [*_DROPOUT_AND_THREADS, ctypes.c_void_p]
_CAUSAL_BACKWARD_ARGUMENTS: list[type] = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 3]
_CAUSAL_BACKWARD_ARGUMENTS += [*_DROPOUT_AND_THREADS, ctypes.c_void_p]
# dalle_stream_product's: x, rows, x row stride, blocks, in, out, bias, y, y row stride, threads.
_STREAM_ARGUMENTS: list[type] = [ctypes.c_void_p, *[ctypes.c_int64] * 2, ctypes.c_void_p, *[ctypes.c_int64] * 2]
_STREAM_ARGUMENTS += [*[ctypes.c_void_p] * 2, ctypes.c_int64, ctypes.c_int]


class NativeBuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why."""


def default_cache_dir() -> Path:
    """``$DALLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dalle``, else ``~/.cache/dalle``."""
    if os.environ.get("DALLE_CACHE_DIR"):
        return Path(os.environ["DALLE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dalle"


def find_compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split as a shell would), else the first of ``cc``, ``gcc``, ``clang`` found."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = next((path for path in map(shutil.which, ("cc", "gcc", "clang")) if path), None)
    return [found] if found else None


def load_library(cache_dir: Path, compiler: Sequence[str] | None) -> ctypes.CDLL:
    """The kernels' library from ``cache_dir``, built there with ``compiler`` first unless already built; raises
    :class:`NativeBuildError`. On x86-64 it is built with one code path per vector width (AVX-512, AVX2, baseline:
    GCC's ``target_clones``), or, where the compiler cannot, for the baseline only. Without a compiler (None) it
    loads a library built earlier from the same source (a container image can ship one in ``$DALLE_CACHE_DIR``)."""
    if not sys.platform.startswith("linux"):
        raise NativeBuildError(f"the kernels are built on Linux only, this is {sys.platform}")
    source = resources.files("dalle_transformer").joinpath(SOURCE_NAME).read_bytes()
    builds = cache_dir / "native" / hashlib.sha256(source).hexdigest()[:16]  # one folder per source
    if compiler is None:
        return _load_any(sorted(builds.glob("*.so")), builds)
    version = _compiler_version(compiler)
    clones = ["-DDALLE_TARGET_CLONES"] if platform.machine() == "x86_64" else None
    errors = []
    for flags in ([*_FLAGS, *clones], list(_FLAGS)) if clones else (list(_FLAGS),):
        command = [*compiler, *flags]
        target = builds / (hashlib.sha256(version + shlex.join(command).encode()).hexdigest()[:16] + ".so")
        if not target.exists():
            try:
                _compile(command, source, target)
            except NativeBuildError as error:
                errors.append(str(error))
                continue
        return _load(target)
    raise NativeBuildError("; ".join(errors))


def _load_any(libraries: Sequence[Path], folder: Path) -> ctypes.CDLL:
    errors = []
    for path in libraries:
        try:
            return _load(path)
        except NativeBuildError as error:
            errors.append(str(error))
    failed = f" that loads ({'; '.join(errors)})" if errors else ""
    raise NativeBuildError(
        f"no C compiler found (set CC, or install cc, gcc or clang) and no library built in {folder}{failed}"
    )


def _compiler_version(compiler: Sequence[str]) -> bytes:
    try:
        result = subprocess.run([*compiler, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeBuildError(f"cannot run the C compiler {shlex.join(compiler)}: {error}") from error
    if result.returncode != 0:
        raise NativeBuildError(f"the C compiler {shlex.join(compiler)} --version exited with {result.returncode}")
    return result.stdout


def _compile(command: Sequence[str], source: bytes, target: Path) -> None:
    # Built in a scratch folder beside the target and moved into place whole: processes starting together (torchrun
    # ranks) each build, and none loads a half-written library.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            source_path, built = Path(scratch) / SOURCE_NAME, Path(scratch) / target.name
            source_path.write_bytes(source)
            try:
                result = subprocess.run(
                    [*command, str(source_path), "-o", str(built)], capture_output=True, text=True, timeout=300
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                raise NativeBuildError(f"running {shlex.join(command)} failed: {error}") from error
            if result.returncode != 0:
                last_line = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise NativeBuildError(f"{shlex.join(command)} exited with {result.returncode}: {last_line}")
            os.replace(built, target)
    except OSError as error:  # the cache folder is not writable, for one
        raise NativeBuildError(f"cannot build in {target.parent}: {error}") from error


def _load(path: Path) -> ctypes.CDLL:
    before = _openmp_runtimes()
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeBuildError(f"cannot load {path}: {error}") from error
    # Its OpenMP runtime must be the one PyTorch already runs on (the same soname resolves to the loaded library):
    # a second runtime would keep two pools of threads spinning on the same cores. Left loaded but never called.
    added = _openmp_runtimes() - before
    if added:
        runtimes = ", ".join(sorted(added))
        raise NativeBuildError(f"the kernels would run on {runtimes}, not on PyTorch's OpenMP runtime")
    library.dalle_decode_attention.argtypes = _ATTENTION_ARGUMENTS
    library.dalle_decode_attention.restype = None
    library.dalle_sample_rows.argtypes = _SAMPLING_ARGUMENTS
    library.dalle_sample_rows.restype = ctypes.c_int64
    library.dalle_geglu.argtypes = _GEGLU_ARGUMENTS
    library.dalle_geglu.restype = None
    library.dalle_geglu_backward.argtypes = _GEGLU_BACKWARD_ARGUMENTS
    library.dalle_geglu_backward.restype = ctypes.c_int
    library.dalle_scale_backward.argtypes = _SCALE_BACKWARD_ARGUMENTS
    library.dalle_scale_backward.restype = ctypes.c_int
    library.dalle_cross_entropy.argtypes = _CROSS_ENTROPY_ARGUMENTS
    library.dalle_cross_entropy.restype = ctypes.c_int64
    library.dalle_transpose.argtypes = _TRANSPOSE_ARGUMENTS
    library.dalle_transpose.restype = None
    library.dalle_wide_kernels_run.argtypes = []
    library.dalle_wide_kernels_run.restype = ctypes.c_int
    library.dalle_stream_product.argtypes = _STREAM_ARGUMENTS
    library.dalle_stream_product.restype = ctypes.c_int
    library.dalle_causal_attention.argtypes = _CAUSAL_ARGUMENTS
    library.dalle_causal_attention.restype = ctypes.c_int
    library.dalle_causal_attention_backward.argtypes = _CAUSAL_BACKWARD_ARGUMENTS
    library.dalle_causal_attention_backward.restype = ctypes.c_int
    return library


def _openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    return {path for path in paths if os.path.basename(path).startswith(_OPENMP_RUNTIMES)}


@functools.cache
def _default_build() -> tuple[ctypes.CDLL | None, str | None]:
    """This process's library (built or loaded once) and, when there is none, why."""
    try:
        return load_library(default_cache_dir(), find_compiler()), None
    except (NativeBuildError, OSError, RuntimeError) as error:  # RuntimeError: no home folder, for one
        return None, str(error)


def default_library() -> ctypes.CDLL | None:
    """This process's kernels' library (built or loaded at the first call), or None where it is not available."""
    return _default_build()[0]


def required_library() -> ctypes.CDLL:
    """:func:`default_library`, for the operators that call the kernels (whose callers check that it is there):
    raises :class:`NativeBuildError`, saying why, where it is not."""
    library = default_library()
    if library is None:
        raise NativeBuildError(f"the native kernels are not available: {unavailable_reason()}")
    return library


def library_for(tensor: torch.Tensor) -> ctypes.CDLL | None:
    """:func:`default_library` for work on ``tensor``: None unless it is on the CPU, and under ``torch.compile``'s
    tracing (which must not trace the library's loading, and cannot trace its calls)."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return default_library()


def available() -> bool:
    """Whether the kernels are built and loaded in this process (building them at the first call)."""
    return default_library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _default_build()[1]


def fallback_note(device: torch.device | str, work: str) -> str | None:
    """On a Linux CPU where the kernels are not available, a line saying that ``work`` (``"decoding"``,
    ``"training"``) runs PyTorch's operators instead, slower, and why; None elsewhere."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return None
    reason = unavailable_reason()
    return None if reason is None else f"{work} runs PyTorch's operators instead of its C kernels, slower: {reason}"


# The classes of plain tensors: a parameter is one too (nn.Parameter only marks it as one), where other subclasses
# (DTensor, ...) dispatch their operations elsewhere.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_cpu_float32(t: torch.Tensor) -> bool:
    """A float32 CPU tensor of PyTorch's own class (no subclass dispatching its operations elsewhere), outside
    ``torch.compile``'s tracing: what every kernel here takes."""
    return type(t) is torch.Tensor and t.is_cpu and t.dtype == torch.float32 and not torch.compiler.is_compiling()


def _plain_cpu_float32_vector(t: torch.Tensor) -> bool:
    """:func:`_plain_cpu_float32` for a contiguous 1-D tensor that may be a parameter (a bias), checked without
    ``t.data`` (which makes a tensor: a decoding step checks tens of biases)."""
    return (
        type(t) in PLAIN_TENSOR_TYPES and t.is_cpu and t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()
    )


def decode_attention_takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` computes this attention: float32 CPU tensors without autograd, one query
    per row and head, last dims contiguous, ``dim_head <= MAX_DIM``, outside ``torch.compile``'s tracing."""
    return (
        _shape_problem(q, keys, values) is None
        and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))
        and not torch.compiler.is_compiling()
    )


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, keys, values)`` (no mask, scale ``dim_head ** -0.5``) for ``q``
    ``[B, H, 1, D]`` and ``keys``/``values`` ``[B, H, n, D]`` (float32 CPU tensors, any strides but a contiguous last
    dim), as a contiguous ``[B, H, 1, D]`` without autograd. Raises :class:`ShapeError` for other tensors and
    RuntimeError where the kernel is not available."""
    problem = _shape_problem(q, keys, values)
    if problem is not None:
        raise ShapeError(f"decode_attention: {problem}")
    library = default_library()
    if library is None:
        raise RuntimeError(f"the native decoding kernels are not available: {unavailable_reason()}")
    return attend(library, q, keys, values)


def attend(library: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """:func:`decode_attention` with ``library`` and without its checks (:func:`decode_attention_takes`)."""
    batch, heads, n, dim = keys.shape
    out = torch.empty(batch, heads, 1, dim)
    library.dalle_decode_attention(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        n,
        dim,
        q.stride(0),
        q.stride(1),
        *keys.stride()[:3],
        *values.stride()[:3],
        dim**-0.5,
        torch.get_num_threads(),
    )
    return out


class UnsampleableRow(ValueError):
    """A row of logits holding NaN or +inf, or only -inf: nothing to draw from."""


def sample_rows_takes(logits: torch.Tensor, top_k: int | None, temperature: float) -> bool:
    """Whether :func:`sample_rows` draws from these logits: a float32 CPU ``[rows, vocab]`` tensor with a contiguous
    last dim (and a vocabulary), ``top_k`` None or >= 1, a finite temperature > 0, outside ``torch.compile``."""
    return (
        _plain_cpu_float32(logits)
        and logits.dim() == 2
        and logits.shape[1] > 0
        and logits.stride(1) == 1
        and (top_k is None or top_k >= 1)
        and 0.0 < temperature < float("inf")
    )


def sample_rows(
    library: ctypes.CDLL, logits: torch.Tensor, uniform: torch.Tensor, top_k: int | None, temperature: float
) -> torch.Tensor:
    """One id per row of ``logits`` (:func:`sample_rows_takes`), ``int64[rows]``: among the values >= the ``top_k``-th
    largest (all with None; ties kept), the largest ``exp((x - max) / temperature) / -log(u)`` for ``uniform``
    (contiguous float32 ``[rows, vocab]`` in ``[0, 1)``): :func:`dalle_transformer.sampling.sample_logits`'s draw
    from those uniforms. Raises :class:`UnsampleableRow` for a row holding NaN or +inf, or only -inf."""
    rows, vocab = logits.shape
    if uniform.shape != logits.shape or uniform.dtype != torch.float32 or not uniform.is_contiguous():
        raise ShapeError(
            f"sample_rows: expected contiguous float32 uniforms of the logits' shape {list(logits.shape)}, "
            f"got {uniform.dtype} {list(uniform.shape)}"
        )
    ids = torch.empty(rows, dtype=torch.long)
    scratch = torch.empty(vocab)  # the selection of the top-k threshold reorders a copy of each row
    unusable = library.dalle_sample_rows(
        logits.data_ptr(),
        rows,
        vocab,
        logits.stride(0),
        uniform.data_ptr(),
        vocab if top_k is None else min(top_k, vocab),
        temperature,
        scratch.data_ptr(),
        ids.data_ptr(),
    )
    if unusable:
        raise UnsampleableRow(f"row {unusable - 1} of the logits holds NaN or +inf, or only -inf")
    return ids


def geglu_takes(h: torch.Tensor) -> bool:
    """Whether :func:`geglu` and :func:`geglu_backward` take ``h``: a contiguous float32 CPU tensor whose last dim is
    even and not empty, outside ``torch.compile``'s tracing."""
    return _plain_cpu_float32(h) and h.dim() >= 1 and h.shape[-1] > 0 and h.shape[-1] % 2 == 0 and h.is_contiguous()


def geglu(library: ctypes.CDLL, h: torch.Tensor) -> torch.Tensor:
    """``x * gelu(gate)`` for the halves ``x, gate`` of ``h``'s last dim (:func:`geglu_takes`), without autograd."""
    width = h.shape[-1] // 2
    out = torch.empty(*h.shape[:-1], width)
    library.dalle_geglu(h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], width, torch.get_num_threads())
    return out


def geglu_backward(
    library: ctypes.CDLL, h: torch.Tensor, grad: torch.Tensor, column_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of :func:`geglu` at ``h`` for ``grad`` (float32, ``h``'s shape with half its last dim): the
    gradients of ``x`` and ``gate`` as the two halves of one tensor shaped like ``h``. ``column_sums``: a contiguous
    float32 ``[h.shape[-1]]`` tensor, filled with that gradient summed over all but its last dim (the gradient of a
    bias added to ``h``), in the same pass."""
    grad = _checked_gradient("geglu_backward", grad, (*h.shape[:-1], h.shape[-1] // 2))
    if column_sums is not None:
        _check_output("geglu_backward", "column sums", column_sums, h.shape[-1:])
    grad_h = torch.empty_like(h)
    rows, width = h.numel() // h.shape[-1], h.shape[-1] // 2
    sums = None if column_sums is None else column_sums.data_ptr()
    threads = torch.get_num_threads()
    if library.dalle_geglu_backward(h.data_ptr(), grad.data_ptr(), grad_h.data_ptr(), sums, rows, width, threads):
        raise MemoryError("geglu_backward could not allocate its column sums' scratch memory")
    return grad_h


def _checked_gradient(work: str, grad: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """``grad`` as the backward kernels read it (contiguous), after checking that it is a float32 CPU tensor shaped
    ``expected``."""
    if tuple(grad.shape) != expected or grad.dtype != torch.float32 or grad.device.type != "cpu":
        raise ShapeError(f"{work}: expected a float32 CPU gradient {list(expected)}, got {grad.dtype} "
                         f"{list(grad.shape)} on {grad.device}")  # fmt: skip
    return grad.contiguous()


def _check_output(work: str, name: str, out: torch.Tensor, expected: Sequence[int]) -> None:
    """Raises :class:`ShapeError` unless ``out``, a tensor a kernel writes into, is a contiguous float32 CPU tensor
    shaped ``expected`` (:func:`_plain_cpu_float32`)."""
    if not (_plain_cpu_float32(out) and tuple(out.shape) == tuple(expected) and out.is_contiguous()):
        layout = "contiguous" if out.is_contiguous() else "strided"
        raise ShapeError(f"{work}: expected contiguous float32 CPU {name} {list(expected)}, got a {layout} "
                         f"{out.dtype} {list(out.shape)} on {out.device}")  # fmt: skip


def scale_backward_takes(h: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`scale_backward` takes ``h`` and ``scale``: a contiguous float32 CPU ``h`` of at least one
    element and a ``scale`` of its last dim's size, outside ``torch.compile``'s tracing."""
    return (
        _plain_cpu_float32(h)
        and h.dim() >= 1
        and h.numel() > 0
        and h.is_contiguous()
        and _plain_cpu_float32_vector(scale)
        and scale.shape[0] == h.shape[-1]
    )


def scale_backward(
    library: ctypes.CDLL, h: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``h * scale`` (a per-channel scale, :func:`scale_backward_takes`) for ``grad``: for ``h``,
    ``grad * scale``, and for ``scale``, ``grad * h`` summed over all but the last dim, in one pass."""
    grad = _checked_gradient("scale_backward", grad, tuple(h.shape))
    grad_h, grad_scale = torch.empty_like(h), torch.empty(h.shape[-1])
    width = h.shape[-1]
    pointers = (h.data_ptr(), grad.data_ptr(), scale.data_ptr(), grad_h.data_ptr(), grad_scale.data_ptr())
    if library.dalle_scale_backward(*pointers, h.numel() // width, width, torch.get_num_threads()):
        raise MemoryError("scale_backward could not allocate its column sums' scratch memory")
    return grad_h, grad_scale


def cross_entropy_fits(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """The dtypes, devices and shapes :func:`cross_entropy` takes (float32 CPU ``[rows, vocab]`` logits, both at
    least 1, and CPU ``int64[rows]`` targets): what a value traced by ``torch.compile`` shows of them."""
    return (
        logits.is_cpu
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.shape[0] > 0
        and logits.shape[1] > 0
        and targets.is_cpu
        and targets.dtype == torch.int64
        and targets.shape == logits.shape[:1]
    )


def cross_entropy_takes(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether :func:`cross_entropy` computes the loss of these: :func:`cross_entropy_fits`, logits whose last dim
    is contiguous and contiguous targets, plain tensors outside ``torch.compile``'s tracing."""
    return (
        _plain_cpu_float32(logits)
        and type(targets) is torch.Tensor
        and cross_entropy_fits(logits, targets)
        and logits.stride(1) == 1
        and targets.is_contiguous()
    )


def cross_entropy(
    library: ctypes.CDLL,
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor | None:
    """Each row's ``-log softmax(logits)[target]`` (:func:`cross_entropy_takes`), ``float32[rows]``, without
    autograd; with ``grad`` (a contiguous float32 CPU tensor shaped as ``logits``), also fills it with each row's
    gradient of its loss times ``grad_scale``, ``grad_scale * (softmax(logits) - one_hot(target))``. None, with
    nothing computed, where a target is outside ``[0, vocab)``: ``F.cross_entropy`` says what it makes of that (an
    error, or an ignored index)."""
    rows, vocab = logits.shape
    if grad is not None:
        _check_output("cross_entropy", "gradient", grad, logits.shape)
    losses = torch.empty(rows)
    outside = library.dalle_cross_entropy(
        logits.data_ptr(),
        rows,
        vocab,
        logits.stride(0),
        targets.data_ptr(),
        losses.data_ptr(),
        None if grad is None else grad.data_ptr(),
        grad_scale,
        torch.get_num_threads(),
    )
    return None if outside else losses


def transpose_takes(x: torch.Tensor) -> bool:
    """Whether :func:`transposed` copies ``x``: a 2-D float32 CPU tensor whose rows are contiguous, outside
    ``torch.compile``'s tracing."""
    return _plain_cpu_float32(x) and x.dim() == 2 and x.stride(1) == 1


def transposed(library: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.T.contiguous()`` for ``x`` that :func:`transpose_takes`, without autograd; written into ``out`` (returned)
    where given: a contiguous float32 CPU ``[cols, rows]`` tensor."""
    rows, cols = x.shape
    if out is None:
        out = torch.empty(cols, rows)
    else:
        _check_output("transposed", "out", out, (cols, rows))
    library.dalle_transpose(x.data_ptr(), out.data_ptr(), rows, cols, x.stride(0), torch.get_num_threads())
    return out


@functools.cache
def wide_kernels_run(library: ctypes.CDLL) -> bool:
    """Whether ``library``'s :func:`causal_attention` and :func:`stream_product` run on this CPU: they are built for
    AVX-512 (x86-64-v4) CPUs only (their register blocks take all 32 vector registers)."""
    return bool(library.dalle_wide_kernels_run())


def stream_blocks(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``) copied into the layout :func:`stream_product` reads: blocks of ``STREAM_COLS``
    output features, ``[ceil(out / STREAM_COLS), in, STREAM_COLS]``, zeros past ``out``."""
    out_features, in_features = weight.shape
    count = -(-out_features // STREAM_COLS)
    padded = F.pad(weight.detach(), (0, 0, 0, count * STREAM_COLS - out_features))
    return padded.view(count, STREAM_COLS, in_features).transpose(1, 2).contiguous()


def stream_product_takes(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`stream_product` multiplies ``x`` by ``blocks``: ``x`` a float32 CPU ``[rows, in]`` tensor
    (``rows >= 1``) whose last dim is contiguous and that needs no gradient, ``bias`` None or a contiguous float32
    CPU vector, outside ``torch.compile``'s tracing."""
    return (
        _plain_cpu_float32(x)
        and x.dim() == 2
        and x.shape[0] > 0
        and x.shape[1] == blocks.shape[1]
        and x.stride(1) == 1
        and not (torch.is_grad_enabled() and x.requires_grad)
        and (bias is None or _plain_cpu_float32_vector(bias))
    )


def stream_product(
    library: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias`` (:func:`stream_product_takes`) for ``blocks = stream_blocks(weight)``, ``weight``
    ``[out_features, in]``, as a contiguous ``[rows, out_features]`` without autograd (:func:`wide_kernels_run`)."""
    rows, in_features = x.shape
    if bias is not None and bias.shape != (out_features,):
        raise ShapeError(f"stream_product: expected a bias [{out_features}], got {list(bias.shape)}")
    out = torch.empty(rows, out_features)
    status = library.dalle_stream_product(
        x.data_ptr(),
        rows,
        x.stride(0),
        blocks.data_ptr(),
        in_features,
        out_features,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out_features,
        torch.get_num_threads(),
    )
    if status:
        raise RuntimeError("the native streamed product does not run on this CPU (see wide_kernels_run)")
    return out


@dataclass(frozen=True)
class AttentionGroups:
    """The keys of a non-``full`` pattern's image queries as :func:`causal_attention` takes them
    (:func:`dalle_transformer.plans.kernel_groups` makes them from the pattern's mask), for a sequence of ``length``
    positions: the first ``text_len`` attend causally, and every later one to those ``text_len`` text positions and
    to some of its group's gathered image keys.

    Group ``g``'s queries are ``queries[query_start[g]:query_start[g + 1]]`` and its keys
    ``keys[key_start[g]:key_start[g + 1]]`` (positions, ``int64``; every position from ``text_len`` on is the query of
    exactly one group); ``allowed[mask_start[g]:mask_start[g + 1]]`` (``uint8``, a row per query, a column per key)
    says which of the keys each query attends to. ``max_queries`` and ``max_keys``: the largest group's counts.
    """

    length: int
    text_len: int
    query_start: torch.Tensor
    queries: torch.Tensor
    key_start: torch.Tensor
    keys: torch.Tensor
    mask_start: torch.Tensor
    allowed: torch.Tensor
    max_queries: int
    max_keys: int

    def __post_init__(self) -> None:
        # The kernel reads these by index without bounds: anything inconsistent is refused here, not read past.
        problem = _groups_problem(self)
        if problem is not None:
            raise ShapeError(f"AttentionGroups: {problem}")

    @property
    def count(self) -> int:
        return self.query_start.numel() - 1

    @functools.cached_property
    def plan(self) -> _GroupPlan:
        """native.c's ``group_plan`` of these tensors (which this object keeps alive), made once."""
        return _GroupPlan(
            self.text_len,
            self.count,
            self.max_queries,
            self.max_keys,
            *(t.data_ptr() for t in (self.query_start, self.queries, self.key_start, self.keys, self.mask_start)),
            self.allowed.data_ptr(),
        )

    @property
    def pairs(self) -> int:
        """(query, key) scores computed per batch row and head: the text queries' causal ones, then each image
        query's against every text key and every key of its group."""
        queries = (self.query_start[1:] - self.query_start[:-1]).tolist()
        keys = (self.key_start[1:] - self.key_start[:-1]).tolist()
        text = self.text_len
        return text * (text + 1) // 2 + sum(q * (text + k) for q, k in zip(queries, keys, strict=True))


def _groups_problem(groups: AttentionGroups) -> str | None:
    indices = (groups.query_start, groups.queries, groups.key_start, groups.keys, groups.mask_start)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.dim() != 1 for t in (*indices, groups.allowed)):
        return "expected 1-D CPU tensors"
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in indices):
        return f"expected contiguous int64 positions and starts, got {[t.dtype for t in indices]}"
    if groups.allowed.dtype != torch.uint8 or not groups.allowed.is_contiguous():
        return f"expected a contiguous uint8 mask, got {groups.allowed.dtype}"
    starts = (groups.query_start, groups.key_start, groups.mask_start)
    if len({t.numel() for t in starts}) != 1 or groups.query_start.numel() < 2:
        return f"expected as many starts of each kind (one more than groups), got {[t.numel() for t in starts]}"
    queries, keys = groups.query_start.diff(), groups.key_start.diff()
    if (queries < 1).any() or (keys < 0).any() or bool((groups.mask_start.diff() != queries * keys).any()):
        return "expected groups of at least one query whose masks hold a row per query and a column per key"
    totals = (len(groups.queries), len(groups.keys), len(groups.allowed))
    if any(int(t[0]) != 0 or int(t[-1]) != total for t, total in zip(starts, totals, strict=True)):
        return "expected starts from 0 to the length of the positions and of the mask"
    text, length = groups.text_len, groups.length
    for name, positions in (("queries", groups.queries), ("keys", groups.keys)):
        if len(positions) and not (text <= int(positions.min()) and int(positions.max()) < length):
            return f"expected {name} among the image positions {text}..{length - 1}"
    largest = (int(queries.max()), int(keys.max()))
    if (groups.max_queries, groups.max_keys) != largest:
        return f"expected max_queries and max_keys {largest}, got {(groups.max_queries, groups.max_keys)}"
    return None


class _GroupPlan(ctypes.Structure):  # native.c's group_plan
    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("text_len", "count", "max_queries", "max_keys")],
        *[(name, ctypes.c_void_p) for name in ("query_start", "queries", "key_start", "keys", "mask_start")],
        ("allowed", ctypes.c_void_p),
    ]


def _group_plan(groups: AttentionGroups | None, n: int) -> _GroupPlan | None:
    if groups is None:
        return None
    if groups.length != n:
        raise ShapeError(f"causal_attention: groups made for {groups.length} positions, got a sequence of {n}")
    return groups.plan


def causal_attention_fits(qkv: torch.Tensor) -> bool:
    """The dtype, device and shape :func:`causal_attention` takes: a float32 CPU ``[3, B, H, n, D]`` tensor (``n >=
    1``, ``1 <= D <= MAX_DIM``); what a value traced by ``torch.compile`` shows of it."""
    return (
        qkv.is_cpu
        and qkv.dtype == torch.float32
        and qkv.dim() == 5
        and qkv.shape[0] == 3
        and qkv.shape[3] >= 1
        and 1 <= qkv.shape[4] <= MAX_DIM
    )


def causal_attention_takes(qkv: torch.Tensor) -> bool:
    """Whether :func:`causal_attention` computes attention over ``qkv``: :func:`causal_attention_fits` and its last
    dim contiguous, a plain tensor outside ``torch.compile``'s tracing."""
    return _plain_cpu_float32(qkv) and causal_attention_fits(qkv) and qkv.stride(4) == 1


def causal_attention(
    library: ctypes.CDLL,
    qkv: torch.Tensor,
    dropout: float = 0.0,
    seed: int = 0,
    groups: AttentionGroups | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)`` for ``q, k, v = qkv``
    (:func:`causal_attention_takes`, :func:`wide_kernels_run`), or with ``groups`` the same under their mask (each
    image query scoring only the text keys and its group's), without autograd: the output ``[B, H, n, D]``
    (a view of a contiguous ``[B, n, H, D]``, so that joining its heads copies nothing) and the log of each query's
    softmax sum, ``[B, H, n]``, which :func:`causal_attention_backward` takes. Dropout (``0 <= dropout < 1``) keeps
    each probability by a hash of ``seed`` (``0 <= seed < 2**32``) and its place, not by PyTorch's generator: the
    backward, given the same seed, drops the same ones."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"causal_attention: expected a dropout probability in [0, 1), got {dropout}")
    _, batch, heads, n, dim = qkv.shape
    out = torch.empty(batch, n, heads, dim).transpose(1, 2)
    lse = torch.empty(batch, heads, n)
    plan = _group_plan(groups, n)
    _run_causal(
        library.dalle_causal_attention,
        qkv.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        batch,
        heads,
        n,
        dim,
        _strides(qkv),
        _strides(out),
        dim**-0.5,
        dropout,
        seed,
        torch.get_num_threads(),
        None if plan is None else ctypes.byref(plan),
    )
    return out, lse


def causal_attention_backward(
    library: ctypes.CDLL,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    dropout: float = 0.0,
    seed: int = 0,
    groups: AttentionGroups | None = None,
) -> torch.Tensor:
    """The gradient for ``qkv`` of :func:`causal_attention`'s ``out`` (with its ``lse``, ``dropout``, ``seed`` and
    ``groups``) for ``grad``, the loss's gradient for ``out``: ``[3, B, H, n, D]``, a view of a contiguous
    ``[B, n, 3, H, D]`` (the layout of the QKV projection's output, whose gradient it then is without a copy)."""
    _, batch, heads, n, dim = qkv.shape
    if grad.stride() != out.stride():
        grad = torch.empty_like(out).copy_(grad)  # empty_like keeps out's strides
    grad_qkv = torch.empty(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
    plan = _group_plan(groups, n)
    _run_causal(
        library.dalle_causal_attention_backward,
        qkv.data_ptr(),
        out.data_ptr(),
        grad.data_ptr(),
        lse.data_ptr(),
        grad_qkv.data_ptr(),
        batch,
        heads,
        n,
        dim,
        _strides(qkv),
        _strides(out),
        _strides(grad_qkv),
        dim**-0.5,
        dropout,
        seed,
        torch.get_num_threads(),
        None if plan is None else ctypes.byref(plan),
    )
    return grad_qkv


def _strides(t: torch.Tensor) -> ctypes.Array[ctypes.c_int64]:
    """All but the last (contiguous) dim's strides, as the C array the attention kernels take."""
    strides = t.stride()[:-1]
    return (ctypes.c_int64 * len(strides))(*strides)


def _run_causal(function: Callable[..., int], *arguments: object) -> None:
    status = function(*arguments)
    if status == 1:
        raise MemoryError("the native causal attention could not allocate its scratch memory")
    if status:
        raise RuntimeError("the native causal attention does not run on this CPU (see wide_kernels_run)")


def _shape_problem(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> str | None:
    tensors = (q, keys, values)
    if not (_plain_cpu_float32(q) and _plain_cpu_float32(keys) and _plain_cpu_float32(values)):
        found = [f"{type(t).__name__} {t.dtype} on {t.device}" for t in tensors]
        return f"expected float32 CPU tensors, got {', '.join(found)}"
    if q.dim() != 4 or q.shape[2] != 1 or keys.dim() != 4 or keys.shape != values.shape:
        shapes = ", ".join(str(list(t.shape)) for t in tensors)
        return f"expected q [B, H, 1, D] and keys, values [B, H, n, D], got {shapes}"
    if keys.shape[:2] != q.shape[:2] or keys.shape[3] != q.shape[3] or keys.shape[2] < 1:
        return f"expected keys [B, H, n >= 1, D] for q {list(q.shape)}, got {list(keys.shape)}"
    if not 1 <= q.shape[3] <= MAX_DIM:
        return f"expected dim_head in [1, {MAX_DIM}], got {q.shape[3]}"
    if q.stride(3) != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        return "expected tensors whose last dim is contiguous"
    return None

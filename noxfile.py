"""Test sessions. `uvx nox` runs them all; `uvx nox -s tests-dalle-vae` runs one.

Each package is tested in a virtualenv holding only that package and its declared dependencies (`uv sync --package`),
which proves the package works alone; `integration` then tests them all together through the `dalle` CLI.
"""

from __future__ import annotations

import os

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


@nox.session
def integration(session: nox.Session) -> None:
    """All packages together: the CLI and a tiny end-to-end run of the demo."""
    sync(session, "--all-packages", "--group", "test")
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

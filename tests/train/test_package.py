"""featsim.train's module graph: no import circle hidden by function-level imports, no
private names borrowed across modules, and TrainConfig importable without JAX."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "featsim" / "train"


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout.strip()


@pytest.mark.parametrize("module", ["linear_probe", "loop", "pretraining", "predict"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    assert _fresh(f"import featsim.train.{module}; print('ok')") == "ok"


def test_config_imports_without_jax():
    code = ("import sys; from featsim.train.config import TrainConfig; TrainConfig('x'); "
            "print(sorted(m for m in ('jax', 'numpy', 'scipy') if m in sys.modules))")
    assert _fresh(code) == "[]"


def test_no_function_level_featsim_imports():
    found = []
    for path in sorted(TRAIN.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "featsim"):
                    found.append(f"{path.name}:{node.lineno} {fn.name}: from {node.module}")
                elif isinstance(node, ast.Import) and any(
                        a.name.startswith("featsim") for a in node.names):
                    found.append(f"{path.name}:{node.lineno} {fn.name}: import")
    assert not found, found


def test_no_private_names_imported_across_modules():
    """``from featsim... import _name`` nowhere in featsim/train and its tests (e.g. the
    initial variables are ``heads.initial_variables``, public), nor ``x_module._name`` in
    featsim/train."""
    found = []
    for path in [*TRAIN.glob("*.py"), *(ROOT / "tests" / "train").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featsim"):
                private = [a.name for a in node.names
                           if a.name.startswith("_") and a.name != "_guard"]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {private}")
            elif (path.parent == TRAIN and isinstance(node, ast.Attribute)
                  and node.attr.startswith("_")
                  and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                  and node.value.id.endswith("_module")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not found, found

"""The layering the README describes: imports run one way, and the Hub remote-code files import nothing else."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_clara", "trainers", "data_synthesis", "evaluation", "clara_cli")
# configuration -> processing / modeling -> trainers, data_synthesis -> evaluation -> clara_cli
ALLOWED = {
    "modeling_clara": set(),
    "trainers": {"modeling_clara"},
    "data_synthesis": {"modeling_clara"},
    "evaluation": {"modeling_clara", "trainers"},
    "clara_cli": {"modeling_clara", "trainers", "data_synthesis", "evaluation"},
}
REMOTE_CODE = ("configuration_clara.py", "processing_clara.py", "modeling_clara.py", "base_models.py", "memory_bank.py", "release.py")
# tqdm and safetensors: transformers dependencies; faiss: imported only to build or use a bank's optional index
REMOTE_CODE_IMPORTS = {"torch", "transformers", "peft", "jinja2", "huggingface_hub", "tqdm", "safetensors", "faiss"}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute module names a file imports (relative imports are within its own package), with the level."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules.append((node.module or "", node.level))
    return modules


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        for module, level in imported_modules(path):
            top = module.split(".")[0]
            if level == 0 and top in PACKAGES and top != package:
                assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize("filename", REMOTE_CODE)
def test_remote_code_imports_only_its_dependencies_and_its_siblings(filename):
    for module, level in imported_modules(ROOT / "modeling_clara" / filename):
        if level:
            assert module.split(".")[0] in {name.removesuffix(".py") for name in REMOTE_CODE}, module
        else:
            top = module.split(".")[0]
            assert top in REMOTE_CODE_IMPORTS or top in sys.stdlib_module_names, f"{filename} imports {module}"

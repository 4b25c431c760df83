"""The package's shape: no module imports another that imports it back, at any depth or inside any function."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "src" / "lorastudy"


def imports_of(path) -> set[str]:
    """The lorastudy modules a module imports, at its top or inside its functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorastudy"):
            found.add(node.module)
            if node.module == "lorastudy":  # from lorastudy import paths
                found |= {f"lorastudy.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lorastudy.")}
    return found


def test_no_import_cycle():
    modules = {f"lorastudy.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: imports_of(path) & modules.keys() for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", "import cycle: " + " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    leaves = {"lorastudy.quiet", "lorastudy.internals", "lorastudy.backbones"}
    assert "lorastudy.presets" in graph and not graph["lorastudy.presets"] - leaves, "presets is a leaf"
    assert not graph["lorastudy.internals"], "internals is a leaf"
    assert not graph["lorastudy.backbones"], "backbones is a leaf"


def test_private_api_is_used_in_internals_alone():
    """Keras's, KerasHub's and JAX's private names appear in lorastudy.internals and nowhere else in the package."""
    names = "flatten_layers|lora_enabled_layers|initialize_with_initializer|use_fused_attention_op|compute_attention_mask|backends"
    private = re.compile(rf"\.src\.|\._({names})\b")
    users = [p.name for p in PACKAGE.glob("*.py") if p.stem != "internals" and private.search(p.read_text())]
    assert not users, f"private API used outside lorastudy.internals: {users}"


CODE = [p for folder in ("src/lorastudy", "benchmarks", "workflow/scripts") for p in sorted((REPO / folder).glob("*.py"))]


def test_no_module_outside_the_tests_is_longer_than_a_reader_can_hold():
    long = {str(p.relative_to(REPO)): n for p in CODE if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_nothing_outside_the_tests_edits_sys_path():
    """Benchmarks run as `python -m benchmarks.<driver>` and import the package and each other normally."""
    editing = [str(p.relative_to(REPO)) for p in CODE if "sys.path" in p.read_text()]
    assert not editing, f"sys.path edited in {editing}"


def test_benchmarks_that_use_keras_choose_jax_before_keras_loads():
    """Keras reads its backend once, when first imported: `import keras_hub` before lorastudy would measure TensorFlow."""
    import ast

    def imported(nodes) -> set[str]:
        """The top-level packages the import statements among `nodes` name."""
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    late = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        if imported(ast.walk(tree)) & {"keras", "keras_hub"} and "lorastudy" not in imported(tree.body):
            late.append(path.name)
    assert not late, f"benchmarks that import Keras without importing lorastudy (which sets KERAS_BACKEND=jax) at the top: {late}"

"""The layout shows the architecture: the method in three files that import only each other, the other
layers in named sub-packages above it, no import cycles, and modules and functions short enough to read.

    minisnr/model.py, rf.py, lora.py   the method                 import nothing else from the project
    minisnr/io/                        files, devices, the CLI    may import the method
    minisnr/train/                     the run harness            may import the method and io/
    minisnr/tools/                     bench, pictures            may import the method, io/ and train/
    minisnr/eval/                      measurement                may import all of the above
    train.py, finetune.py, sample.py   the scripts                import the package, never each other

Imports inside functions count too: a lazy import that closes a cycle is still a cycle.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "minisnr"
METHOD = {"minisnr.model", "minisnr.rf", "minisnr.lora"}
# which project layers each layer may import (a layer may always import itself)
ALLOWED = {"method": {"method"}, "io": {"method"}, "train": {"method", "io"},
           "eval": {"method", "io", "train", "tools"}, "tools": {"method", "io", "train"}}


def module_name(path):
    """minisnr/io/cli.py -> minisnr.io.cli; minisnr/io/__init__.py -> minisnr.io; train.py -> train."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name):
    """The layer a module belongs to: method, io, train, eval, tools, or package (minisnr/__init__)."""
    if name in METHOD:
        return "method"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and name.startswith("minisnr.") else "package"


def project_imports(path):
    """The project modules that `path` imports, anywhere in the file, resolved to dotted names."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "minisnr"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "minisnr":
                continue
            for a in node.names:  # `from minisnr.io import cli` imports the module minisnr.io.cli
                out.add(f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(
                    ".py").exists() else base)
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def find_cycle(graph):
    """One import cycle as a list of module names (first == last), or None. Depth-first search with colours."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_scan_sees_the_layers():
    """The graph covers every layer and real edges (guards against a scan that finds nothing and passes)."""
    assert {layer(n) for n in MODULES} >= {"method", "io", "train", "eval", "tools"}
    assert "minisnr.model" in GRAPH["minisnr.io.checkpoint"] and "minisnr.rf" in GRAPH["minisnr.train.run"]


def test_no_import_cycles():
    """No module imports itself through others (minisnr/ and the three scripts)."""
    scripts = {p.stem: project_imports(p) for p in (REPO / n for n in ("train.py", "finetune.py", "sample.py"))}
    cycle = find_cycle({**GRAPH, **scripts})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_lazy_cycle():
    """The checker itself: a two-module cycle and a three-module cycle are found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_layer_imports_only_the_layers_below_it(name):
    """The method imports only itself; io/ only the method; train/ the method and io/; and so on (ALLOWED)."""
    own = layer(name)
    if own == "package":
        return
    bad = sorted(m for m in GRAPH[name] if layer(m) not in ALLOWED[own] | {own})
    assert not bad, f"{name} ({own}) imports {bad}"


@pytest.mark.parametrize("script", ["train.py", "finetune.py", "sample.py"])
def test_the_scripts_stand_on_the_method_io_and_train_layers_only(script):
    """The scripts are the lesson: they import the method, io/ and train/, never the evaluation or the tools."""
    bad = sorted(m for m in project_imports(REPO / script) if layer(m) in ("eval", "tools"))
    assert not bad, f"{script} imports {bad}"


def test_the_method_files_name_no_flags_in_errors():
    """Error messages in the method files name arguments, not command-line flags: those belong to the scripts."""
    for name in sorted(METHOD):
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.unparse(node.exc)
                assert "--" not in text, f"{name}: {text}"


def test_no_line_over_120_characters():
    """Readable on one screen without wrapping: no line of minisnr/, the scripts or the tests over 120 characters.
    (Sizes of modules and functions are reported in the README's code map, not tested: readability decides.)"""
    files = list(PACKAGE.rglob("*.py")) + [REPO / f for f in ("train.py", "finetune.py", "sample.py")] \
        + list((REPO / "tests").glob("*.py"))
    long = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {long[:10]}"


def test_no_asset_holds_a_path_of_this_machine():
    """Committed results, reports and picture metadata name files relative to the repository or by role: an
    absolute path would tell every reader about the machine that made the file, and mean nothing on theirs."""
    import re
    assets = REPO / "minisnr" / "assets"
    files = [p for p in assets.rglob("*") if p.is_file()]
    assert len(files) >= 5, "the scan should see the assets"
    absolute = re.compile(rb'"(/|[A-Za-z]:\\\\)(root|home|tmp|work|Users|mnt|srv|var|opt)[/\\\\]')
    found = [str(p.relative_to(REPO)) for p in files if absolute.search(p.read_bytes())]
    assert not found, f"absolute paths in {found}"

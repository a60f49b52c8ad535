import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    return {m.group(1).lower(): m.group(2) for m in (re.match(r"\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s]+)", l) for l in lines) if m}


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    ours = _pins(deps)
    conda = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert ours == conda
    assert ours["torch"] == "2.14.1" and ours["torchvision"] == "0.29.1"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.MULTILINE)


# -- the line between the core and the book ---------------------------------------------------------------------------

BOOK_ONLY = ("pandas", "matplotlib", "seaborn", "ipywidgets")


def _core_modules() -> list[str]:
    """Every module of the core: the package without ``unitlib.book`` (and without ``__main__``, which runs the CLI)."""
    names = []
    for path in sorted((ROOT / "unitlib").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1:2] == ("book",) or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported(module: str, tree: ast.AST) -> set[str]:
    """The absolute names a module's import statements reach (relative imports resolved), each ``from X import y``
    also as ``X.y`` (``y`` may be a submodule)."""
    package = module if (ROOT / Path(*module.split("."))).is_dir() else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found |= {origin} | {f"{origin}.{alias.name}" for alias in node.names}
    return found


def test_the_core_never_imports_the_book():
    modules = _core_modules()
    assert {"unitlib", "unitlib.cli", "unitlib.data", "unitlib.experiment", "unitlib.defenses.unit"} <= set(modules)
    offenders = {}
    for module in modules:
        path = ROOT / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        reached = _imported(module, tree)
        # importlib.import_module("unitlib.book...") is an import too
        reached |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and n.value.startswith("unitlib.book")}
        bad = sorted(name for name in reached if name == "unitlib.book" or name.startswith("unitlib.book."))
        bad += sorted(name for name in reached if name.split(".")[0] in BOOK_ONLY)
        if bad:
            offenders[module] = bad
    assert not offenders, f"core modules that import the book or its packages: {offenders}"


def test_every_core_module_imports_without_the_book_packages():
    """A core install has no pandas, matplotlib, seaborn or ipywidgets: each core module imports without them."""
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BOOK_ONLY!r}:
                    raise ImportError(f"{{name}} is not installed (a core install)")
                return None

        sys.meta_path.insert(0, NotInstalled())
        failed = {{}}
        for module in {_core_modules()!r}:
            try:
                importlib.import_module(module)
            except Exception as err:
                failed[module] = f"{{type(err).__name__}}: {{err}}"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BOOK_ONLY!r} or m.startswith("unitlib.book"))
        assert not failed, failed
        assert not leaked, leaked
        from unitlib.cli import main
        assert main(["list"]) == 0
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_the_core_dependencies_leave_out_the_books_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[=<>!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    book = {re.split(r"[=<>!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["book"]}
    assert not core & {"pandas", "matplotlib", "seaborn", "ipywidgets", "jupyter-book"}
    assert {"pandas", "matplotlib", "seaborn", "ipywidgets"} <= book
    assert "unitlib[book]" in project["optional-dependencies"]["test"]  # the tests run the book


def test_benchmarks_use_only_public_names():
    """A benchmark that reaches into a private name breaks silently when the library changes: public names only."""
    private = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        ours = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "unitlib":
                ours |= {alias.asname or alias.name for alias in node.names}
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
                private += [f"{path.name}: {node.module}" for part in node.module.split(".") if part.startswith("_")]
            elif isinstance(node, ast.Import):
                ours |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "unitlib"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in ours:
                    private.append(f"{path.name}: {ast.unparse(node)}")
    assert not private, private

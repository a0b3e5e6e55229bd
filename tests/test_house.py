"""The house rules, checked on the source: short functions, commands apart from the library."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "simclrv2_jax"
COMMANDS = {"main", "run_all", "evaluate", "convert", "export", "explore", "sweep", "count_parameters"}
MAX_FUNCTION_LINES = 150


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def imported(tree):
    """``(module, names)`` of every ``from simclrv2_jax... import ...`` and ``import simclrv2_jax...``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simclrv2_jax"):
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("simclrv2_jax"):
                    yield alias.name, []


def test_no_function_is_longer_than_150_lines():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_commands_sit_at_the_top_and_nothing_imports_them():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "cli"}
    assert top == COMMANDS
    for path, tree in modules():
        for module, names in imported(tree):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else None
            named = {n for n in names if module == "simclrv2_jax"}
            assert target not in COMMANDS and not (named & COMMANDS), (
                f"{path.relative_to(PACKAGE)} imports {module}"
            )


def test_no_module_imports_another_modules_private_names():
    for path, tree in modules():
        for module, names in imported(tree):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {module}"


def test_the_library_does_not_import_the_command_plumbing():
    """cli.py is what the commands share; the library raises exceptions and never exits."""
    for path, tree in modules():
        if path.parent == PACKAGE:
            continue
        for module, _ in imported(tree):
            assert module != "simclrv2_jax.cli", f"{path.relative_to(PACKAGE)} imports simclrv2_jax.cli"

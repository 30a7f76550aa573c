"""The package's layout: no import cycle, a CLI and a submit path without torch, one contract,
imports at the top of each module (a function-level import says why)."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "simflow"
SCRIPTS = REPO / "workflow" / "scripts"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def simflow_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports, anywhere in the file: at module level and
    inside functions alike (a function-level import closes a cycle just as surely when it runs).
    Imports under ``if TYPE_CHECKING:`` are left out: they never run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                # `from simflow import stages`: the name is itself a module
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != me}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): simflow_imports(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_launcher_knows_nothing_of_the_stages():
    reached = import_graph()["simflow.launch"]
    assert not reached & {"simflow.stages", "simflow.runner", "simflow.study"}, reached


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_cli_lists_the_stages_without_torch():
    from simflow.contracts import STAGES

    loaded = _modules_after("import simflow.cli as c\nhelp = c.build_parser().format_help()\n"
                            f"assert all(s in help for s in {list(STAGES)!r}), help")
    assert "torch" not in loaded and "mlflow" not in loaded


def test_submitting_a_stage_imports_neither_torch_nor_mlflow(tmp_path):
    """The runner's whole submit path (config, snapshot, launcher), with launch() itself
    replaced by a stand-in that checks the call it is handed."""
    loaded = _modules_after(
        "import os, simflow.launch as L, simflow.runner as R\n"
        "for var in ('RANK', 'WORLD_SIZE', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS'):\n"
        "    os.environ.pop(var, None)\n"
        "def fake_launch(job, cfg, job_name):\n"
        "    assert job.target == 'simflow.runner:run_stage' and job.args[2] == ['launcher.backend=local']\n"
        "    return 'submitted'\n"
        "L.launch = fake_launch\n"
        f"assert R.run_stage('train', None, ['launcher.backend=slurm', 'run_dir={tmp_path}']) == 'submitted'\n"
        f"assert os.path.isfile('{tmp_path}/jobs/train.yaml')")
    assert "torch" not in loaded and "mlflow" not in loaded


def test_every_stage_of_the_contract_has_a_function_and_a_help_text():
    from simflow.cli import STAGE_HELP
    from simflow.contracts import STAGE_FILES, STAGES
    from simflow.stages import STAGE_FUNCTIONS

    assert tuple(STAGE_FUNCTIONS) == STAGES == tuple(STAGE_HELP) == tuple(STAGE_FILES)


def unexplained_local_imports(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every import inside a function that has no comment on its line or the
    line directly above. One comment covers a group of adjacent imports: an import directly
    below an explained import of the same group is explained too."""
    tree = ast.parse(source, filename=filename)
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                 if tok.type == tokenize.COMMENT}
    local: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                local.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                            ast.Lambda)))

    visit(tree, False)
    explained: set[int] = set()  # last lines of the explained imports
    missing = []
    for node in sorted(local, key=lambda n: n.lineno):
        if (commented & set(range(node.lineno - 1, node.end_lineno + 1))
                or node.lineno - 1 in explained):
            explained.add(node.end_lineno)
        else:
            missing.append(f"{filename}:{node.lineno}")
    return missing


def test_every_function_level_import_says_why_it_is_not_at_the_top():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(SCRIPTS.glob("*.py"))
    missing = [m for path in files
               for m in unexplained_local_imports(path.read_text(), str(path.relative_to(REPO)))]
    assert not missing, ("imports inside a function without a comment saying why (move them to the "
                         "module's top, or say why start-up needs them there): " + ", ".join(missing))


def test_the_local_import_check_finds_an_unexplained_import():
    source = ('''"""A docstring that shows
    from simflow import io
is no import."""
import os


def explained():
    # lazy: torch_fidelity costs ~2 CPU-s
    import torch_fidelity
    from torch_fidelity import metric_fid


def inline():
    import scipy  # lazy: only this function


def unexplained():
    x = 1
    import numpy as np
    return np, x


class Holder:
    def method(self):
        # a comment, then a blank line, does not reach the import

        from simflow import io
''')
    assert unexplained_local_imports(source, "m.py") == ["m.py:19", "m.py:27"]

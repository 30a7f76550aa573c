"""Execute an analysis notebook on a study's results with papermill, and export it to HTML.

Rule ``analysis_notebook`` (``workflow/rules/notebooks.smk``) runs this file as its ``script:``;
it also runs by hand (``-p NAME VALUE`` values are read as YAML, ``None`` is None)::

    python workflow/scripts/run_notebook.py analysis/variants.ipynb out/variants.ipynb \\
        --html out/variants.html -p results_dir results -p study demo

The notebook runs on the ``python3`` kernel. ipykernel provides that kernel for the interpreter
running this script even where no kernelspec is registered (jupyter_client falls back to
ipykernel's built-in spec and starts it with ``sys.executable``), so nothing has to be installed
with ``ipykernel install``. The executed notebook and the HTML are written atomically; when a
cell fails, the partly executed notebook is kept as ``<output stem>.failed.ipynb`` next to the
output (Snakemake deletes a failed job's outputs, not that file) and the error names it.
"""

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KERNEL_NAME", "export_html", "main", "run_notebook"]

#: The kernel the notebooks run on: ipykernel's kernel for the current interpreter.
KERNEL_NAME = "python3"

# No `from __future__` import: Snakemake's script: directive puts its preamble before the file's
# first line, where such an import would be a syntax error.

# The repository root (this file is workflow/scripts/run_notebook.py; under Snakemake __file__
# is set to it too): put on the kernel's
# PYTHONPATH so that `import simflow` works from a checkout that is not pip-installed.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _with_repo_on_pythonpath() -> None:
    """The checkout on the kernel's PYTHONPATH, and on this script's own sys.path (it writes its
    files with simflow.io)."""
    if not (_REPO_ROOT / "simflow" / "__init__.py").is_file():
        return
    if str(_REPO_ROOT) not in sys.path:
        sys.path.append(str(_REPO_ROOT))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(_REPO_ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *parts])


def export_html(executed: Path, html: Path) -> Path:
    """Render the executed notebook ``executed`` as a standalone HTML page ``html``."""
    # lazy: nbconvert costs ~0.7 CPU-s; the tests load this file for its helpers without it
    import nbformat
    from nbconvert import HTMLExporter
    # lazy: simflow is importable only once _with_repo_on_pythonpath() has run (a plain checkout)
    from simflow.io import write_text

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    return write_text(html, body)


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    html: str | Path | None = None,
    parameters: Mapping[str, Any] | None = None,
    *,
    kernel_name: str = KERNEL_NAME,
    cwd: str | Path | None = None,
    log_output: bool = False,
) -> Path:
    """Execute ``notebook`` with papermill into ``output`` (and ``html`` if given).

    Args:
        notebook: the source notebook (its cell tagged ``parameters`` gets overridden).
        output: the executed notebook to write (``.ipynb``).
        html: the HTML export of the executed notebook to write, or None.
        parameters: papermill parameters, e.g. ``{"results_dir": "results", "study": "demo"}``.
        kernel_name: the Jupyter kernel; ``python3`` is this interpreter's ipykernel.
        cwd: the kernel's working directory (relative paths in the parameters resolve against
            it); None: the current directory.
        log_output: also log the cells' outputs (logger ``papermill``), e.g. into a rule's log.

    Returns:
        The path of the executed notebook.

    Raises:
        FileNotFoundError: ``notebook`` does not exist.
        RuntimeError: a cell raised; the message names the kept ``.failed.ipynb``.
    """
    # lazy: papermill costs ~0.7 CPU-s; the tests load this file for its helpers without it
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook, output = Path(notebook), Path(output)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    if output.suffix != ".ipynb":
        raise ValueError(f"output must be an .ipynb file, got {output}")
    _with_repo_on_pythonpath()
    # lazy: simflow is importable only once _with_repo_on_pythonpath() has run (a plain checkout)
    from simflow.io import atomic_write

    failed = output.with_name(f"{output.stem}.failed.ipynb")

    def execute(tmp: Path) -> None:
        try:
            papermill.execute_notebook(
                str(notebook),
                str(tmp),
                parameters=dict(parameters or {}),
                kernel_name=kernel_name,
                cwd=str(cwd if cwd is not None else Path.cwd()),
                progress_bar=False,
                log_output=log_output,
            )
        except PapermillExecutionError as err:
            if tmp.exists():  # kept for inspection (so atomic_write finds no temp file to remove)
                os.replace(tmp, failed)
            raise RuntimeError(
                f"{notebook} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); the partly "
                f"executed notebook is {failed}"
            ) from err

    # a kernel that dies leaves no half-written notebook behind: atomic_write removes the temp file
    atomic_write(output, execute)
    failed.unlink(missing_ok=True)
    if html is not None:
        export_html(output, Path(html))
    return output


def _parse_value(text: str) -> Any:
    if text == "None":
        return None
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run_notebook.py NOTEBOOK OUTPUT [--html HTML] [-p NAME VALUE]...``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path, help="the executed notebook (.ipynb)")
    parser.add_argument("--html", type=Path, default=None, help="also export it to this HTML file")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="a papermill parameter (VALUE read as YAML)")
    parser.add_argument("-k", "--kernel", default=KERNEL_NAME, help="Jupyter kernel name")
    args = parser.parse_args(argv)
    params = {name: _parse_value(value) for name, value in args.parameter}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_notebook(args.notebook, args.output, args.html, params, kernel_name=args.kernel,
                 log_output=True)
    return 0


def _snakemake_main(sm: Any) -> None:
    """Entry point of the Snakemake rule: inputs, outputs and params from the ``snakemake`` object."""
    log_path = Path(sm.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(message)s", force=True)
        run_notebook(sm.input.notebook, sm.output.ipynb, sm.output.html, dict(sm.params.parameters),
                     log_output=True)


if "snakemake" in globals():
    _snakemake_main(snakemake)  # noqa: F821 (injected by Snakemake's script: directive)
elif __name__ == "__main__":
    sys.exit(main())

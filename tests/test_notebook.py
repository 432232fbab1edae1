"""The analysis notebook runs from top to bottom against the committed CSVs."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_executes_without_errors() -> None:
    nbformat = pytest.importorskip(
        "nbformat", reason="the dev extra (nbformat, nbclient) is not installed"
    )
    nbclient = pytest.importorskip(
        "nbclient", reason="the dev extra (nbformat, nbclient) is not installed"
    )
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    figures = [
        o
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert figures, "the notebook drew no plots: are the CSVs in benchmarks/results?"

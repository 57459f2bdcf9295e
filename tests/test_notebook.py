"""The quickstart notebook runs (short settings), so it cannot rot."""

from __future__ import annotations

import os

import pytest

from tests.conftest import DATA_DIR, REPO, data_file


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data_file("lung_pet_ct_dx/A0002_8mm_B40f.nii.gz")
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("CTGRIDIT_DATA", str(DATA_DIR))
    monkeypatch.setenv("QUICKSTART_SLICES", "12")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = tmp_path / "quickstart_output"
    assert (out / "real.png").is_file() and (out / "synthetic.nii.gz").is_file() and (out / "grids").is_dir()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert errors == []

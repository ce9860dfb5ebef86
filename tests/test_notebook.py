"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a kernel on this interpreter) in a temp folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "movierec-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter (the venv's), so the notebook imports the movierec under test."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return KERNEL


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None for cell in nb.cells if cell.cell_type == "code"
    )


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "work"
    workdir.mkdir()
    # iopub_timeout: how long nbclient waits for a cell's last outputs once it has finished; its default of
    # 4 s dropped the output of a cell on a loaded 2-core machine (CI with other jobs running)
    client = NotebookClient(
        nb, timeout=300, iopub_timeout=60, kernel_name=kernel_name, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(
        o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "") for o in outputs
    )
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1, "the training-curve plot"
    # every step left its trace: the run in MLflow, its metric history, evaluation, recommendations
    assert "MLflow run" in text and "best epoch" in text
    assert "model.num_parameters" in text and "val_full/ndcg_at_10" in text
    assert "ndcg@10" in text and "Synthetic movie" in text and "unknown movieIds ignored: [999999]" in text
    assert (workdir / "notebook-quickstart" / "mlflow.db").is_file()
    assert (workdir / "notebook-quickstart" / "run" / "best.ckpt").is_file()

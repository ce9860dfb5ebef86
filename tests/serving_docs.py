"""Helpers for the tests that run the commands of docs/serving.md."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def documented_commands(prefix: str) -> list[str]:
    """Lines of the ```bash blocks of docs/serving.md that start with `prefix`."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith(prefix)]


def quickstart_layout(trained_run, root: Path) -> Path:
    """`runs/quickstart/{run,mlflow.db}` under `root`, pointing at the tiny trained run, with `movierec` v1."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    (root / "runs" / "quickstart").mkdir(parents=True)
    (root / "runs" / "quickstart" / "run").symlink_to(trained_run.run_dir)
    (root / "runs" / "quickstart" / "mlflow.db").symlink_to(trained_run.tracking_uri.removeprefix("sqlite:///"))
    client = MlflowClient(trained_run.tracking_uri)
    try:
        client.get_registered_model("movierec")
    except MlflowException:
        client.create_registered_model("movierec")
        client.create_model_version("movierec", f"runs:/{trained_run.run_id}/checkpoints", run_id=trained_run.run_id)
    assert client.get_model_version("movierec", "1").run_id == trained_run.run_id
    return root

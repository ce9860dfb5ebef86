"""The README's main job on the embedded synthetic dataset: prepare -> train -> evaluate -> recommend.

Everything lands under one folder (data, run directory, MLflow SQLite store), so it runs anywhere with
no download and no server. Real results need a MovieLens release (see the README).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from movierec.data.layout import META_FILE
from movierec.training.config import load_config

CONFIG_NAME = "synthetic.yaml"


def default_config_path() -> Path:
    """configs/synthetic.yaml of the source checkout, or of the working directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / "configs" / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return Path("configs") / CONFIG_NAME


def quickstart(out: str | Path, config_path: str | Path | None = None, epochs: int | None = None) -> dict:
    from movierec.data.prepare import prepare
    from movierec.data.summary import print_summary
    from movierec.evaluation.metrics import print_metrics
    from movierec.training.run import train

    console = Console()
    out = Path(out)
    data_dir = out / "data" / "synthetic"
    # the config first, checked like any run's (--epochs 0 is one line now, not after the data is prepared)
    length = {"train.epochs": epochs} if epochs is not None else {}
    config = load_config(config_path or default_config_path(), flags={
        "data.path": str(data_dir), "run_dir": str(out / "run"),
        "tracking.uri": f"sqlite:///{(out / 'mlflow.db').resolve()}", **length})  # fmt: skip
    console.rule("1. prepare the synthetic dataset")
    if not (data_dir / META_FILE).is_file():
        prepare("synthetic", out=out / "data")
    print_summary(data_dir)

    console.rule("2. train SSE-PT (MLflow store: " + str(out / "mlflow.db") + ")")
    result = train(config, console=console)

    console.rule("3. evaluate the best checkpoint on the held-out last items")
    test = {k.removeprefix("test_"): v for k, v in result.test_metrics.items()}
    print_metrics(f"test metrics (best epoch {result.best_epoch} of {result.epochs_run})", test)

    console.rule("4. recommend: the next movies for a user of the data, with titles")
    from rich.table import Table

    from movierec.serving.loader import load_model

    recommender = load_model(result.run_dir)
    user_id = int(recommender.known_user_ids[0])
    history = recommender.history_of(user_id)
    console.print(
        f"user {user_id} watched {len(history)} movies, the last three: "
        + "; ".join(str(recommender.item(m).title) for m in history[-3:])
    )
    table = Table(title=f"top 5 for user {user_id}")
    for column in ("rank", "movieId", "title", "score"):
        table.add_column(column)
    for rec in recommender.recommend_user(user_id, k=5):
        table.add_row(str(rec.rank), str(rec.movie_id), str(rec.title), f"{rec.score:.3f}")
    console.print(table)
    console.print(f"MLflow run {result.run_id}: `mlflow ui --backend-store-uri {config.tracking.uri}`")
    console.print(f"More: `movierec recommend {result.run_dir} --user {user_id}`")
    return {"run_id": result.run_id, "run_dir": result.run_dir, "test": test, "user_id": user_id}

"""The model every training run logs to MLflow: an ``mlflow.pyfunc`` model, logged from code (this file).

MLflow's "models from code": this file is the model's code, copied beside three artifacts, none of them a
pickle: the weights as a state dict of plain tensors (``weights.pt``, read back with ``weights_only``, so a
file that would run code is refused), the model config (``model_config.json``) and the catalogue
(``items.parquet``: movieId, title, year, genres in the model's item order). Where it is loaded, neither the
dataset folder nor the run folder is needed, and nothing is unpickled: MLflow runs this file (with the
``movierec`` installed there), which builds the model from the config and loads the weights.

``predict`` takes a DataFrame with a column ``history`` (movieIds, oldest first) and an optional column ``k``
(10 when there is no such column; MLflow's schema check wants a value in every row of a column it is given),
and returns per row ``movieIds``, ``titles``, ``scores`` and ``unknownMovieIds``: a new person's top k, exactly
as ``movierec recommend --history`` computes them (SSE-PT's mean user vector, the history's movies left out,
unknown movieIds ignored). The rows of a call are scored in one batch (so with
several rows a score may differ from scoring alone in its last bits, as with the server's micro-batching).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema

from movierec import __version__
from movierec.data.layout import read_items
from movierec.models.base import ModelConfig, SequentialModel, build_model
from movierec.models.checkpoint import check_finite, torch_load_safely
from movierec.serving.recommender import Recommender, RecommendError

WEIGHTS, CONFIG, ITEMS = "weights", "config", "items"  # the artifacts' keys
FILES = {WEIGHTS: "weights.pt", CONFIG: "model_config.json", ITEMS: "items.parquet"}
DEFAULT_K = 10
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array(DataType.long), "history"), ColSpec(DataType.long, "k", required=False)]),
    outputs=Schema(
        [
            ColSpec(Array(DataType.long), "movieIds"),
            ColSpec(Array(DataType.string), "titles"),
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(Array(DataType.long), "unknownMovieIds"),
        ]
    ),
)


class SequentialRecommender(mlflow.pyfunc.PythonModel):
    """Top-k movieIds, titles and scores of a trained movierec model for histories of movieIds."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        files = context.artifacts
        config = ModelConfig(**json.loads(Path(files[CONFIG]).read_text()))
        weights = torch_load_safely(Path(files[WEIGHTS]), "state dict of tensors")
        check_finite(weights, files[WEIGHTS])
        model = build_model(config)
        model.load_state_dict(weights)
        self.recommender = Recommender.for_new_people(model.eval(), pq.read_table(files[ITEMS]), source="mlflow")

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """One row of results per history; a history the model cannot answer (empty, or no movieId it knows),
        or a k out of range, is a request error naming the row."""
        ks = [int(k) for k in model_input["k"]] if "k" in model_input.columns else [DEFAULT_K] * len(model_input)
        histories = [[int(m) for m in history] for history in model_input["history"]]
        try:
            for k in set(ks):
                self.recommender.check_k(k)
            results = self.recommender.recommend_histories(histories, max(ks, default=1))
        except RecommendError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        rows = [result.recommendations[:k] for result, k in zip(results, ks, strict=True)]
        return pd.DataFrame(
            {
                "movieIds": [[r.movie_id for r in recs] for recs in rows],
                "titles": [[r.title for r in recs] for recs in rows],
                "scores": [[r.score for r in recs] for recs in rows],
                "unknownMovieIds": [result.unknown_movie_ids for result in results],
            }
        )


def requirements() -> list[str]:
    """What the model needs where it is loaded (movierec itself included: this file imports it)."""
    versions = {"torch": torch.__version__.split("+")[0], "numpy": np.__version__, "pandas": pd.__version__,
                "pyarrow": pa.__version__, "mlflow": mlflow.__version__, "movierec": __version__}  # fmt: skip
    return [f"{name}=={version}" for name, version in versions.items()]


def log_pyfunc_model(model: SequentialModel, dataset: str | Path, name: str = "model") -> ModelInfo:
    """Log `model` to the active MLflow run as this file's pyfunc model, with the items of its `dataset`."""
    items = read_items(dataset).sort_by("item")
    items = items.select([c for c in ("movie_id", "title", "year", "genres") if c in items.column_names])
    example = pd.DataFrame({"history": [items["movie_id"].slice(0, 3).to_pylist()], "k": [min(DEFAULT_K, len(items))]})
    with tempfile.TemporaryDirectory(prefix="movierec-pyfunc-") as tmp:
        paths = {key: str(Path(tmp) / file) for key, file in FILES.items()}
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, paths[WEIGHTS])
        Path(paths[CONFIG]).write_text(json.dumps(model.config.to_dict(), indent=1))
        pq.write_table(items, paths[ITEMS])
        with _quiet("mlflow.pyfunc"):  # its line about checking the input example would land in training's output
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=__file__,
                artifacts=paths,
                signature=SIGNATURE,
                input_example=example,
                pip_requirements=requirements(),
            )


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """The logger's INFO lines dropped for the block; its own level afterwards."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# MLflow runs this file as the model's code, under a module name of its own: only then does it set the model
if __name__ != "movierec.serving.pyfunc":
    set_model(SequentialRecommender())

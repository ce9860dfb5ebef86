"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrainedRun:
    """A tiny trained SSE-PT run: `run_dir, run_id = trained_run` unpacks the two main fields."""

    run_dir: Path  # holds best.ckpt, last.ckpt, config.yaml, history.json
    run_id: str  # the MLflow run (logged artifacts: checkpoints/best.ckpt, config.yaml, ...; no "model")
    tracking_uri: str  # sqlite:///.../mlflow.db
    data_dir: Path  # the prepared dataset the run trained on

    def __iter__(self) -> Iterator:
        return iter((self.run_dir, self.run_id))


# original MovieLens-style ids that differ from our contiguous ones, so that tests see the id mapping
def movie_id_of(item: int) -> int:
    return 10 * item + 3


def user_id_of(user: int) -> int:
    return 7 * user + 1000


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One epoch of SSE-PT (configs/synthetic.yaml, tiny sizes) on a 300-user, 150-movie synthetic dataset.

    Original ids are remapped (movieId = 10 * i + 3, userId = 7 * u + 1000) so that code which confuses our
    indices with MovieLens ids fails. MLflow store: a SQLite file beside the data; the model itself is not
    logged as an MLflow pyfunc model (tracking.log_model=false) to keep the fixture fast.
    """
    import pyarrow as pa

    from movierec.data.split import Interactions, write_dataset
    from movierec.data.synthetic import generate_synthetic
    from movierec.training.config import load_config
    from movierec.training.run import train

    root = tmp_path_factory.mktemp("trained-run")
    raw, titles = generate_synthetic(seed=0, num_users=300, num_items=150, num_clusters=4)
    interactions = Interactions(
        users=user_id_of(raw.users), items=movie_id_of(raw.items), timestamps=raw.timestamps, ratings=raw.ratings
    )
    titles = titles.set_column(0, "movie_id", pa.array(movie_id_of(titles["movie_id"].to_numpy()), pa.int64()))
    data = write_dataset(
        interactions, root / "data", "synthetic", source={"kind": "synthetic", "seed": 0}, titles=titles, num_shards=2
    )
    overrides = [
        "model.max_len=20", "model.d_item=16", "model.d_user=8", "train.batch_size=64", "train.epochs=1",
        "tracking.log_model=false", "tracking.system_metrics=false", "eval.ks=[10]",
    ]  # fmt: skip
    config = load_config(REPO / "configs" / "synthetic.yaml", overrides)
    config.data.path, config.run_dir = str(data), str(root / "run")
    config.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    result = train(config)
    return TrainedRun(Path(result.run_dir), result.run_id, config.tracking.uri, Path(data))

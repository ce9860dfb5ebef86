"""A model registered from this file alone trains, evaluates, recommends and exports with no other change:
the proof that `SequentialModel` and the registry are the whole contract between a model and the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from movierec.cli import main
from movierec.errors import ConfigError
from movierec.evaluation.evaluate import evaluate_checkpoint
from movierec.models.base import MODELS, ModelConfig, ModelSection, SequentialModel, build_model, register
from movierec.serving.export import export_model, load_source, verify_export
from movierec.serving.loader import load_model
from movierec.training.config import load_config
from movierec.training.run import train


@register("toy-bag")
class BagOfItems(SequentialModel):
    """The running mean of the items so far, through one linear layer; logits tied to the item table."""

    @classmethod
    def resolve(cls, config: ModelSection) -> None:
        config.d_user, config.keep_user, config.keep_item = 0, 1.0, 1.0  # no users, no SSE

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.d_item, padding_idx=0)
        self.mix = nn.Linear(config.d_item, config.d_item)

    def queries(self, sequences: torch.Tensor, users: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        seen = (sequences != 0).cumsum(1).clamp(min=1).unsqueeze(-1)
        queries = self.mix(self.item_emb(sequences).cumsum(1) / seen)
        return queries[:, -1] if last_only else queries

    def score(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (queries.unsqueeze(-2) * self.item_emb(items)).sum(-1)

    def score_shared(self, queries: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        table = self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)
        return queries @ table.t()


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("toy-bag", []),
        ("bert4rec", ["train.loss=ce", "model.num_heads=2"]),
        ("bert4rec", ["train.loss=bce"]),
        ("bert4rec", ["train.loss=ce", "model.head_transform=false", "model.mask_last=false"]),
        (
            "hstu",
            [
                "train.loss=sampled-softmax",
                "train.num_negatives=32",
                "train.temperature=0.05",
                "model.num_heads=2",
                "model.num_blocks=2",
            ],
        ),
    ],
)
def test_a_registered_model_goes_through_every_stage(trained_run, tmp_path, capsys, kind, extra):
    overrides = [f"model.kind={kind}", "model.max_len=20", "model.d_item=16", "train.epochs=2", "eval.ks=[10]",
                 "eval.every_steps=1", "tracking.log_model=false", "tracking.system_metrics=false", *extra]  # fmt: skip
    config = load_config(None, overrides)
    config.data.path, config.run_dir = str(trained_run.data_dir), str(tmp_path / "run")
    config.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert config.model.d_user == 0  # what the kind forces is in the config that MLflow and config.yaml record
    result = train(config)
    assert result.epochs_run == 2 and result.test_metrics["test_sampled-uniform-100/ndcg@10"] > 0

    metrics = evaluate_checkpoint(result.run_dir, protocols=("full", "sampled-uniform-100"), ks=(10,))
    assert metrics["sampled-uniform-100/ndcg@10"] == pytest.approx(
        result.test_metrics["test_sampled-uniform-100/ndcg@10"]
    )
    assert main(["evaluate", str(result.run_dir), "--protocol", "full", "--k", "10"]) == 0

    recommender = load_model(result.run_dir)
    user = int(recommender.known_user_ids[0])
    recs = recommender.recommend_user(user, 5)
    assert len(recs) == 5 and all(r.title for r in recs)
    history = [r.movie_id for r in recs[:3]]
    assert len(recommender.recommend_history(history, 4).recommendations) == 4
    assert main(["recommend", str(result.run_dir), "--user", str(user), "--k", "3"]) == 0
    assert kind in capsys.readouterr().out

    source = load_source(result.run_dir)
    for fmt, name in (("onnx", "toy.onnx"), ("torchscript", "toy.pt")):
        path = export_model(source, fmt, tmp_path / name)
        assert verify_export(path, fmt, source.model) < 1e-4


def test_the_registry_names_every_kind_and_refuses_unknown_ones():
    assert {"sse-pt", "sasrec", "bert4rec", "toy-bag"} <= set(MODELS)
    with pytest.raises(ValueError, match=r"model\.kind must be one of .*sasrec.*sse-pt.*toy-bag.*got 'gru4rec'"):
        ModelConfig(kind="gru4rec", num_users=3, num_items=5)
    with pytest.raises(ConfigError, match=r"model\.kind must be one of"):
        load_config(None, ["model.kind=gru4rec"])
    model = build_model(ModelConfig(kind="toy-bag", num_users=3, num_items=5, d_item=4, max_len=3))
    with torch.no_grad():
        scores = model.next_item_scores(torch.tensor([[0, 1, 2]]), torch.tensor([0]))
    assert scores.shape == (1, 6) and scores[0, 0] == float("-inf") and np.isfinite(scores[0, 1:].numpy()).all()

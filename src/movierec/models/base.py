"""The contract between a sequential recommender and every stage, and the registry of model kinds.

Training, evaluation, serving and export use a model only through :class:`SequentialModel`: queries from
left-padded item sequences, logits of candidate items, and the training-time batch transform. A new model
is one file that subclasses it and registers its kind, RecBole-style::

    @register("my-model")
    class MyModel(SequentialModel):
        ...

and `model.kind: my-model` in a run config trains, evaluates, serves and exports it. The file must be
imported before a config names the kind (the built-in models are imported by :mod:`movierec.models`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ModelSection:
    """The model's hyper-parameters: the `model:` section of a run config. Each kind uses some of them (its
    `options`); setting one it does not use is a configuration error."""

    kind: str = "sse-pt"  # a registered kind: sse-pt, sasrec, ...
    max_len: int = 200
    d_item: int = 100
    d_user: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    keep_user: float = 0.08  # SSE keep probabilities (the official flags --threshold_user/--threshold_item)
    keep_item: float = 0.9
    mask_prob: float = 0.2  # BERT4Rec: share of a sequence's items hidden for the cloze objective
    # BERT4Rec: the paper's output transform (dense + GELU + LayerNorm, then a per-item bias) before the tied
    # item table; false scores the encoder's states against the table alone, as Klenitskiy & Vasilev's
    # BERT4Rec does, which overfits less on ML-1M (docs/results.md)
    head_transform: bool = True
    # BERT4Rec: always mask a training window's last item (the position inference asks about); false masks it
    # at mask_prob like every other position, as Klenitskiy & Vasilev's BERT4Rec does (docs/results.md); a batch
    # that draws no item at all then has its last items masked, so its loss has a target
    mask_last: bool = True
    # SSE-PT: start the user term of the logits at 0 (the user half of the final LayerNorm's gain starts at 0)
    # instead of the official code's init, where it starts as a positive bias of every logit (docs/results.md)
    zero_user_term: bool = True
    # SASRec / SSE-PT: L2-normalised queries and items (the softmax recipe of HSTU, gSASRec and eSASRec): an
    # item's logit is the cosine of the query's item half and the item's embedding, plus for SSE-PT the cosine
    # of its user half and the user's vector; train.temperature then scales the softmax losses' logits
    cosine: bool = False
    # HSTU: a learned attention bias per log-bucketed time gap between a query's latest item and each earlier
    # item (needs a dataset with timestamps; models/hstu.py)
    time_bias: bool = False

    @property
    def d_model(self) -> int:
        return self.d_item + self.d_user


@dataclass(kw_only=True)
class ModelConfig(ModelSection):
    """An architecture sized for a dataset, as its model kind resolves it (see `SequentialModel.resolve`)."""

    num_users: int
    num_items: int

    def __post_init__(self) -> None:
        model_class(self.kind).resolve(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def train_flops_per_token(self) -> float:
        """Multiply-add FLOPs of one training position (forward + backward), as its model kind counts them."""
        return model_class(self.kind).flops_per_token(self)


class SequentialModel(nn.Module, ABC):
    """What every stage may ask of a model. Item ids are 1..num_items (0 is padding); user ids are
    1..num_users, and user 0 is a person the model has no embedding for (a new visitor): each model decides
    what that means (SSE-PT: the mean user vector; SASRec: nothing, it has no user embedding)."""

    config: ModelConfig

    @classmethod
    def resolve(cls, config: ModelSection) -> None:
        """Check `config` and set the values this kind forces (e.g. SASRec: no user embedding), in place,
        so that checkpoints and MLflow record what is actually trained. Raise ValueError when invalid."""

    @classmethod
    def options(cls, kind: str) -> frozenset[str] | None:
        """The `model:` options this kind uses: a run config that sets any other is refused (an option that
        would be silently ignored, or silently replaced by what the kind forces). None: every option."""
        return None

    @classmethod
    def flops_per_token(cls, config: ModelConfig) -> float:
        """Multiply-add FLOPs of one training position (forward + backward = 3x forward), for throughput
        figures in GFLOP/s. This default counts a Transformer block: the three d x d attention projections and
        the two of the feed-forward (10 d^2), attention scores and weighted values over max_len keys (4 d L),
        plus the logits of the positive and the negative item (4 d); attention over the full window."""
        d, length = config.d_model, config.max_len
        return 3.0 * (config.num_blocks * (10 * d * d + 4 * d * length) + 4 * d)

    @abstractmethod
    def queries(
        self, sequences: torch.Tensor, users: torch.Tensor, last_only: bool = False, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Query vectors (B, L, Q) for left-padded item sequences (B, L) of users (B,): position t's query
        predicts the item after position t. `last_only`: the last position's alone, (B, Q). `times` (B, L):
        the Unix seconds of each input item (any value at padding), or None where they are unknown; only a
        model with a time bias reads them (`uses_times`; callers pass them only to such a model, so a model
        written before timestamps existed keeps working), and it never sees the time of the item it predicts."""

    @abstractmethod
    def score(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits (..., K) of per-query candidate items (..., K) for queries (..., Q)."""

    @abstractmethod
    def score_shared(self, queries: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        """Logits (..., K) of one set of items shared by every query: a 1-D tensor of ids, or a slice lo:hi
        of the catalog (a chunk of it, for bounded memory at full ranking)."""

    @property
    def uses_times(self) -> bool:
        """Whether `queries` reads the items' timestamps (a time bias): the data must then carry them."""
        return False

    def training_batch(
        self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's own training-time transform of a batch (regularisation, masking); none by default."""
        return users, inputs, targets

    def sparse_tables(self) -> list[nn.Embedding]:
        """The id-indexed tables (items, users) of which a batch touches a few rows: on a large catalog they
        train with row-sparse gradients and a lazy Adam (`train.optimizer: auto`). None by default."""
        return []

    def next_item_scores(self, sequences: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_items + 1) of every item after each sequence; column 0 (padding) is -inf.
        What export traces: the scoring function of the model, whole."""
        scores = self.score_shared(self.queries(sequences, users, last_only=True), slice(0, self.config.num_items + 1))
        padding = torch.arange(scores.shape[-1], device=scores.device) == 0
        return scores.masked_fill(padding, float("-inf"))


MODELS: dict[str, type[SequentialModel]] = {}


def register(*kinds: str):
    """Class decorator: `model.kind: <kind>` builds this class."""

    def add(cls: type[SequentialModel]) -> type[SequentialModel]:
        for kind in kinds:
            MODELS[kind] = cls
        return cls

    return add


def model_class(kind: str) -> type[SequentialModel]:
    import movierec.models  # noqa: F401 (registers the built-in kinds)

    if kind not in MODELS:
        raise ValueError(f"model.kind must be one of {', '.join(sorted(MODELS))}, got {kind!r}")
    return MODELS[kind]


def build_model(config: ModelConfig) -> SequentialModel:
    """A fresh model of `config.kind`."""
    return model_class(config.kind)(config)

"""The checkpoint schema: version 2 written and read back typed, a version-1 file (written by the code of
commit f7771dc, tests/fixtures/v1-run) read and resumed, and every field of an edited file checked on one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from data_builders import TINY_RUN
from test_training import make_dataset

from movierec.cli import main
from movierec.models.checkpoint import FORMAT, Checkpoint, TrainState, load_checkpoint, model_from_checkpoint
from movierec.training.config import load_config
from movierec.training.run import train

V1_RUN = Path(__file__).parent / "fixtures" / "v1-run"
# the config the v1 fixture was trained with (2 epochs), as tests/fixtures/README.md records
V1_OVERRIDES = [
    *TINY_RUN,
    "train.batch_size=16",
    "eval.ks=[10]",
    "model.d_item=8",
    "model.d_user=4",
    "model.max_len=10",
]


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory) -> Path:
    """The dataset the v1 fixture was trained on, rebuilt (preparation is deterministic: same meta.json)."""
    return make_dataset(tmp_path_factory.mktemp("v1-data"), seed=1, num_users=60, num_items=40)


def test_a_version_1_checkpoint_reads_into_the_typed_schema():
    state = load_checkpoint(V1_RUN / "last.ckpt")
    assert isinstance(state, Checkpoint) and isinstance(state.train_state, TrainState)
    assert (state.train_state.epoch, state.train_state.step, len(state.train_state.history)) == (2, 8, 2)
    assert state.train_state.best_epoch in (1, 2) and state.train_state.last_eval_step == 8
    assert len(state.optimizers) == 1 and state.optimizer_kind == "adam" and state.validation_loss == "bce"
    assert state.dataset.num_items == 40 and len(state.dataset.item_movie_ids) == 40 and not state.finished
    model_from_checkpoint(state)  # the weights fit


def test_a_version_1_run_resumes_and_matches_an_uninterrupted_run(v1_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V1_RUN, run)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--resume", str(run), "--data", str(v1_data), "--epochs", "3", "--tracking-uri", uri]) == 0
    raw = torch.load(run / "last.ckpt", weights_only=True)
    assert raw["format"] == FORMAT and raw["train_state"]["epoch"] == 3, "rewritten as version 2"
    resumed = load_checkpoint(run / "last.ckpt")
    assert resumed.finished and len(resumed.train_state.history) == 3
    config = load_config(None, [*V1_OVERRIDES, "train.epochs=3"])
    config.data.path, config.run_dir, config.tracking.uri = str(v1_data), str(tmp_path / "straight"), uri
    straight = load_checkpoint(Path(train(config).run_dir) / "last.ckpt")
    assert [h["train_loss"] for h in resumed.train_state.history] == [
        h["train_loss"] for h in straight.train_state.history]  # fmt: skip
    for name, tensor in straight.model.items():
        torch.testing.assert_close(resumed.model[name], tensor, rtol=0, atol=0)


def edited(tmp_path: Path, name: str, change) -> Path:
    """A copy of the v1 fixture as version 2 with `change` applied to its raw dict."""
    state = load_checkpoint(V1_RUN / "last.ckpt")
    raw = state.to_dict()
    change(raw)
    path = tmp_path / name / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(raw, path)
    return path


def _table_with_rows(raw: dict, extra: int) -> None:
    table = raw["model"]["item_emb.weight"]
    raw["model"]["item_emb.weight"] = torch.cat([table, table[:extra]])


SCHEMA_EDITS = [  # refused when the file is read, by every command
    ("dataset-text", lambda r: r.update(dataset="abc"), "its field 'dataset' is a str"),
    ("config-text", lambda r: r.update(config="abc"), "its field 'config' is a str"),
    ("epoch-text", lambda r: r["train_state"].update(epoch="abc"), "its run state is not valid"),
    ("history-number", lambda r: r["train_state"].update(history=5), "its run state is not valid"),
    ("no-kind", lambda r: r["model_config"].pop("kind"), "names no model kind"),
    ("optimizers-garbled", lambda r: r.update(optimizers="x"), "its field 'optimizers' is a str"),
]
MODEL_EDITS = [  # refused where the model is rebuilt from its config (evaluate, serve, export, resume)
    ("num-items-negative", lambda r: r["model_config"].update(num_items=-5), "its model config is not valid"),
    ("num-items-huge", lambda r: r["model_config"].update(num_items=10**11), "weights do not fit its model config"),
    ("extra-rows", lambda r: _table_with_rows(r, 5), "item_emb.weight: (46, 8), the config builds (41, 8)"),
]


@pytest.mark.parametrize(("name", "change", "message"), SCHEMA_EDITS + MODEL_EDITS,
                         ids=[e[0] for e in SCHEMA_EDITS + MODEL_EDITS])  # fmt: skip
def test_an_edited_checkpoint_is_one_line_wherever_it_is_read(v1_data, tmp_path, capsys, name, change, message):
    path = edited(tmp_path, name, change)
    commands = [
        ["evaluate", str(path), "--data", str(v1_data)],
        ["train", "--resume", str(path.parent), "--data", str(v1_data), "--epochs", "3"],
    ]
    if (name, change, message) in SCHEMA_EDITS:
        commands.append(["train", "--data", str(v1_data), "--init-from", str(path), "--run-dir", str(tmp_path / "n")])
    for command in commands:
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, err)
        if command[0] == "evaluate":
            assert message in err, err


def test_init_from_skips_tables_that_cannot_be_mapped():
    """A table shorter than its id map, or 1-D, is skipped (shape); the rest still loads."""
    from dataclasses import replace

    from movierec.training.init_from import LOADED, SKIPPED_SHAPE, init_from_checkpoint

    state = load_checkpoint(V1_RUN / "best.ckpt")
    target = model_from_checkpoint(state).train()
    ids = state.dataset.item_movie_ids.numpy(), state.dataset.user_ids.numpy()
    for table in (state.model["item_emb.weight"][:20], state.model["item_emb.weight"][:, 0]):
        report = init_from_checkpoint(target, replace(state, model={**state.model, "item_emb.weight": table}), *ids)
        actions = {row.target: row.action for row in report}
        assert actions["item_emb.weight"] == SKIPPED_SHAPE and actions["blocks.0.query.weight"] == LOADED


def test_resume_with_a_missing_optimizer_state_is_one_line(v1_data, tmp_path, capsys):
    path = edited(tmp_path, "no-optimizer", lambda r: r.update(optimizers=[]))
    assert main(["train", "--resume", str(path.parent), "--data", str(v1_data), "--epochs", "3"]) == 2
    assert "was trained with optimizer" in capsys.readouterr().err
    path = edited(tmp_path, "bad-optimizer", lambda r: r.update(optimizers=[{"state": {}, "param_groups": []}]))
    assert main(["train", "--resume", str(path.parent), "--data", str(v1_data), "--epochs", "3"]) == 2
    assert "its saved state does not fit this run" in capsys.readouterr().err

"""`--init-from` a foreign PyTorch state dict: renamed, missing and mis-shaped tensors, the shipped map of the
official TensorFlow SSE-PT names, hostile pickles refused unrun, and one-line errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from data_builders import TINY_RUN
from mlflow.tracking import MlflowClient
from test_training import make_dataset

from movierec.cli import main
from movierec.errors import CheckpointError, ConfigError
from movierec.models.base import ModelConfig
from movierec.models.sse_pt import SSEPT
from movierec.training.init_from import (
    INITIALISED,
    LOADED,
    SKIPPED_NO_MATCH,
    SKIPPED_SHAPE,
    init_model,
    read_init_map,
    read_pretrained,
)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_MAP = REPO / "configs" / "init-maps" / "sse-pt-official.yaml"
CONFIG = ModelConfig(num_users=30, num_items=40, max_len=10, d_item=8, d_user=4, num_blocks=2)


def model(seed: int, config: ModelConfig = CONFIG) -> SSEPT:
    torch.manual_seed(seed)
    return SSEPT(config).eval()


def write_map(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def as_official_tensorflow(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """Our SSE-PT tensors under the official TF1 graph's variable names and layouts, written out by hand from
    model_v1.py / modules.py (dense kernels (in, out), conv1d kernels (1, in, out), LayerNorm beta/gamma)."""
    tf = {
        "SASRec/input_embeddings/lookup_table:0": state["item_emb.weight"],
        "SASRec/user_embeddings/lookup_table:0": state["user_emb.weight"],
        "SASRec/dec_pos/lookup_table:0": state["pos_emb.weight"],
        "SASRec/ln/Variable:0": state["final_norm.bias"],
        "SASRec/ln/Variable_1:0": state["final_norm.weight"],
    }
    for i in range(blocks):
        scope = f"SASRec/num_blocks_{i}"
        for dense, ours in (("dense", "query"), ("dense_1", "key"), ("dense_2", "value")):
            tf[f"{scope}/self_attention/{dense}/kernel:0"] = state[f"blocks.{i}.{ours}.weight"].t().contiguous()
            tf[f"{scope}/self_attention/{dense}/bias:0"] = state[f"blocks.{i}.{ours}.bias"]
        for conv, ours in (("conv1d", "ffn_in"), ("conv1d_1", "ffn_out")):
            tf[f"{scope}/multihead_attention/{conv}/kernel:0"] = state[f"blocks.{i}.{ours}.weight"].t()[None].clone()
            tf[f"{scope}/multihead_attention/{conv}/bias:0"] = state[f"blocks.{i}.{ours}.bias"]
        for ln, ours in (("ln", "attn_norm"), ("ln_1", "ffn_norm")):
            tf[f"{scope}/{ln}/Variable:0"] = state[f"blocks.{i}.{ours}.bias"]
            tf[f"{scope}/{ln}/Variable_1:0"] = state[f"blocks.{i}.{ours}.weight"]
    return tf


def test_official_tensorflow_names_load_whole_and_score_the_same(tmp_path):
    source = model(0)
    torch.save(as_official_tensorflow(source.state_dict(), CONFIG.num_blocks), tmp_path / "SSE_PT_tf.pth")
    target = model(1)
    report = init_model(target, read_pretrained(tmp_path / "SSE_PT_tf.pth"), read_init_map(OFFICIAL_MAP))
    assert {row.action for row in report} == {LOADED}, [r for r in report if r.action != LOADED]
    assert len(report) == len(source.state_dict())
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)
    sequences = torch.randint(1, CONFIG.num_items + 1, (3, CONFIG.max_len))
    users = torch.tensor([1, 2, 0])
    torch.testing.assert_close(target.next_item_scores(sequences, users), source.next_item_scores(sequences, users))


def test_renamed_missing_and_misshaped_tensors_give_the_right_table(tmp_path):
    source = model(0).state_dict()
    bigger = ModelConfig(**{**CONFIG.to_dict(), "num_items": 55})
    tensors = {
        "encoder.pos.weight": source["pos_emb.weight"],  # renamed by the map
        "encoder.layer0.q.weight": source["blocks.0.query.weight"],
        "item_emb.weight": model(2, bigger).state_dict()["item_emb.weight"],  # their catalog: skipped (shape)
        "blocks.1.ffn_in.weight": source["blocks.1.ffn_in.weight"],  # our name already: loaded as it is
        "fc_out.weight": torch.zeros(3, 3),  # nothing of ours: skipped (no match)
    }
    # the way training scripts save: nested under "state_dict", every name prefixed by DDP's "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 7}, tmp_path / "theirs.pt")
    rules = read_init_map(
        write_map(
            tmp_path / "map.yaml",
            r"""
rules:
  - {from: 'encoder\.pos\.weight', to: pos_emb.weight}
  - {from: 'encoder\.layer(\d+)\.q\.weight', to: 'blocks.\1.query.weight'}
""",
        )
    )
    target = model(1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_model(target, read_pretrained(tmp_path / "theirs.pt"), rules)
    by_source = {row.source: (row.target, row.action) for row in report if row.source}
    assert by_source == {
        "encoder.pos.weight": ("pos_emb.weight", LOADED),
        "encoder.layer0.q.weight": ("blocks.0.query.weight", LOADED),
        "item_emb.weight": ("item_emb.weight", SKIPPED_SHAPE),
        "blocks.1.ffn_in.weight": ("blocks.1.ffn_in.weight", LOADED),
        "fc_out.weight": ("", SKIPPED_NO_MATCH),
    }
    initialised = {row.target for row in report if row.action == INITIALISED}
    assert initialised == set(fresh) - {"pos_emb.weight", "blocks.0.query.weight", "blocks.1.ffn_in.weight"}
    state = target.state_dict()
    for theirs, ours in (("encoder.pos.weight", "pos_emb.weight"), ("blocks.1.ffn_in.weight", "blocks.1.ffn_in.weight"),
                         ("encoder.layer0.q.weight", "blocks.0.query.weight")):  # fmt: skip
        torch.testing.assert_close(state[ours], tensors[theirs], rtol=0, atol=0)
    for name in initialised:
        torch.testing.assert_close(state[name], fresh[name], rtol=0, atol=0)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/movierec-hostile-pickle-ran")


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_a_hostile_pickle_is_refused_without_running_it(tmp_path, kind, capsys):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "hostile.pth"
    payload = {"item_emb.weight": torch.zeros(2, 2), "trap": RunsCode()}
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError, match="was refused: it holds Python objects other than tensors"):
        read_pretrained(path)
    assert main(["train", "--init-from", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not MARKER.exists(), "the payload ran"


def test_bad_maps_and_files_that_load_nothing_are_one_line(tmp_path):
    for text, message in [
        ("rules:\n  - {from: 'blocks.(\\d+', to: x}", "is not a valid regular expression"),
        ("rules:\n  - {from: 'a(\\d)', to: 'b.\\2'}", "uses group \\2, `from` has 1 group"),
        ("rules:\n  - {from: a}", "expected the keys from, to"),
        ("rules: [", "is not valid YAML"),
        ("other: 1", "must hold `rules:`"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("\\", "\\\\").replace("(", "\\(")):
            read_init_map(write_map(tmp_path / "bad.yaml", text))
    with pytest.raises(ConfigError, match="does not exist"):
        read_init_map(tmp_path / "absent.yaml")
    torch.save({"fc_out.weight": torch.zeros(3, 3), "item_emb.weight": torch.zeros(7, 8)}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"none of its tensors fits this model \(1 skipped for their shape, 1 "):
        init_model(model(0), read_pretrained(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 10)
    with pytest.raises(CheckpointError, match="is not a readable movierec checkpoint or PyTorch state dict"):
        read_pretrained(tmp_path / "junk.pth")
    (tmp_path / "pickle4.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match=r"or PyTorch state dict \(Unsupported operand"):
        read_pretrained(tmp_path / "pickle4.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no named tensors"):
        read_pretrained(tmp_path / "list.pth")


def test_train_from_a_foreign_state_dict_logs_the_table(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", seed=1, num_users=60, num_items=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["train", "--data", str(data), "--tracking-uri", uri, "--epochs", "1", *TINY_RUN, "train.batch_size=32"]
    assert main([*base, "--run-dir", str(tmp_path / "source")]) == 0
    from movierec.models.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "source" / "best.ckpt")
    blocks = state.model_config["num_blocks"]
    torch.save(as_official_tensorflow(state.model, blocks), tmp_path / "SSE_PT_tf.pth")
    capsys.readouterr()
    args = [*base, "--run-dir", str(tmp_path / "tuned"), "--init-from", str(tmp_path / "SSE_PT_tf.pth")]
    assert main([*args, "--init-map", str(OFFICIAL_MAP)]) == 0
    out = capsys.readouterr().out
    assert "init-from: pretrained tensors" in out and f"init-from: {len(state.model)} loaded, 0 mapped" in out
    tuned = load_checkpoint(tmp_path / "tuned" / "best.ckpt")
    client = MlflowClient(uri)
    table = client.download_artifacts(tuned.mlflow_run_id, "init_from.tsv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert rows[0] == "source\ttarget\taction\tdetail" and len(rows) == 1 + len(state.model)
    assert main(args) == 2, "without the map nothing fits: an error, never a silent cold start"
    err = capsys.readouterr().err
    assert "none of its tensors fits this model" in err and "--init-map" in err and len(err.splitlines()) == 1

"""The README's main job (`make run` -> `movierec quickstart`) end to end, with one epoch."""

from __future__ import annotations

from movierec.cli import main


def test_quickstart_prepares_trains_evaluates_and_recommends(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    for step in ("1. prepare", "2. train", "3. evaluate", "4. recommend"):
        assert step in out
    assert "Synthetic movie" in out and "mlflow run" in out.lower()
    assert (tmp_path / "data" / "synthetic" / "meta.json").is_file()
    assert (tmp_path / "run" / "best.ckpt").is_file() and (tmp_path / "mlflow.db").is_file()
    # a second run reuses the prepared data
    assert main(["quickstart", "--out", str(tmp_path), "--epochs", "1"]) == 0

"""`movierec prepare` / `info` / `download`: exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from movierec.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_synthetic_and_info(tmp_path, capsys):
    code, out, _ = run(capsys, "prepare", "--dataset", "synthetic", "--out", str(tmp_path), "--num-shards", "2")
    assert code == 0 and "synthetic" in out and "validation pairs" in out
    code, out, _ = run(capsys, "info", str(tmp_path / "synthetic"))
    assert code == 0 and "evaluation pairs" in out
    code, _, err = run(capsys, "prepare", "--dataset", "synthetic", "--out", str(tmp_path))
    assert code == 2 and "already exists; pass --overwrite" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prepare", "--dataset", "ml-5m"], "unknown dataset 'ml-5m'"),
        (["prepare", "--dataset", "ml-1m-sasrec"], "needs --input"),
        (["prepare", "--dataset", "ml-1m-sasrec", "--input", "/nonexistent/ml-1m.txt"], "does not exist"),
        (["prepare", "--dataset", "synthetic", "--fraction", "0.5"], "--fraction does not apply to synthetic"),
        (["prepare", "--dataset", "synthetic", "--archive", "x.zip"], "--archive does not apply to synthetic"),
        (["prepare", "--dataset", "ml-1m", "--archive", "/nonexistent.zip"], "archive /nonexistent.zip does not exist"),
        (["prepare", "--dataset", "ml-1m", "--input", "/nonexistent"], "is not a folder"),
        (["prepare", "--dataset", "ml-1m", "--input", "/", "--archive", "x.zip"], "not both"),
        (["prepare", "--dataset", "ml-1m", "--num-shards", "0", "--input", "/"], "--num-shards must be positive"),
        (["prepare", "--dataset", "ml-20mx16x32", "--input", "/nonexistent"], "is not a folder"),
        (["download", "ml-5m"], "unknown MovieLens release 'ml-5m'"),
        (["download"], "give a release name"),
        (["info", "/nonexistent"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "prepare" else []))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"movierec {argv[0]}: error: ")
    assert message in err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "movierec.cli", "prepare", "--dataset", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_prepare_help_lists_every_known_dataset(capsys):
    from movierec.data.registry import RELEASES

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ["synthetic", "sasrec-text", "ml-1m-sasrec", *RELEASES]:
        assert name in text, name

"""Time to quality: wall seconds and epochs until test NDCG@10 reaches given thresholds, SSE-PT and SASRec.

    python bench/time_to_quality.py --data data/ml-1m-sasrec [--models sse-pt,sasrec] \
        [--thresholds 0.55,0.58,0.60,0.62] [--minutes 30] [--out runs/time-to-quality] [--set KEY=VALUE ...]
    python bench/time_to_quality.py --runs sse-pt=runs/x sasrec=runs/y      # curves of finished runs

Each model trains once with its config as shipped (`configs/ml-1m-<model>.yaml`, no overrides but the run
folder, the MLflow store, `eval.test_curve=true` and the time budget `train.max_minutes`), in its own
process, one after the other. With
`eval.test_curve` the trainer also scores the test split at every validation; the clock of the run
(`elapsed_s` in history.json: training plus validation, from the first step) pauses while it does, so the
seconds are those of a run without it. Prints, per model and threshold, the first validation at which test
NDCG@10 (100 uniform negatives) reached it, and the test metrics of the run's best checkpoint; writes the
NDCG-versus-seconds curve as `time_to_quality.png` (the picture of the SSE-PT paper's speed figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, cli, run_child

METRIC = "sampled-uniform-100/ndcg@10"


def train_command(
    config: Path, data: str | Path, run_dir: Path, tracking_uri: str, minutes: float, *extra: str
) -> list[str]:
    """`movierec train` of `config` as shipped but for its run folder, MLflow store and time budget
    (train.max_minutes: the run then stops, tests its best weights and keeps the result in best.ckpt), with
    `extra` options and overrides last."""
    return cli("train", "--config", str(config), "--data", str(data), "--run-dir", str(run_dir),
               "--tracking-uri", tracking_uri, "--max-minutes", str(minutes), *extra)  # fmt: skip


def train(model: str, data: str, out: Path, minutes: float, extra: list[str]) -> Path:
    """One run of `configs/ml-1m-<model>.yaml` as shipped, scoring the test split at every validation (its
    output shown as it comes); returns its run folder."""
    run_dir = out / model
    command = train_command(
        ROOT / "configs" / f"ml-1m-{model}.yaml", data, run_dir, f"sqlite:///{out.resolve()}/mlflow.db", minutes,
        "--run-name", f"time-to-quality-{model}", "eval.test_curve=true", *extra,
    )  # fmt: skip
    print("$", " ".join(command), flush=True)
    finished = run_child(command, echo=True)
    if not finished.ok:
        raise SystemExit(f"{model}: {finished.why()}")
    return run_dir


def history(run_dir: Path) -> list[dict]:
    """history.json of a run: one record per epoch (loss, rates, `elapsed_s`, the validation's `val_*`)."""
    return json.loads((run_dir / "history.json").read_text())


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, elapsed seconds, test NDCG@10) at every validation of a run trained with eval.test_curve."""
    key = f"curve_test_{METRIC}"
    points = [(h["epoch"], h["elapsed_s"], h[key]) for h in history(run_dir) if key in h]
    if not points:
        raise SystemExit(f"{run_dir}/history.json has no {key}: train it with eval.test_curve=true")
    return points


def final_test(run_dir: Path) -> float | None:
    """Test NDCG@10 of the run's best weights, as its checkpoint keeps it once the run has finished (what
    `movierec train` reports at its end)."""
    from movierec.models.checkpoint import load_checkpoint

    return load_checkpoint(run_dir).test_metrics.get(f"test_{METRIC}")


def plot(curves: dict[str, list[tuple[int, float, float]]], thresholds: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, points in curves.items():
        ax.plot([p[1] / 60 for p in points], [p[2] for p in points], marker="o", markersize=3, label=model)
    for threshold in thresholds:
        ax.axhline(threshold, color="grey", linewidth=0.6, linestyle=":")
    ax.set(xlabel="wall time of the run (minutes)", ylabel="test NDCG@10 (100 uniform negatives)",
           title="ML-1M: test NDCG@10 against training time")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-1m-sasrec")
    parser.add_argument("--models", default="sse-pt,sasrec", help="comma-separated: configs/ml-1m-<model>.yaml")
    parser.add_argument("--thresholds", default="0.55,0.58,0.60,0.62")
    parser.add_argument("--minutes", type=float, default=30.0, help="each run's budget (train.max_minutes)")
    parser.add_argument("--out", type=Path, default=Path("runs/time-to-quality"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides (all models)")
    parser.add_argument("--runs", nargs="*", default=[], metavar="MODEL=RUN_DIR", help="use finished runs instead")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        run_dirs = {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]) for spec in args.runs}
    else:
        run_dirs = {
            model: train(model, args.data, args.out, args.minutes, args.set) for model in args.models.split(",")
        }
    curves = {model: curve(run_dir) for model, run_dir in run_dirs.items()}

    header = f"{'model':<10}{'threshold':>10}{'reached at epoch':>18}{'after minutes':>15}"
    print(header)
    print("-" * len(header))
    for model, points in curves.items():
        for threshold in thresholds:
            hit = next((p for p in points if p[2] >= threshold), None)
            where = f"{hit[0]:>18}{hit[1] / 60:>15.1f}" if hit else f"{'not reached':>18}{'':>15}"
            print(f"{model:<10}{threshold:>10.2f}{where}")
    print()
    for model, run_dir in run_dirs.items():
        epoch, seconds, _ = curves[model][-1]
        best = final_test(run_dir)
        shown = f"{best:.4f}" if best is not None else "n/a"
        print(f"{model}: {epoch} epochs in {seconds / 60:.1f} min; best checkpoint's test NDCG@10 {shown}")
    print(f"curve: {plot(curves, thresholds, args.out / 'time_to_quality.png')}")


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of the ML-1M recipes, per precision this machine supports.

    python bench/train_throughput.py --data data/ml-1m-sasrec [--steps 48] [--threads N]

Each (recipe, precision) runs in its own process, so its peak RSS is its own. Prints sequences/s,
non-padding tokens/s, the implied time of one pass over the 6,040 users (an "epoch", as SASRec.pytorch
counts it), the achieved GFLOP/s (non-padding tokens x `ModelConfig.train_flops_per_token`) beside this
machine's measured fp32 matmul peak, the share of that peak a step made only of its matrix products reaches
at the recipe's shapes (the ceiling for the GFLOP/s column), and peak RSS. Compare with SASRec.pytorch only
in the same sitting: `../shared/peers/time-sasrec-pytorch .venv/bin/python` right before or after.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

PAPER_LOSS = ["train.loss=bce", "train.start_loss=null"]  # one sampled negative per position, as the peer trains
RECIPES = {
    "sasrec (d 50)": ["model.kind=sasrec", "model.d_item=50", "model.d_user=0", *PAPER_LOSS],
    "sse-pt (100+50)": ["model.kind=sse-pt", "model.d_item=100", "model.d_user=50", *PAPER_LOSS],
}


def worker(data: str, precision: str, overrides: list[str], steps: int, threads: int | None) -> dict:
    import time

    import torch

    from movierec.training.config import load_config
    from movierec.training.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    config = load_config("configs/ml-1m-sse-pt.yaml", [*overrides, f"train.precision={precision}"])
    config.data.path = data
    trainer = Engine.from_config(config)
    trainer.train_epoch(max_steps=3)  # warm-up: allocator, kernels
    started = time.perf_counter()
    stats = trainer.train_epoch(max_steps=steps)
    seconds = time.perf_counter() - started
    epoch_batches = len(trainer.batches)
    return {
        "gflops": stats["tokens_per_s"] * trainer.model_config.train_flops_per_token() / 1e9,
        "sequences_per_s": stats["sequences_per_s"],
        "tokens_per_s": stats["tokens_per_s"],
        "epoch_s": seconds / min(steps, epoch_batches) * epoch_batches,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "products_gflops": products_only_gflops(
            trainer.model_config.d_model,
            trainer.model_config.max_len,
            trainer.model_config.num_blocks,
            config.train.batch_size,
        ),
    }


def products_only_gflops(d: int, length: int, blocks: int, batch_size: int, repeats: int = 5) -> float:
    """The rate of a step made of nothing but its counted matrix products, at the recipe's shapes (a full
    batch of `length` positions of width d): per block, the five d x d projections and the two attention products,
    forward and both backward products of each. It is the ceiling for the GFLOP/s column: the step's
    element-wise work (LayerNorm, softmax, dropout, masking, residuals) can only add time to it."""
    import time

    import torch

    tokens = batch_size * length
    x, weight, bias = torch.randn(tokens, d), torch.randn(d, d), torch.randn(d)
    q, k = torch.randn(batch_size, length, d), torch.randn(batch_size, length, d)
    scores = torch.randn(batch_size, length, length)

    def one_block() -> None:
        for _ in range(5):  # projections: forward, grad of the input, grad of the weight
            torch.addmm(bias, x, weight.t())
            x @ weight
            x.t() @ x
        for _ in range(2):  # q k^T and weights @ v: forward and the two gradients of each
            q @ k.transpose(1, 2)
            scores @ k
            scores.transpose(1, 2) @ q

    one_block()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(blocks):
            one_block()
        best = min(best, time.perf_counter() - started)
    flops = 3 * blocks * (10 * d * d + 4 * d * length) * tokens
    return flops / best / 1e9


def matmul_peak_gflops(threads: int | None, size: int = 2048, repeats: int = 40) -> float:
    """This machine's fp32 matrix-multiply rate with the given threads: the best of `repeats` square products
    (on a shared VM the best of 10 once read 75 GFLOP/s where the next two readings gave 112 and 114)."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-1m-sasrec")
    parser.add_argument("--steps", type=int, default=48, help="batches timed per run (48 = one ML-1M pass)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", default=None, help="comma-separated; default: all this machine supports")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of the recipes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "matmul":
        print(json.dumps({"gflops": matmul_peak_gflops(args.threads)}))
        return
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(args.data, spec["precision"], spec["overrides"], args.steps, args.threads)))
        return

    import torch

    precisions = (
        args.precisions.split(",")
        if args.precisions
        else (["fp32", "fp16", "bf16"] if torch.cuda.is_available() else ["fp32", "bf16"])
    )

    def run_worker(spec: str) -> dict:
        cmd = [sys.executable, __file__, "--data", args.data, "--steps", str(args.steps), "--worker", spec]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])

    peak = run_worker("matmul")["gflops"]
    rows = []
    for name in args.recipes.split(","):
        for precision in precisions:
            spec = json.dumps({"precision": precision, "overrides": [*RECIPES[name], *args.set]})
            rows.append((name, precision, run_worker(spec)))
    header = (
        f"{'recipe':<18}{'precision':<10}{'device':<8}{'threads':>8}{'seq/s':>9}{'tokens/s':>11}"
        f"{'s/epoch':>9}{'GFLOP/s':>9}{'% of peak':>10}{'products only':>15}{'peak RSS MiB':>14}"
    )
    print(f"fp32 matmul peak of this machine (2048^2 products, same threads): {peak:.0f} GFLOP/s")
    print(header)
    print("-" * len(header))
    for name, precision, r in rows:
        print(
            f"{name:<18}{precision:<10}{r['device']:<8}{r['threads']:>8}{r['sequences_per_s']:>9.0f}"
            f"{r['tokens_per_s']:>11.0f}{r['epoch_s']:>9.1f}{r['gflops']:>9.1f}{100 * r['gflops'] / peak:>9.0f}%"
            f"{100 * r['products_gflops'] / peak:>14.0f}%{r['peak_rss_mib']:>14.0f}"
        )


if __name__ == "__main__":
    main()

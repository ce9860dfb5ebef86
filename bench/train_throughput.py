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
from pathlib import Path

from common import ML1M_CONFIG, RECIPES, parse_recipes, run_worker, steps_job, time_job, work


def job_result(job: dict) -> dict:
    """A worker job: the machine's matmul peak, or the recipe's timed steps and its products-only ceiling
    (measured after the steps, in the same process)."""
    if job.get("kind") == "matmul":
        return {"gflops": matmul_peak_gflops(job["threads"])}
    result = time_job(job)
    shape = result["model"]
    result["products_gflops"] = products_only_gflops(
        shape["d_model"], shape["max_len"], shape["num_blocks"], result["batch_size"]
    )
    return result


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
    parser.add_argument("--recipes", type=parse_recipes, default=",".join(r.name for r in RECIPES.values()),
                        help="comma-separated subset of the recipes")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # "matmul" alone prints the machine's peak
        work([{"kind": "matmul", "threads": args.threads}] if args.worker == "matmul" else json.loads(args.worker),
             job_result)  # fmt: skip
        return

    import torch

    precisions = (
        args.precisions.split(",")
        if args.precisions
        else (["fp32", "fp16", "bf16"] if torch.cuda.is_available() else ["fp32", "bf16"])
    )
    threads = [f"train.num_threads={args.threads}"] if args.threads else []

    def measure(job: dict) -> dict:
        """One job in a worker process of its own, so that its peak RSS is its own."""
        finished, (result,) = run_worker(__file__, [job])
        if result is None or "error" in result:
            raise SystemExit(f"worker failed: {result['error'] if result else finished.why()}\n{finished.output}")
        return result

    peak = measure({"kind": "matmul", "threads": args.threads})["gflops"]
    rows = []
    for recipe in args.recipes:
        for precision in precisions:
            overrides = [*recipe.overrides, *args.set, *threads, f"train.precision={precision}"]
            job = steps_job(ML1M_CONFIG, Path(args.data).resolve(), overrides, warmup=3, steps=args.steps)
            rows.append((recipe.name, precision, measure(job)))
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
            f"{r['tokens_per_s']:>11.0f}{r['s_per_pass']:>9.1f}{r['gflops']:>9.1f}{100 * r['gflops'] / peak:>9.0f}%"
            f"{100 * r['products_gflops'] / peak:>14.0f}%{r['peak_rss_mib']:>14.0f}"
        )


if __name__ == "__main__":
    main()

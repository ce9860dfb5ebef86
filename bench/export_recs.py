"""`movierec export-recs` for every user: wall time, users/s, peak RSS, and a SIGKILL part-way then a resume.

    python bench/export_recs.py --mlperf              # issue 26: ml-20mx16x32 file 0, 137,327 users, k 10
    python bench/export_recs.py [MODEL] [--k 10] [--kill-at 0.6] [--threads N] [--json FILE]
    python bench/export_recs.py --mlperf tiny         # smoke run of the same path

The model is chosen as in bench/serve_latency.py (MODEL, `--mlperf [full|tiny]` trained `--steps` steps and
cached under `--cache`, else the tiny synthetic model trained into a temporary folder).

1. Uninterrupted: `movierec export-recs MODEL --out whole.parquet --k K` in a child process (bench/common.py's
   run_child): its wall time (process start to exit, model load included), the export's own seconds (its
   last line), users/s of each, and its peak RSS (os.wait4).
2. Killed: the same command with `--out resumed.parquet`, SIGKILLed `--kill-at` x (1.'s wall time) after its
   start; the passes it finished are kept in `resumed.parquet.parts/` (export-recs writes a part per pass of
   16,384 users: EXPORT_USERS_PER_PASS). The default 0.6 lands in the sixth of the nine passes of 137,327
   users, after about five are kept.
3. Resumed: the same command again, run to its end; then resumed.parquet is compared with whole.parquet row
   for row (pyarrow Table.equals: every column, in order) and "identical: yes/no" printed.

Prints the machine, one markdown table and the kill/resume line; `--json` writes them. Files go to a temporary
folder under `--work` (default $TMPDIR), removed at the end. Exits 1 when a step failed or the files differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path

from common import Finished, cli, log, machine, machine_line, run_child
from serve_latency import add_model_options, check_model_options, model_flags, resolve_model

DONE = re.compile(r"([\d,]+) rows for ([\d,]+) users \(k=\d+\) -> .* in ([0-9.]+)s")  # export-recs' result line
SCREENED = re.compile(r"screened ([0-9.]+)% of the catalogue per user")  # printed when the bfloat16 screen ran


def export(model: str, out: Path, args: argparse.Namespace, timeout: float | None = None) -> Finished:
    command = cli("export-recs", model, "--out", str(out), "--k", str(args.k), *model_flags(args))
    return run_child(command, timeout=timeout, echo=True)


def finished_export(finished: Finished, what: str) -> tuple[int, int, float]:
    """(rows, users, the export's own seconds) of a run that ended well; else exit with why."""
    match = DONE.search(finished.output)
    if not finished.ok or match is None:
        raise SystemExit(f"the {what} export failed: {finished.why()}\n{finished.output[-3000:]}")
    rows, users, seconds = match.groups()
    return int(rows.replace(",", "")), int(users.replace(",", "")), float(seconds)


def screened_share(output: str) -> float | None:
    """The share of the catalogue the exact top k's bfloat16 screen scored per user (None: it did not run)."""
    match = SCREENED.search(output)
    return None if match is None else float(match.group(1)) / 100


def main() -> None:
    import pyarrow.parquet as pq

    from movierec.serving.recommender import EXPORT_USERS_PER_PASS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--k", type=int, default=10, help="recommendations per user (default 10)")
    parser.add_argument("--kill-at", type=float, default=0.6, help="SIGKILL at this share of the whole run's time")
    parser.add_argument("--work", type=Path, default=None, help="folder for the parquet files (default $TMPDIR)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    check_model_options(parser, args)
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be between 0 and 1")

    with tempfile.TemporaryDirectory(prefix="movierec-export-bench-", dir=args.work) as tmp:
        root = Path(tmp)
        model, label = resolve_model(args, root)
        log("export-recs, uninterrupted ...")
        whole = export(model, root / "whole.parquet", args)
        rows, users, seconds = finished_export(whole, "uninterrupted")
        resumed_file = root / "resumed.parquet"
        kill_s = args.kill_at * whole.wall_s
        log(f"export-recs, SIGKILL after {kill_s:.1f} s ...")
        killed = export(model, resumed_file, args, timeout=kill_s)
        kept = len(list(resumed_file.with_name(resumed_file.name + ".parts").glob("part-*.parquet")))
        log("export-recs, resumed ...")
        resumed = export(model, resumed_file, args)
        finished_export(resumed, "resumed")
        identical = pq.read_table(resumed_file).equals(pq.read_table(root / "whole.parquet"))

    passes = math.ceil(users / EXPORT_USERS_PER_PASS)
    killed_how = f"SIGKILL after {killed.wall_s:.1f} s" if killed.status == "timeout" else "not killed: it ended first"
    result = {
        "model": label, "users": users, "k": args.k, "rows": rows, "wall_s": whole.wall_s, "export_s": seconds,
        "users_per_s": users / whole.wall_s,
        "export_users_per_s": users / seconds if seconds > 0 else None,  # None: under the 0.1 s export-recs prints
        "peak_rss_mib": whole.peak_rss_mib, "killed": killed.status == "timeout", "killed_after_s": killed.wall_s,
        "screened_share": screened_share(whole.output), "parts_kept": kept, "passes": passes,
        "resumed_wall_s": resumed.wall_s, "resumed_peak_rss_mib": resumed.peak_rss_mib, "identical": identical,
    }  # fmt: skip
    info = machine(with_gpus=False)
    print(f"machine: {machine_line(info)}")
    print(f"command: movierec export-recs {model} --out FILE --k {args.k} {' '.join(model_flags(args))}".rstrip())
    print()
    export_rate = "—" if result["export_users_per_s"] is None else f"{result['export_users_per_s']:,.0f}"
    screened = "—" if result["screened_share"] is None else f"{100 * result['screened_share']:.2f} %"
    print("| model | users | k | rows | wall s | export s | users/s (wall) | users/s (export) | catalogue screened "
          "per user | peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {label} | {users:,} | {args.k} | {rows:,} | {whole.wall_s:.1f} | {seconds:.1f} | "
        f"{result['users_per_s']:,.0f} | {export_rate} | {screened} | {whole.peak_rss_mib:,.0f} |"
    )
    print()
    print(
        f"kill and resume: {killed_how} ({args.kill_at:g} of {whole.wall_s:.1f} s), {kept} of {passes} passes kept; "
        f"resumed in {resumed.wall_s:.1f} s (peak RSS {resumed.peak_rss_mib:,.0f} MiB); "
        f"identical: {'yes' if identical else 'no'}"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **result}, indent=1))
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()

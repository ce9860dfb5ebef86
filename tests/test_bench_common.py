"""bench/common.py, the toolkit every bench shares: one recipe table, the child runner (stopped at a line, killed
with what it started at a timeout), the worker protocol, and `time_steps`, which times an Engine alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (bench/common.py)


def test_the_recipes_are_defined_once_and_found_by_either_name():
    assert [r.short for r in common.RECIPES.values()] == ["sasrec", "sse-pt"]
    assert common.parse_recipes("sasrec (d 50),sse-pt") == [common.RECIPES["sasrec"], common.RECIPES["sse-pt"]]
    with pytest.raises(Exception, match="unknown bert; known: sasrec"):
        common.parse_recipes("bert")
    others = [path for path in BENCH.glob("*.py") if path.name != "common.py"]
    for path in others:
        text = path.read_text()
        assert not re.search(r"^RECIPES\s*=|model\.d_item=", text, re.MULTILINE), f"{path.name} repeats a recipe"


def test_first_step_line_is_parsed_and_can_stop_the_child():
    fake = "setup data: x (0.1 s)\nrun abc on cpu\nfirst optimizer step after 12.3 s\nepoch 1 loss 0.5\n"
    assert common.parse_first_step(fake) == pytest.approx(12.3)
    assert common.parse_first_step("first optimizer step after 7 s") == 7.0
    assert common.parse_first_step("no such line") is None
    child = [sys.executable, "-c", "import time; print('first optimizer step after 0.4 s', flush=True); "
             "time.sleep(60)"]  # fmt: skip
    stopped = common.run_child(child, stop_on=common.FIRST_STEP)
    assert stopped.ok and stopped.wall_s < 30, "stopped once the line was printed"
    assert common.parse_first_step(stopped.output) == pytest.approx(0.4) and stopped.peak_rss_mib > 0
    failed = common.run_child([sys.executable, "-c", "import sys; print('fine'); print('ValueError: boom'); "
                               "print('bye'); sys.exit(3)"])  # fmt: skip
    assert failed.status == 3 and failed.why() == "exit 3: ValueError: boom", "the last error-looking line"


def test_a_timeout_kills_the_child_and_what_it_started():
    grandchild = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    started = time.perf_counter()
    finished = common.run_child([sys.executable, "-c", f"{grandchild}; print('waiting', flush=True); time.sleep(60)"],
                                timeout=3)  # fmt: skip
    assert finished.status == "timeout" and finished.why().startswith("timed out after")
    assert time.perf_counter() - started < 30, "the grandchild holding the pipe was killed too"
    assert "waiting" in finished.output


def test_a_worker_answers_each_job_and_reports_the_one_that_raised(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        f"import json, sys\nsys.path.insert(0, {str(BENCH)!r})\nfrom common import work\n\n"
        "def double(job):\n"
        "    if job.get('fail'):\n"
        "        raise ValueError('boom')\n"
        "    return {'double': 2 * job['x']}\n\n"
        "work(json.loads(sys.argv[2]), double)\n"
    )
    finished, results = common.run_worker(script, [{"x": 2}, {"fail": True}, {"x": 5}])
    assert finished.ok, finished.output
    assert [r.get("double") for r in results] == [4, None, 10]
    assert results[1]["error"] == "ValueError: boom" and [r["index"] for r in results] == [0, 1, 2]


def test_time_steps_times_an_engine_alone_without_mlflow(trained_run, tmp_path):
    """In a fresh process: positive rates on the tiny data, neither an MLflow store nor mlflow itself, and the
    attention path its environment chose (what gpu_check's rows report)."""
    overrides = ["model.max_len=20", "train.batch_size=64", "train.num_threads=1"]
    job = common.steps_job(REPO / "configs" / "synthetic.yaml", trained_run.data_dir, overrides, warmup=1, steps=2)
    code = (
        f"import json, sys; sys.path.insert(0, {str(BENCH)!r}); import common; "
        f"r = common.time_job({job!r}); r['mlflow_imported'] = 'mlflow' in sys.modules; print(json.dumps(r))"
    )
    env = {**os.environ, "MOVIEREC_ATTENTION": "unfused"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["tokens_per_s"] > 0 and r["sequences_per_s"] > 0 and r["gflops"] > 0
    assert r["steps"] == 2 and r["steps_per_pass"] >= 2 and r["s_per_pass"] >= r["seconds"]
    assert r["device"] == "cpu" and r["peak_gpu_mib"] is None and r["peak_rss_mib"] > 0 and r["threads"] == 1
    assert r["autocast"] == "none" and r["attention"] == "unfused" and r["optimizer"]
    assert not r["mlflow_imported"] and list(tmp_path.iterdir()) == [], "no MLflow store, no file at all"

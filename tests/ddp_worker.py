"""Run by `torchrun` in test_distributed.py: trains a tiny config, then saves this rank's final weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from movierec.training import distributed
from movierec.training.config import load_config
from movierec.training.run import Run


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = load_config(None, spec["overrides"])
    config.data.path, config.run_dir, config.tracking.uri = spec["data"], spec["run_dir"], spec["uri"]
    run = Run(config, resume=spec.get("resume"))
    run.fit()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(run.engine.model.state_dict(), Path(spec["run_dir"]) / f"weights-rank{rank}.pt")
    distributed.teardown()


if __name__ == "__main__":
    main()

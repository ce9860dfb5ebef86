"""`python -m movierec ...`: what `torchrun -m movierec train ...` runs on every process."""

from movierec.cli import main

raise SystemExit(main())

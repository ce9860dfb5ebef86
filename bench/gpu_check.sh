#!/usr/bin/env bash
# bench/gpu_check.py (see its docstring) with $PYTHON, else the repository's .venv Python, else python3.
py="$(dirname "$0")/../.venv/bin/python"; [ -x "$py" ] || py=python3; exec "${PYTHON:-$py}" "$(dirname "$0")/gpu_check.py" "$@"

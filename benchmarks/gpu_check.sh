#!/usr/bin/env bash
cd "$(dirname "$0")/.." && PY=$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; elif command -v python >/dev/null; then echo python; else echo python3; fi) && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu_check.py "$@"

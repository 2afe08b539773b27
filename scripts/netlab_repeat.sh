#!/usr/bin/env bash
# Runs the NAT-lab test suite (pytest -m netlab tests/netlab) N times in a row and stops at
# the first failure: the proof that the suite does not flake, and the tool to hunt a flake.
#
#   scripts/netlab_repeat.sh [N] [PYTEST ARGS...]      (default N=20; needs root)
#
# Prints one line per run (run number, pass/fail, duration, pytest's summary) and a total.
# After every run it checks that the run left nothing behind: no NAT-lab namespace
# (``vl<pid>x...``), no lab process. A leak counts as a failure. Each run's full output is
# kept in $NETLAB_REPEAT_LOGS (default: a fresh temporary directory, printed at the start);
# a failing run's output is printed in full.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-20}"
shift || true
PY="${VOLUNTEER_VENV:-$ROOT/.venv}/bin/python"
LOGS="${NETLAB_REPEAT_LOGS:-$(mktemp -d /tmp/netlab_repeat.XXXXXX)}"
mkdir -p "$LOGS"
echo "netlab_repeat: $N runs, logs in $LOGS"

lab_leftovers() {
  # What run $1 (its pytest pid) left: namespaces named by tests/netlab/lab.py after that pid
  # (vl<pid>x<n>-...), and lab programs started from this checkout (cwd = $ROOT). Labs of
  # other checkouts running at the same time (a CI run beside this loop) are not counted.
  local owner="${1:-[0-9]+}"
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^vl${owner}x[0-9]+-" || true
  local p
  for p in $(pgrep -f 'tests\.netlab\.(node|dmoe_volunteer|dmoe_trainer|avg_trainer)|volunteer join .*natlab|volunteer join .*natshards' || true); do
    if [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$ROOT" ]; then
      echo "process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"
    fi
  done
}

before="$(lab_leftovers)"
if [ -n "$before" ]; then
  echo "netlab_repeat: NAT-lab leftovers before the first run (another run going on?):"
  echo "$before"
fi
t_all=$(date +%s)
passed=0
for i in $(seq 1 "$N"); do
  log="$LOGS/run$i.txt"
  t0=$(date +%s)
  "$PY" -m pytest -q -rfE -m netlab tests/netlab -p no:cacheprovider "$@" >"$log" 2>&1 &
  run_pid=$!
  wait "$run_pid"
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  summary="$(tail -n 1 "$log")"
  leak="$(lab_leftovers "$run_pid")"
  if [ -n "$leak" ]; then
    echo "run $i/$N: FAIL (leak) ${dt}s  $summary"
    echo "left behind:"
    echo "$leak"
    rc=1
  elif [ "$rc" -ne 0 ] || ! grep -qE '[0-9]+ passed' <<<"$summary" \
      || grep -qE 'failed|error|skipped' <<<"$summary"; then
    echo "run $i/$N: FAIL ${dt}s  $summary"
    cat "$log"
    rc=1
  else
    echo "run $i/$N: pass ${dt}s  $summary"
  fi
  if [ "$rc" -ne 0 ]; then
    echo "netlab_repeat: stopped at run $i after $passed consecutive green runs," \
         "$(( $(date +%s) - t_all ))s in all"
    exit 1
  fi
  passed=$((passed + 1))
done
echo "netlab_repeat: $passed/$N consecutive green runs in $(( $(date +%s) - t_all ))s"

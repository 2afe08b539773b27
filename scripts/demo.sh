#!/usr/bin/env bash
# The quick-start demo: installs volunteer, starts a volunteer node on the bundled `demo`
# experiment (a new swarm on this machine: it announces its experts in the DHT), trains a
# small DMoE classifier on scikit-learn's digits through it (the trainer joins the swarm as a
# client-mode peer and finds the experts by beam search through the DHT; you see the loss
# fall and the dashboard move), then leaves gracefully (records draining, drain, checkpoint).
#
#   scripts/demo.sh [STEPS]
#
# Environment: DEMO_STEPS (default 300), DEMO_HOME (node home to use and keep; default: a
# temporary directory removed at the end), DEMO_DIRECT=1 (skip the DHT: the trainer dials
# the daemon's ZeroMQ endpoint), VOLUNTEER_VENV (see scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS="${1:-${DEMO_STEPS:-300}}"
say() { printf '\n[demo] %s\n' "$*" >&2; }

bash "$ROOT/scripts/setup.sh" demo
VENV="${VOLUNTEER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
VOLUNTEER=("$PY" -m volunteer)

if [ -n "${DEMO_HOME:-}" ]; then
  NODE_HOME="$DEMO_HOME"; KEEP_HOME=1
else
  NODE_HOME="$(mktemp -d -t volunteer-demo.XXXXXX)"; KEEP_HOME=0
fi
WORK="$(mktemp -d -t volunteer-demo-logs.XXXXXX)"
DAEMON_PID=""; TRAINER_PID=""; TAIL_PID=""

cleanup() {
  local rc=$?
  for pid in "$TRAINER_PID" "$TAIL_PID"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  done
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    "${VOLUNTEER[@]}" leave --home "$NODE_HOME" --timeout 10 >/dev/null 2>&1 || kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  if [ "$KEEP_HOME" = 0 ]; then rm -rf "$NODE_HOME"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # no OpenMP busy-waiting next to the network threads
say "preflight: volunteer doctor demo --offline"
"${VOLUNTEER[@]}" doctor demo --offline --home "$NODE_HOME" || say "the doctor found a problem (above); trying anyway"
say "starting a volunteer: volunteer join demo --new-swarm --listen-host 127.0.0.1 --home $NODE_HOME --num-experts 8"
"${VOLUNTEER[@]}" join demo --new-swarm --listen-host 127.0.0.1 --home "$NODE_HOME" --num-experts 8 \
  2>"$WORK/join.log" &
DAEMON_PID=$!

deadline=$((SECONDS + 120))
until "${VOLUNTEER[@]}" status --json --home "$NODE_HOME" >"$WORK/status.json" 2>/dev/null; do
  if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    cat "$WORK/join.log" >&2; say "the volunteer exited before it was ready"; exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    cat "$WORK/join.log" >&2; say "the volunteer was not ready within 120 s"; exit 1
  fi
  sleep 0.2
done
cat "$WORK/join.log" >&2
ENDPOINT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["endpoint"])' "$WORK/status.json")"
MULTIADDR="$("$PY" -c 'import json,sys; print(((json.load(open(sys.argv[1]))["network"] or {}).get("addrs") or [""])[0])' \
  "$WORK/status.json")"

if [ "${DEMO_DIRECT:-0}" = 1 ] || [ -z "$MULTIADDR" ]; then
  say "training a DMoE classifier on scikit-learn digits through $ENDPOINT ($STEPS steps, no DHT)"
  TRAINER_ARGS=(--endpoint "$ENDPOINT")
else
  say "training a DMoE classifier on scikit-learn digits: the trainer joins the swarm through $MULTIADDR and finds the experts in the DHT ($STEPS steps)"
  TRAINER_ARGS=(--bootstrap "$MULTIADDR")
fi
"$PY" -u "$ROOT/scripts/demo_trainer.py" "${TRAINER_ARGS[@]}" --steps "$STEPS" --manifest demo \
  >"$WORK/trainer.log" 2>&1 &
TRAINER_PID=$!
tail -n +1 -f --pid="$TRAINER_PID" "$WORK/trainer.log" &
TAIL_PID=$!

half=$((STEPS / 2))
reached_half() { awk -v h="$half" '/^step [0-9]+ loss/ { if ($2 + 0 >= h) found = 1 } END { exit !found }' "$WORK/trainer.log"; }
until reached_half; do
  kill -0 "$TRAINER_PID" 2>/dev/null || break
  sleep 0.2
done
say "midway: volunteer status --once"
"${VOLUNTEER[@]}" status --once --home "$NODE_HOME"

trainer_rc=0
wait "$TRAINER_PID" || trainer_rc=$?
TRAINER_PID=""
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""
say "after training: volunteer status --once"
"${VOLUNTEER[@]}" status --once --home "$NODE_HOME"
if [ -n "$MULTIADDR" ]; then
  say "the swarm as the DHT shows it: volunteer swarm --home $NODE_HOME"
  "${VOLUNTEER[@]}" swarm --home "$NODE_HOME" || say "volunteer swarm failed (above)"
fi
say "your machine comes first: volunteer pause --for 10m, then volunteer resume"
"${VOLUNTEER[@]}" pause --for 10m --home "$NODE_HOME"
"${VOLUNTEER[@]}" resume --home "$NODE_HOME"

say "leaving gracefully: volunteer leave"
leave_rc=0
"${VOLUNTEER[@]}" leave --home "$NODE_HOME" || leave_rc=$?
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=""
if [ "$trainer_rc" -ne 0 ]; then say "the trainer failed (exit $trainer_rc)"; exit "$trainer_rc"; fi
say "this volunteer's lifetime contribution, signed by its key: volunteer receipt"
"${VOLUNTEER[@]}" receipt --home "$NODE_HOME" || say "volunteer receipt failed (above)"
if [ "$leave_rc" -ne 0 ]; then say "the leave was not clean (exit $leave_rc)"; exit "$leave_rc"; fi
if [ "$KEEP_HOME" = 1 ]; then
  say "done: checkpoints kept in $NODE_HOME; run it again with DEMO_HOME=$NODE_HOME to resume them"
else
  say "done"
fi

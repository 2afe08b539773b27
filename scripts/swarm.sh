#!/usr/bin/env bash
# A local swarm on this machine: N volunteers (`volunteer join demo`, each with its own home)
# and one trainer that finds their experts through the DHT. The first volunteer starts a new
# swarm; the others bootstrap from it, one after another (a burst of joins through one node
# overflows its inbound limit). Midway, the last volunteer leaves: training goes on through
# the others. Each volunteer chooses what to host from what the swarm already serves (unserved
# uids first, then second replicas, downloaded from their holders); the leaver hands the
# uids nobody else holds to the others. At the end every volunteer leaves gracefully.
#
#   scripts/swarm.sh [N] [STEPS]
#
# Environment: SWARM_SIZE (default 3), SWARM_STEPS (default 300), SWARM_EXPERTS (experts per
# volunteer, default 4), SWARM_DIR (homes and logs; default a temporary directory removed at
# the end), VOLUNTEER_VENV (see scripts/setup.sh). Everything listens on 127.0.0.1 only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-${SWARM_SIZE:-3}}"
STEPS="${2:-${SWARM_STEPS:-300}}"
EXPERTS="${SWARM_EXPERTS:-4}"
say() { printf '\n[swarm] %s\n' "$*" >&2; }
if ! [[ "$N" =~ ^[0-9]+$ ]] || [ "$N" -lt 1 ] || [ "$N" -gt 32 ]; then say "N must be 1..32"; exit 2; fi

VENV="${VOLUNTEER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
VOLUNTEER=("$PY" -m volunteer)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" VOLUNTEER_LISTEN_HOST=127.0.0.1
if [ -n "${SWARM_DIR:-}" ]; then DIR="$SWARM_DIR"; KEEP=1; mkdir -p "$DIR"; else DIR="$(mktemp -d -t volunteer-swarm.XXXXXX)"; KEEP=0; fi
PIDS=(); TRAINER_PID=""

cleanup() {
  local rc=$?
  if [ -n "$TRAINER_PID" ] && kill -0 "$TRAINER_PID" 2>/dev/null; then kill "$TRAINER_PID" 2>/dev/null || true; fi
  for i in "${!PIDS[@]}"; do
    if kill -0 "${PIDS[$i]}" 2>/dev/null; then
      "${VOLUNTEER[@]}" leave --home "$DIR/v$i" --timeout 10 >/dev/null 2>&1 || kill "${PIDS[$i]}" 2>/dev/null || true
      wait "${PIDS[$i]}" 2>/dev/null || true
    fi
  done
  if [ "$KEEP" = 0 ]; then rm -rf "$DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

field() {  # field JSON_FILE PYTHON_EXPR_ON_d
  "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

serving_all() {  # serving_all INDEX: ready, hosting experts, and no shard download left
  "${VOLUNTEER[@]}" status --json --home "$DIR/v$1" >"$DIR/v$1.status.json" 2>/dev/null &&
    [ "$(field "$DIR/v$1.status.json" 'int(bool(d["experts"]) and all(h["state"] == "serving" for h in (d["shards"] or {}).get("hosted", {}).values()))')" = 1 ]
}

wait_ready() {  # wait_ready INDEX
  local i=$1 deadline=$((SECONDS + 120))
  until serving_all "$i"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then cat "$DIR/v$i.log" >&2; say "volunteer $i exited"; exit 1; fi
    if [ "$SECONDS" -ge "$deadline" ]; then cat "$DIR/v$i.log" >&2; say "volunteer $i not ready in 120 s"; exit 1; fi
    sleep 0.2
  done
}

BOOT=""
for ((i = 0; i < N; i++)); do
  if [ "$i" = 0 ]; then args=(--new-swarm); else args=(--bootstrap "$BOOT"); fi
  "${VOLUNTEER[@]}" join demo --home "$DIR/v$i" --num-experts "$EXPERTS" "${args[@]}" 2>"$DIR/v$i.log" &
  PIDS+=("$!")
  wait_ready "$i"
  if [ "$i" = 0 ]; then BOOT="$(field "$DIR/v0.status.json" 'd["network"]["addrs"][0]')"; fi
  say "volunteer $i ready: peer $(field "$DIR/v$i.status.json" 'd["network"]["peer_id"]'), experts $(field "$DIR/v$i.status.json" '" ".join(sorted(d["experts"]))')"
done

say "trainer: scripts/demo_trainer.py --bootstrap $BOOT --steps $STEPS"
"$PY" -u "$ROOT/scripts/demo_trainer.py" --bootstrap "$BOOT" --steps "$STEPS" --manifest demo >"$DIR/trainer.log" 2>&1 &
TRAINER_PID=$!
tail -n +1 -f --pid="$TRAINER_PID" "$DIR/trainer.log" &

if [ "$N" -gt 1 ]; then
  half=$((STEPS / 2)); last=$((N - 1))
  until awk -v h="$half" '/^step [0-9]+ loss/ { if ($2 + 0 >= h) f = 1 } END { exit !f }' "$DIR/trainer.log"; do
    kill -0 "$TRAINER_PID" 2>/dev/null || break
    sleep 0.2
  done
  say "midway: volunteer $last leaves; training goes on through the others"
  "${VOLUNTEER[@]}" leave --home "$DIR/v$last" || true
  wait "${PIDS[$last]}" 2>/dev/null || true
fi

trainer_rc=0
wait "$TRAINER_PID" || trainer_rc=$?
TRAINER_PID=""
say "volunteer 0 after training: volunteer status --once --home $DIR/v0"
"${VOLUNTEER[@]}" status --once --home "$DIR/v0"
for ((i = 0; i < N; i++)); do
  if kill -0 "${PIDS[$i]}" 2>/dev/null; then
    say "volunteer $i leaves"
    "${VOLUNTEER[@]}" leave --home "$DIR/v$i" || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  fi
done
if [ "$trainer_rc" -ne 0 ]; then say "the trainer failed (exit $trainer_rc)"; exit "$trainer_rc"; fi
say "done"

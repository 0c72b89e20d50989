#!/usr/bin/env bash
# Quick side-by-side: pgbench directly against PostgreSQL and through both supavisor ports, in
# alternation (A B C A B C ...). Uses `supavisor demo` for a throwaway PostgreSQL + pooler.
# Usage: perf/pgbench-quick.sh [seconds-per-run] [clients] [rounds]
# The full comparison with PgBouncer lives in the performance issue's tooling.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}; C=${2:-10}; R=${3:-3}
BIN=target/release/supavisor
[ -x "$BIN" ] || cargo build --release --bin supavisor
out=$(mktemp); err=$(mktemp)
"$BIN" demo >"$out" 2>"$err" &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$out" "$err"' EXIT
for _ in $(seq 1 200); do grep -q "^transaction mode" "$out" && break; sleep 0.1; done
direct=$(sed -n "s/^PostgreSQL (direct): *psql '\(.*\)'/\1/p" "$out")
txn=$(sed -n "s/^transaction mode: *psql '\(.*\)'/\1/p" "$out")
sess=$(sed -n "s/^session mode: *psql '\(.*\)'/\1/p" "$out")
pgbench -i -s 1 -q "$direct" >/dev/null 2>&1
run() { pgbench -n -T "$T" -c "$C" -j 2 "$@" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
for mode in "-S -M simple" "-S -M extended" "-M extended"; do
  for r in $(seq 1 "$R"); do
    # shellcheck disable=SC2086
    printf '%-16s round %d  direct %9s  transaction %9s  session %9s\n' "$mode" "$r" \
      "$(run $mode "$direct")" "$(run $mode "$txn")" "$(run $mode "$sess")"
  done
done

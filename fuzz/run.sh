#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), one after
# the other, from the committed seeds (fuzz/corpus/<target>/, read-only) and
# the regressions (fuzz/regressions/<target>/). New inputs go to
# fuzz/corpus-work/<target>/ (not committed), crashes to
# fuzz/artifacts/<target>/. Exits non-zero if any target fails.
#
#   fuzz/run.sh [seconds] [target...]
#
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail

cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(startup frames scram rewrite websocket tls)
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus-work/$t" "artifacts/$t"
    echo "=== $t: ${secs}s"
    if ! cargo +nightly fuzz run "$t" "corpus-work/$t" "corpus/$t" "regressions/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/;" \
        "add them to fuzz/regressions/<target>/ once fixed)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a failure"

#!/usr/bin/env bash
# The long fuzz run: tests/test_hardening.py::test_schemathesis_finds_no_server_errors with many
# more examples per operation (CI runs it with 100). Same hooks (tests/fuzz_hooks.py), same servers it
# starts itself (a local hub with tiny models, then ai-server without and with API keys), all four
# schemathesis phases (the keyed server: fuzzing and stateful), every failure listed
# (--continue-on-failure, also in CI). Prints requests per phase and status codes per operation, then
# each failure with the curl line that repeats it.
#
#   scripts/fuzz.sh                    300 examples per operation, both servers: ~28 min on 2 idle cores,
#                                      estimated from what was measured (66 operations, 2026-12-05): CI's
#                                      100 examples take ~7 min open and ~4 min keyed (no coverage phase,
#                                      which is deterministic: the open run's cases again), 50 take 5 min
#                                      open, so ~2.6 s per example past a fixed ~3 min (start-up, coverage)
#   scripts/fuzz.sh 1000               more examples: ~4.3 min more per 100 examples per server
#   FUZZ_SEED=7 scripts/fuzz.sh        another seed (the keyed server uses seed + 1)
#   FUZZ_ONLY=open scripts/fuzz.sh     one server only (open or keyed)
#   FUZZ_REPORT_DIR=/tmp/fuzz          where the reports go (default: a new temporary folder)
#   FUZZ_EXTRA_ARGS='--no-shrink'      more schemathesis options
#
# Each server's folder keeps schemathesis.txt (its full output) and fuzz.ndjson (every request and
# response; `st replay <case id>` needs the same server state, so repeat with the curl line instead).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export FUZZ_MAX_EXAMPLES=${1:-${FUZZ_MAX_EXAMPLES:-300}}
export FUZZ_REPORT_DIR=${FUZZ_REPORT_DIR:-$(mktemp -d -t ai-server-fuzz.XXXXXX)}
select="test_schemathesis_finds_no_server_errors"
[ -n "${FUZZ_ONLY:-}" ] && select="$select and $FUZZ_ONLY"

echo "fuzzing with $FUZZ_MAX_EXAMPLES examples per operation, seed ${FUZZ_SEED:-20261122}; reports in $FUZZ_REPORT_DIR"
start=$(date +%s)
"$PYTHON" -m pytest tests/test_hardening.py -k "$select" -s -p no:cacheprovider --tb=line -q \
  2>&1 | tee "$FUZZ_REPORT_DIR/pytest.txt" |
  grep -E '^fuzz\[|^  [A-Z]|^  [0-9]{3} from |^      curl |^[0-9]+ (passed|failed)|^(FAILED|ERROR) '
status=${PIPESTATUS[0]}

echo
# Schemathesis's own list: timeouts, schema mismatches, one 5xx per operation (above: every distinct 5xx).
for out in "$FUZZ_REPORT_DIR"/*/schemathesis.txt; do
  [ -f "$out" ] || continue
  echo "=== $(basename "$(dirname "$out")"): $(grep -E '^Test cases' -A1 "$out" | tail -1 | sed 's/^ *//')"
  # Each failure: the operation, what went wrong, the status and body, and the curl line.
  sed -n '/^=* FAILURES =*$/,/^=* \(WARNINGS\|SUMMARY\) =*$/p
          /^=* ERRORS =*$/,/^=* \(FAILURES\|WARNINGS\|SUMMARY\) =*$/p' "$out" |
    grep -E '^_{3,} |^- |^\[[0-9]{3}\]|^    `|^    curl|^[A-Z][a-z]+ (Error|Check)|timed out' | cut -c1-1500
done
echo
echo "took $(( $(date +%s) - start )) s; exit status $status (0: no 5xx, no hang, no traceback)"
exit "$status"

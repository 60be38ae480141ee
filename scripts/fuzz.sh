#!/usr/bin/env bash
# Runs every Go fuzz target in the module briefly (FUZZTIME, default 5s),
# on top of its committed seed corpus, which `go test` already runs as
# regular tests.
set -euo pipefail
fuzztime=${FUZZTIME:-5s}
go=${GO:-go}
status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pkg in $($go list ./...); do
	for target in $($go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target ($fuzztime)"
		if ! $go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 2s "$pkg" >"$log" 2>&1; then
			# Go's fuzzer can report "context deadline exceeded" when the
			# fuzz time runs out mid-input, with nothing found; a real
			# finding writes its failing input or shows a panic.
			if grep -q 'context deadline exceeded' "$log" && ! grep -qE 'Failing input written|panic:|--- FAIL: .*\(' <(grep -v 'context deadline exceeded' "$log" | grep -v -- "--- FAIL: ${target} ("); then
				echo "fuzz: $target stopped at its time limit (nothing found)"
				continue
			fi
			cat "$log"
			status=1
		fi
	done
done
exit $status

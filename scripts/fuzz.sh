#!/usr/bin/env bash
# Runs every Go fuzz target in the module briefly (FUZZTIME, default 5s),
# on top of its committed seed corpus, which `go test` already runs as
# regular tests.
set -euo pipefail
fuzztime=${FUZZTIME:-5s}
go=${GO:-go}
status=0
for pkg in $($go list ./...); do
	for target in $($go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target ($fuzztime)"
		if ! $go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 2s "$pkg" >/tmp/kvmckpt-fuzz.log 2>&1; then
			cat /tmp/kvmckpt-fuzz.log
			status=1
		fi
	done
done
exit $status

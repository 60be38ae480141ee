#!/usr/bin/env bash
# Fails when the tests left a QEMU process or a RAM file of the test bed
# behind (each test package checks its own at exit too; this catches what a
# crashed test binary could not).
set -u
left=$(ls /dev/shm/kvmckpt-test-* 2>/dev/null)
procs=$(pgrep -af 'qemu-system-x86_64.*kvmckpt-test-' 2>/dev/null)
if [ -n "$left$procs" ]; then
	echo "leftovers after the tests:"
	[ -n "$left" ] && echo "$left"
	[ -n "$procs" ] && echo "$procs"
	exit 1
fi
echo "no QEMU process or RAM file left behind"

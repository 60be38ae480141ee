#!/usr/bin/env bash
# Builds the test guest's initramfs: busybox, the init script and the
# workload (a static Go binary) and the core tests' process (coretarget, a
# static C binary), as a gzip-compressed newc cpio archive.
#
#   scripts/initramfs.sh WORKLOAD_BINARY OUTPUT CORETARGET_BINARY
set -euo pipefail
workload=$1
out=$2
coretarget=$3
here=$(cd "$(dirname "$0")/.." && pwd)
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "initramfs: $busybox not found: run make deps" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp}
cp "$busybox" "$root/bin/busybox"
cp "$here/internal/workload/initramfs/init" "$root/init"
cp "$workload" "$root/workload"
cp "$coretarget" "$root/coretarget"
chmod 0755 "$root/init" "$root/workload" "$root/coretarget" "$root/bin/busybox"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"

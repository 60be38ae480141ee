#!/usr/bin/env bash
# Idempotent set-up of everything kvmckpt's tests and demo need on a Debian
# bookworm machine (as root): host packages, the guest kernels and a second
# QEMU.
#
#   scripts/deps.sh [FLAVOUR=PACKAGE ...]
#
# Everything downloaded is cached outside git under $KVMCKPT_CACHE (the
# Makefile sets it):
# - kernels/FLAVOUR/vmlinuz, with the package's config and its name beside
#   it, and modules.cpio.gz: the modules the test guest loads (the balloon,
#   a virtio disk, ext4), appended to its initramfs. When the requested build has left the archive, the newest build of
#   the same series and flavour on offer is used instead, and the script
#   says so.
# - qemu/VERSION/: QEMU from bookworm-backports ($QEMU_BACKPORT, default
#   10.0), unpacked beside the system's QEMU 7.2 with its firmware, and
#   qemu/VERSION/bin/qemu-system-x86_64, a wrapper that runs it with its own
#   firmware directories.
# - bin/weed-VERSION: SeaweedFS, the S3-compatible store the object storage
#   tests run on the loopback, built from its Go module (the version is
#   internal/s3test's); a few minutes the first time.
# bookworm-backports is added to apt's sources (never anything newer: apt
# would upgrade libc and QEMU under us). Its packages have priority 100, so
# nothing is upgraded from it unless asked for by version.
set -euo pipefail

cache=${KVMCKPT_CACHE:?KVMCKPT_CACHE is not set: run make deps}
packages=(qemu-system-x86 busybox-static cpio
	# the core tests: a static C program in the guest, read back by gdb
	gcc libc6-dev gdb
	# the guest's modules from its kernel package (scripts/guest-modules.sh)
	kmod xz-utils
	# the test disk (ext4 made on the host)
	e2fsprogs
	# libvirt, for the tests of libvirt domains (--domain, export --format libvirt)
	libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-clients-qemu python3-libvirt)
kernels=("$@")
if [ ${#kernels[@]} -eq 0 ]; then
	kernels=(amd64=linux-image-6.1.0-47-amd64-unsigned cloud-amd64=linux-image-6.1.0-47-cloud-amd64-unsigned)
fi
qemu_series=${QEMU_BACKPORT:-10.0}

log() { echo "deps: $*" >&2; }

here=$(cd "$(dirname "$0")" && pwd)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_update() {
	[ -n "$apt_updated" ] && return
	log "apt-get update"
	sudo_ apt-get update -qq >/dev/null
	apt_updated=1
}

# bookworm-backports in apt's sources, once.
backports=/etc/apt/sources.list.d/kvmckpt-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
	log "adding bookworm-backports to apt's sources ($backports)"
	sudo_ tee "$backports" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
	apt_updated=
	apt_update
fi

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	apt_update
	log "installing ${missing[*]}"
	sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# candidate PACKAGE: prints the version apt would fetch, empty if none.
candidate() {
	apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# newest_like PACKAGE: the newest linux-image package of the same series
# (6.1, 6.12) and flavour (amd64, cloud-amd64) as PACKAGE.
newest_like() {
	local series kflav
	series=$(sed -nE 's/^linux-image-([0-9]+\.[0-9]+)[.-].*/\1/p' <<<"$1")
	kflav=$(sed -nE 's/.*[0-9]-((cloud-|rt-)?amd64)-unsigned$/\1/p' <<<"$1")
	[ -n "$series" ] && [ -n "$kflav" ] || return 0
	apt-cache search --names-only "^linux-image-${series//./\\.}[.-].*-${kflav}-unsigned\$" | awk '{print $1}' |
		grep -E -- "-[0-9][^-]*-${kflav}-unsigned\$|[0-9]+\+deb[0-9]+-${kflav}-unsigned\$" | sort -V | tail -n 1
}

for spec in "${kernels[@]}"; do
	flavour=${spec%%=*}
	pkg=${spec#*=}
	dir=$cache/kernels/$flavour
	if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules.cpio.gz" ] && [ "$(cat "$dir/package" 2>/dev/null)" = "$pkg" ]; then
		continue
	fi
	if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules.cpio.gz" ] && [ -f "$dir/fallback-for" ] && [ "$(cat "$dir/fallback-for")" = "$pkg" ]; then
		log "using $(cat "$dir/package") in place of $pkg (cached fallback)"
		continue
	fi
	[ -n "$(candidate "$pkg")" ] || apt_update
	chosen=$pkg
	if [ -z "$(candidate "$pkg")" ]; then
		chosen=$(newest_like "$pkg")
		if [ -z "$chosen" ]; then
			log "no kernel package $pkg and none of its series and flavour on offer"
			exit 1
		fi
		log "WARNING: $pkg is no longer in the archive; using the newest $chosen instead"
	fi
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	log "downloading $chosen"
	(cd "$tmp" && apt-get download -qq "$chosen" 2>/dev/null)
	dpkg-deb -x "$tmp"/*.deb "$tmp/x"
	mkdir -p "$dir"
	cp "$tmp"/x/boot/vmlinuz-* "$dir/vmlinuz.new"
	cp "$tmp"/x/boot/config-* "$dir/config"
	"$here/guest-modules.sh" "$tmp/x" "$dir/modules.cpio.gz"
	mv "$dir/vmlinuz.new" "$dir/vmlinuz"
	echo "$chosen" >"$dir/package"
	if [ "$chosen" != "$pkg" ]; then echo "$pkg" >"$dir/fallback-for"; else rm -f "$dir/fallback-for"; fi
	rm -rf "$tmp"
	trap - EXIT
	log "kernel $flavour: $dir/vmlinuz ($chosen)"
done

# The backported QEMU, unpacked into the cache: the system keeps bookworm's.
qdir=$cache/qemu/$qemu_series
if [ ! -x "$qdir/bin/qemu-system-x86_64" ]; then
	apt_update
	version=$(apt-cache madison qemu-system-x86 | awk -v s="$qemu_series" '$3 ~ "^1:" s "\\." && /backports/ {print $3; exit}')
	if [ -z "$version" ]; then
		log "no qemu-system-x86 $qemu_series in bookworm-backports"
		exit 1
	fi
	# Its firmware: the newest seabios on offer (backports has the one it
	# needs), and qemu-system-data of the same version.
	bios=$(apt-cache madison seabios | awk '{print $3}' | sort -V | tail -n 1)
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	log "downloading qemu-system-x86 $version"
	(cd "$tmp" && apt-get download -qq "qemu-system-x86=$version" "qemu-system-data=$version" "seabios=$bios" 2>/dev/null)
	# The libraries it links: bookworm's, installed if missing.
	libs=$(apt-cache show "qemu-system-x86=$version" | sed -n 's/^Depends: //p' | tr ',' '\n' |
		sed -E 's/^ *([^ (|]+).*/\1/' | grep -E '^(lib|zlib)' || true)
	need=()
	for l in $libs; do
		dpkg-query -W -f='${Status}' "$l" 2>/dev/null | grep -q 'install ok installed' || need+=("$l")
	done
	if [ ${#need[@]} -gt 0 ]; then
		log "installing ${need[*]} for QEMU $qemu_series"
		sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
	rm -rf "$qdir.new"
	mkdir -p "$qdir.new/bin"
	for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$qdir.new/root"; done
	cat >"$qdir.new/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU $version from bookworm-backports, with its own firmware.
exec "$qdir/root/usr/bin/qemu-system-x86_64" -L "$qdir/root/usr/share/qemu" -L "$qdir/root/usr/share/seabios" "\$@"
WRAP
	chmod 0755 "$qdir.new/bin/qemu-system-x86_64"
	echo "$version" >"$qdir.new/version"
	rm -rf "$qdir"
	mv "$qdir.new" "$qdir"
	rm -rf "$tmp"
	trap - EXIT
	"$qdir/bin/qemu-system-x86_64" --version | head -n 1 | sed 's/^/deps: /' >&2
fi

# SeaweedFS for the object storage tests. `go install module@version`
# refuses a module whose go.mod has replace directives, as this one's has:
# it is built as the main module, from a copy of the module's files.
weed_version=$(sed -n 's/^const Version = "\(.*\)"$/\1/p' "$here/../internal/s3test/s3test.go")
weed="$cache/bin/weed-$weed_version"
if [ ! -x "$weed" ]; then
	log "building SeaweedFS $weed_version (for the S3 tests) into $weed"
	go=${GO:-go}
	dir=$("$go" mod download -json "github.com/seaweedfs/seaweedfs@$weed_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
	[ -d "$dir" ] || { log "go mod download of SeaweedFS $weed_version failed"; exit 1; }
	src=$(mktemp -d "${TMPDIR:-/tmp}/kvmckpt-weed.XXXXXX")
	trap 'rm -rf "$src"' EXIT
	cp -r "$dir/." "$src"
	chmod -R u+w "$src"
	mkdir -p "$cache/bin"
	(cd "$src" && GOFLAGS=-mod=mod "$go" build -trimpath -o "$weed.tmp" ./weed)
	mv "$weed.tmp" "$weed"
	rm -rf "$src"
	trap - EXIT
fi

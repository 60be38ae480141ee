#!/usr/bin/env bash
# Idempotent set-up of everything kvmckpt's tests and demo need on a Debian
# bookworm machine (as root): host packages and the guest kernels.
#
#   scripts/deps.sh [FLAVOUR=PACKAGE ...]
#
# Kernels are cached outside git under $KVMCKPT_CACHE (the Makefile sets it)
# as kernels/FLAVOUR/vmlinuz, with the package's config and its name beside
# it. When the requested build has
# left the archive, the newest linux-image-*-FLAVOUR-unsigned on offer is
# used instead, and the script says so.
set -euo pipefail

cache=${KVMCKPT_CACHE:?KVMCKPT_CACHE is not set: run make deps}
packages=(qemu-system-x86 busybox-static cpio)
kernels=("$@")
if [ ${#kernels[@]} -eq 0 ]; then
	kernels=(amd64=linux-image-6.1.0-47-amd64-unsigned cloud-amd64=linux-image-6.1.0-47-cloud-amd64-unsigned)
fi

log() { echo "deps: $*" >&2; }

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_update() {
	[ -n "$apt_updated" ] && return
	log "apt-get update"
	sudo_ apt-get update -qq >/dev/null
	apt_updated=1
}

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

for spec in "${kernels[@]}"; do
	flavour=${spec%%=*}
	pkg=${spec#*=}
	dir=$cache/kernels/$flavour
	if [ -f "$dir/vmlinuz" ] && [ "$(cat "$dir/package" 2>/dev/null)" = "$pkg" ]; then
		continue
	fi
	if [ -f "$dir/vmlinuz" ] && [ -f "$dir/fallback-for" ] && [ "$(cat "$dir/fallback-for")" = "$pkg" ]; then
		log "using $(cat "$dir/package") in place of $pkg (cached fallback)"
		continue
	fi
	[ -n "$(candidate "$pkg")" ] || apt_update
	chosen=$pkg
	if [ -z "$(candidate "$pkg")" ]; then
		chosen=$(apt-cache search --names-only "^linux-image-.*-${flavour}-unsigned\$" | awk '{print $1}' | sort -V | tail -n 1)
		if [ -z "$chosen" ]; then
			log "no kernel package $pkg and no linux-image-*-${flavour}-unsigned on offer"
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
	mv "$dir/vmlinuz.new" "$dir/vmlinuz"
	echo "$chosen" >"$dir/package"
	if [ "$chosen" != "$pkg" ]; then echo "$pkg" >"$dir/fallback-for"; else rm -f "$dir/fallback-for"; fi
	rm -rf "$tmp"
	trap - EXIT
	log "kernel $flavour: $dir/vmlinuz ($chosen)"
done

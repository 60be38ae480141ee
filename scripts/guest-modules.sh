#!/usr/bin/env bash
# Builds the modules a test guest loads at boot (the balloon, a virtio disk
# and ext4), from an unpacked Debian kernel package, as a gzip-compressed
# newc cpio archive to be appended to the guest's initramfs:
#   lib/modules/VERSION/*.ko   the modules, uncompressed (busybox insmod
#                              hands them to init_module as they are)
#   lib/modules/VERSION/load   their file names in load order
#
#   scripts/guest-modules.sh UNPACKED_PACKAGE OUTPUT
set -euo pipefail
root=$1
out=$2
wanted=(virtio_pci virtio_balloon virtio_blk ext4 crc32c_generic)

depmod=$(command -v depmod || echo /usr/sbin/depmod)
[ -x "$depmod" ] || { echo "guest-modules: depmod not found: run make deps" >&2; exit 1; }
version=$(ls "$root/lib/modules")
[ "$(wc -w <<<"$version")" -eq 1 ] || { echo "guest-modules: not one kernel in $root/lib/modules: $version" >&2; exit 1; }
mods=$root/lib/modules/$version
"$depmod" -b "$root" "$version"

declare -A done_
order=()
# add MODULE_PATH: its dependencies first (modules.dep), then itself.
add() {
	local m=$1 deps d
	[ -n "${done_[$m]:-}" ] && return
	done_[$m]=1
	deps=$(awk -v m="$m:" '$1 == m { $1 = ""; print }' "$mods/modules.dep")
	for d in $deps; do add "$d"; done
	order+=("$m")
}
for w in "${wanted[@]}"; do
	# A module built in (modules.builtin) needs no loading.
	m=$(awk -F: -v w="$w" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n); if (n == w) { print $1; exit } }' "$mods/modules.dep")
	if [ -n "$m" ]; then add "$m"; fi
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dst=$stage/lib/modules/$version
mkdir -p "$dst"
: >"$dst/load"
for m in "${order[@]}"; do
	name=$(basename "$m")
	case $name in
	*.ko.xz) xz -dc "$mods/$m" >"$dst/${name%.xz}"; name=${name%.xz} ;;
	*.ko.zst) zstd -qdc "$mods/$m" >"$dst/${name%.zst}"; name=${name%.zst} ;;
	*.ko) cp "$mods/$m" "$dst/$name" ;;
	*) echo "guest-modules: unknown module file $m" >&2; exit 1 ;;
	esac
	echo "$name" >>"$dst/load"
done
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"
echo "guest-modules: $version: $(tr '\n' ' ' <"$dst/load")" >&2

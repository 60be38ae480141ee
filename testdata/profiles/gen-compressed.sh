#!/bin/sh
# Regenerates the compressed-payload fixtures used by profiles tests.
# payload.bin is deterministic x86-like data: text, zero runs and CALL/JMP
# (0xe8/0xe9) instructions with 32-bit operands, so that the xz x86 BCJ
# filter has work to do. Each payload.bin.<fmt> is compressed the way the
# kernel's scripts/Makefile.lib compresses vmlinux.bin: the stream, then
# for all formats but gzip the uncompressed size as 32-bit little endian
# (size_append).
# Needs python3, gzip, bzip2, xz (also provides lzma), lz4, zstd.
set -eu
cd "$(dirname "$0")"
python3 - <<'PY'
import struct
out = bytearray()
x = 12345
for i in range(2048):
    x = (x * 1103515245 + 12345) & 0x7fffffff
    k = x % 5
    if k == 0:
        out += b"\xe8" + struct.pack("<i", (x >> 8) % 65536 - 32768)
    elif k == 1:
        out += b"\xe9" + struct.pack("<i", -((x >> 4) % 4096))
    elif k == 2:
        out += b"kallsyms_%d " % (x % 97)
    elif k == 3:
        out += bytes(x % 13)
    else:
        out += b"\x48\x89\xe5\x55\xc3"
open("payload.bin", "wb").write(out)
PY
size() { python3 -c 'import os,struct,sys; sys.stdout.buffer.write(struct.pack("<I", os.path.getsize("payload.bin")))'; }
gzip -n -9 -c payload.bin > payload.bin.gzip
{ bzip2 -9 -c payload.bin; size; } > payload.bin.bzip2
{ lzma -9 -c payload.bin; size; } > payload.bin.lzma
{ xz --check=crc32 --x86 --lzma2=dict=1MiB -c payload.bin; size; } > payload.bin.xz
{ xz --check=crc64 -c payload.bin; size; } > payload.bin.xz-crc64
{ lz4 -l -9 -c payload.bin; size; } > payload.bin.lz4
{ zstd -19 -q -c payload.bin; size; } > payload.bin.zstd

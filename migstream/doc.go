// Package migstream reads QEMU's pre-copy migration stream as it is
// written and filters it: it drops the page records of chosen RAM blocks,
// reporting each page they named, and passes on everything else, so that
// the rest of the stream (the device state, the pages of the small RAM
// blocks QEMU owns) can be loaded by a QEMU whose RAM was filled another
// way.
//
// # The stream
//
// The format is QEMU's (migration/savevm.c, migration/ram.c; the reader
// scripts/analyze-migration.py). Integers are big endian.
//
//	magic "QEVM" (be32 0x5145564d), version be32 3
//	configuration  0x07, be32 len, machine type [len],
//	               then subsections: 0x05, u8 len, name, be32 version, fields
//	sections       0x01 START / 0x04 FULL: be32 id, u8 len, idstr, be32 instance, be32 version, body
//	               0x02 PART  / 0x03 END:  be32 id, body
//	               each optionally followed by a footer 0x7e, be32 id
//	commands       0x08, be16 command, be16 len, data [len]
//	end            0x00, then optionally 0x06, be32 len, JSON description
//
// The body of the "ram" section is a list of records, each a be64 of a
// page's byte offset in its block ORed with flags, ending with one that
// has RAM_SAVE_FLAG_EOS. A record names its block (u8 len, idstr) unless
// it has RAM_SAVE_FLAG_CONTINUE, which means the block of the record
// before. RAM_SAVE_FLAG_ZERO is followed by one byte (the page's fill),
// RAM_SAVE_FLAG_PAGE by the page. The START section's first record,
// RAM_SAVE_FLAG_MEM_SIZE, carries the RAM's total size and is followed by
// the list of blocks (u8 len, idstr, be64 size each) that adds up to it.
//
// A pre-copy stream is: the header, the configuration, a START section
// for each iterable device (here only "ram"), PART sections while the
// guest runs, and once it is stopped an END section for each, then a FULL
// section per device (the device state, which only its device can parse:
// no length is written), then the end. Other sections interleaved with
// ram's before its END (block migration, dirty bitmaps, VFIO, early
// device state) are not supported: their bodies have no length either.
//
// # Output
//
// [Filter] writes the header, the configuration and the ram START section
// as they came; drops the PART sections; writes the END section with the
// last content of every page of the kept blocks, collected from all the
// ram sections, then EOS; and passes the rest (commands, device sections,
// the end) through unchanged. The pages of a kept block are QEMU's small
// RAM (firmware, ROMs, video RAM): their total size is bounded by
// [Options].MaxKept.
//
// For `kvmckpt export`, the same pass can read a stream written with
// x-ignore-shared (each listed block followed by a be64 guest-physical
// address), write it as a stock stream (no address, the capability out
// of the configuration: what QEMU writes with it off, and loads with no
// capability set), and insert page records of the caller's into a PART
// section after ram's START ([Options].Insert).
//
// # Trust model
//
// The stream is untrusted input, as it comes from a QEMU process that
// runs the guest. Every length is checked before use, nothing is
// allocated by a size read from the stream beyond the bounds of [Options]
// and [MaxBlocks], and a malformed stream is an error wrapping
// [ErrFormat], never a panic.
package migstream

// Package writer writes and reads kvmckpt checkpoint files. This comment is
// the format specification; [FormatVersion] is the newest version it
// describes.
//
// A checkpoint holds the guest pages that were in use when a KVM/QEMU guest
// was paused, read from the host mapping of the guest's RAM files (QEMU
// memory-backend-file with share=on), and QEMU's device state, the
// migration stream QEMU writes with RAM excluded (about 1 MiB). Pages not
// saved (free, zero, holes) are restored as the fill byte.
//
// # Layout
//
// All integers are little endian. All checksums are CRC-32C (Castagnoli,
// the polynomial of iSCSI and ext4 metadata, computed by the SSE4.2 crc32
// instruction). "crc" below is the CRC-32C of the bytes of its section that
// precede it. This is the layout of version 1; version 2, an encrypted
// file, has a longer header and its sections sealed (see Encryption).
//
//	offset
//	0   +---------------------------------------------------+
//	    | Header                                            |
//	    |   magic      [8]byte  "KVMCKPT\x00"               |
//	    |   version    uint32   1                           |
//	    |   bodyLen    uint32   <= 1 MiB                    |
//	    |   body       [bodyLen]byte, JSON (below)          |
//	    |   crc        uint32   of magic..body              |
//	B   +---------------------------------------------------+
//	    | Used-page bitmap                                  |
//	    |   pages      uint64   = body.pages.total          |
//	    |   words      [ceil(pages/64)]uint64               |
//	    |              page p is bit p%64 of word p/64      |
//	    |   crc        uint32                               |
//	C   +---------------------------------------------------+
//	    | Chunk 0      stored bytes, raw or an LZ4 block    |
//	    | Chunk 1                                           |
//	    | ...          (no padding between chunks)          |
//	    | Chunk K-1                                         |
//	I   +---------------------------------------------------+
//	    | Chunk index  K entries of 32 bytes (below)        |
//	    |   crc        uint32                               |
//	D   +---------------------------------------------------+
//	    | Device state devLen bytes, QEMU migration stream  |
//	    |   crc        uint32                               |
//	T   +---------------------------------------------------+
//	    | Trailer, 48 bytes                                 |
//	    |   0  indexOff   uint64  I                         |
//	    |   8  indexLen   uint64  32*K (without its crc)    |
//	    |  16  devOff     uint64  D                         |
//	    |  24  devLen     uint64  (without its crc)         |
//	    |  32  fileCRC    uint32  of bytes [0, T)           |
//	    |  36  crc        uint32  of trailer bytes [0, 36)  |
//	    |  40  magic      [8]byte "KVMCKPT\x00"             |
//	    +---------------------------------------------------+ EOF = T+48
//
// The sections follow each other without gaps, so every offset is implied
// by the lengths before it; the trailer's offsets let a reader find the
// index and device state without reading the chunks, and a reader checks
// that they agree with the lengths.
//
// # Pages and chunks
//
// The RAM regions of the header are concatenated in order, and their pages
// numbered from 0: page p of the checkpoint is byte offset p*page_size of
// that concatenation, so for a single region it is the offset in the RAM
// file. Bit p of the bitmap is set if page p is saved. pages.saved is the
// number of set bits, S.
//
// The saved pages, in ascending page order, are cut into K = ceil(S/N)
// chunks of N = chunk_pages pages; the last chunk may be shorter. A chunk
// is the concatenation of its pages (rawLen = pages*page_size bytes),
// stored either as is (encoding 0, storedLen = rawLen) or as one LZ4 block
// (encoding 1, https://github.com/lz4/lz4/blob/dev/doc/lz4_Block_format.md,
// no frame, no dictionary) that decodes to exactly rawLen bytes. A writer
// stores a chunk raw when LZ4 does not save at least 1/16 of it. Chunks are
// independent, so a reader can decode them in parallel and in any order.
//
// Index entry i describes chunk i:
//
//	 0  offset     uint64  file offset of the stored bytes
//	 8  firstPage  uint64  page number of the chunk's first page
//	16  rawLen     uint32  pages in the chunk * page_size
//	20  storedLen  uint32  bytes stored
//	24  crc        uint32  CRC-32C of the stored bytes
//	28  encoding   uint8   0 raw, 1 LZ4 block
//	29  reserved   [3]byte zero
//
// The page list of chunk i starts at firstPage, which must be saved page
// number i*N in page order, and continues through the next set bits of the
// bitmap. The offset of chunk 0 is C and each next chunk starts where the
// previous one ends; the last one ends at I.
//
// # Header body
//
// The body is a JSON object ([Header]); unknown members are ignored, so
// that members can be added without a new version:
//
//	{
//	  "page_size": 4096,          // only 4096 in version 1
//	  "chunk_pages": 256,         // N, 1..4096
//	  "compression": "lz4",       // "lz4" or "none" (every chunk raw)
//	  "fill_byte": 0,             // value of every byte of unsaved pages
//	  "regions": [{               // RAM backends, in bitmap order
//	    "id": "pc.ram",           // QEMU memory backend id
//	    "size": 4294967296,       // bytes, a multiple of page_size
//	    "mem_path": "/dev/shm/vm1-ram",   // at the source, informative
//	    "mappings": [{"gpa": 0, "offset": 0, "size": 3221225472},
//	                 {"gpa": 4294967296, "offset": 3221225472, "size": 1073741824}]
//	  }],
//	  "pages": {"total": 1048576, "saved": 151234, "free_buddy": 830000,
//	            "free_pcp": 1200, "zero": 66000, "hole": 0},
//	  "kernel_banner": "Linux version 6.1.0-47-amd64 ...",
//	  "profile": "6.1.0-47-amd64-3f2a9c1d",
//	  "qemu_version": "9.2.0", "machine_type": "pc-q35-9.2",
//	  "command_line": ["qemu-system-x86_64", "-machine", "q35", ...],
//	  "created": "2025-06-01T12:00:00Z",
//	  "device_state_form": "filtered"   // absent: "x-ignore-shared"
//	}
//
// pages.total is the sum of the region sizes over page_size and
// pages.saved the bitmap's population; the other counts are informative.
//
// device_state_form says how the device state leaves the regions' RAM
// out. Absent (the form of every file before live checkpoints), QEMU
// wrote the stream with its x-ignore-shared capability on, which leaves
// shared RAM out; load it with the capability on. "filtered": QEMU wrote
// it with the capability off and kvmckpt dropped the page records of the
// regions (package migstream), so the ram section names every block but
// carries pages only of QEMU's own small ones; load it with the
// capability off (QEMU refuses a stream whose capability differs from
// its own). A reader refuses a form it does not know.
// A mapping says that guest-physical [gpa, gpa+size) is region bytes
// [offset, offset+size).
//
// # Version 3: placed chunks (live checkpoints)
//
// A live checkpoint writes pages while the guest runs and rewrites those
// it changes, before it knows which pages end up saved (see [Live]).
// Version 3 is version 1 with three rules relaxed and one part dropped:
//
//   - The header body may end in JSON white space (spaces): the writer
//     reserves room for it, and for the bitmap, at the start of the file,
//     and fills both in last.
//   - The chunk area C starts at the first multiple of 4096 at or after
//     the end of the bitmap's CRC; the bytes before it are zero.
//   - Chunks lie anywhere in [C, index offset), each at a multiple of 4096,
//     in any order, with gaps between them (holes punched where a chunk
//     was replaced: no stale copy of a page is left in the file), and no
//     two overlapping. In index order, chunk i holds rawLen/page_size
//     saved pages (1 to chunk_pages) starting at firstPage, which must be
//     the first saved page that no earlier chunk holds; together the
//     chunks hold every saved page once. The number of chunks is
//     indexLen/32, from at least ceil(saved/chunk_pages) to at most saved.
//   - fileCRC is 0 and not checked: a whole-file checksum would have to
//     be computed over the gaps, after the last rewrite, in the guest's
//     pause. Every part a reader uses keeps its own CRC.
//
// A chunk stored raw may be rewritten in place page by page while the
// file is written (its CRC in the index is of its final bytes): the
// format does not see it. Everything else is as in version 1; a version
// 3 file is never encrypted.
//
// # Version 4: page hashes and parents (incremental checkpoints)
//
// Version 4 is version 1, or version 3 if the header body has "layout":
// "placed", with a chain section between the device state and the
// trailer, and two header members:
//
//	"page_hash": "xxh3-128",    // the hash of the table below
//	"parent": {"id": "<64 hex digits>", "name": "base.kvmckpt", "depth": 1}
//
// The chain section is two parts, each followed by its CRC, back to back:
//
//	D   in-use bitmap    as the bitmap of version 1: the pages in use
//	    page hashes      16 bytes per page stored (the first bitmap's), in
//	                     page order: XXH3-128 of the page (low 64 bits
//	                     first, each half little endian; package pagehash)
//	T   trailer
//
// so D starts at devOff+devLen+4, and the hashes end where the trailer
// begins; pages.in_use in the header is D's population. The hash of a
// page in use that the file does not store is the one its parent gives
// for the page, or the hash of a fill page if the parent does not have
// it in use: so a chain knows the hash of every page it restores, and a
// child's file grows by 16 bytes per page it stores, not per page in use. The bitmap of
// version 1, at the start of the file, becomes the bitmap of the pages
// stored in this file, a subset of D; pages.saved counts it, and the
// chunks hold those pages as in version 1.
//
// A page p of the guest at this checkpoint is: the fill byte if p is not
// in D; the stored page if p is in the first bitmap; otherwise the page p
// its parent restores (which is the fill byte if p is not in the parent's
// D). A file without a parent stores every page of D. A restore takes
// each page from the newest link that stores it, provided every newer
// link has it in use, so that no page is written twice (package writer's
// Chain).
//
// The parent is named by its identity, id: the SHA-256 of its header
// section (fixed part, body and CRC, as stored), the CRC of its bitmap,
// its index section with its CRC, the CRC of its device state, in
// version 4 the CRCs of its two chain parts, and its trailer, in that
// order. Every chunk's CRC is in the index, and the other parts are
// covered by their CRCs, so any change to the parent changes its id: a
// reader compares the id of the file it found with the one the child
// names and refuses another. name is where the writer found the parent,
// to look for beside the child; depth is 1 plus the parent's depth (0 for
// a file without a parent), at most [MaxChainDepth]: a reader checks the
// depths link by link, which also rules out cycles. All links have the
// same regions, page size and fill byte. A version 4 file is never
// encrypted. A live checkpoint with a parent is a version 4 file with
// "layout": "placed": its chunks are placed as in version 3, and its
// chain section follows the device state as here ([Live.SetInUse]).
//
// The page hashes let the next checkpoint find what changed without
// reading this one: it stores the pages in use whose hash differs from
// the hash its parent gives for them (or from the hash of a fill page for
// a page the parent does not have in use). A file without a parent may be
// of version 4 too, to keep its hashes. A parent of version 1, 2 or 3
// has none; they are computed from its chunks.
//
// # Versions
//
// version is 1 for a file without encryption, 2 for an encrypted one, 3
// for a live checkpoint and 4 for one with page hashes (an incremental
// checkpoint, or any checkpoint kvmckpt saves without a key, so that it
// can be a parent); a [Writer] writes 1 unless told otherwise
// ([Options].PageHashes, InUse), so that version 1 readers read it. A
// reader rejects a higher version than it knows with an error wrapping
// [ErrNewerVersion] before looking past the version field, as a later
// version may change anything after it; so a version 1 reader never takes
// ciphertext for pages.
//
// # Limits
//
// Header body at most [MaxHeaderBody] bytes as stored (sealed, in version
// 2); at most [MaxRegions] regions
// of at most [MaxMappings] mappings; at most [MaxPages] pages in all;
// chunk_pages at most [MaxChunkPages]; storedLen at most the LZ4 bound of
// rawLen. The device state is at most [Options].MaxDeviceState bytes when
// written (default 4 GiB), and is only bounded by the file size when read,
// as it is streamed and never held in memory.
//
// # Encryption
//
// A file written with a key ([Options].Key, [KeySize] bytes, see
// [LoadKeyFile]) is version 2: the layout above, with every part but the
// trailer sealed with AES-256-GCM (NIST SP 800-38D, 16-byte tags). Its
// header has a clear part of 84 bytes:
//
//	 0  magic     [8]byte   "KVMCKPT\x00"
//	 8  version   uint32    2
//	12  bodyLen   uint32    stored length of the body, tag included
//	16  cipher    uint32    1: AES-256-GCM, keys by HKDF-SHA256
//	20  salt      [32]byte  random, new for every file
//	52  keyCheck  [32]byte  see Keys
//	84  body      [bodyLen]byte, the JSON body, sealed
//	    crc       uint32    of magic..body
//
// Keys. HKDF-SHA256 (RFC 5869) of the user's key, with the salt and the
// info "kvmckpt v2", gives 64 bytes: the file key, the AES-256 key of every
// message in the file, then keyCheck. A reader derives both and compares
// keyCheck before it opens anything, so that a wrong key is reported as
// [ErrWrongKey], not as corruption. keyCheck tells nothing of the file
// key (the HKDF output blocks are independent), and a key of 256 random
// bits cannot be guessed with its help.
//
// Messages. Every sealed message has a nonce of its own, the 12 bytes
//
//	0  part    uint32  1 header, 2 bitmap, 3 chunk, 4 index, 5 device state
//	4  number  uint64  the chunk's number, or the block's in its section
//
// unique within the file; as the salt makes the file key unique to the
// file, no key and nonce pair is ever used twice. The header body is one
// message, number 0, with the 84 clear bytes as additional data. Every
// other message has the 42 bytes of additional data
//
//	 0  context  [32]byte  SHA-256 of the 84 clear bytes and the plain body
//	32  part     uint8
//	33  number   uint64
//	41  final    uint8     1 for a chunk and the last block of a section
//
// which bind it to the header, its position and, for blocks, to the end
// of its section, so that a section cut short at a block boundary is
// detected. (The bitmap need not be in the context: sealed itself, it
// cannot be changed either.) Each chunk is one message: the chunk stored as in version 1
// (raw, or an LZ4 block), then sealed; storedLen includes the tag, so a raw
// chunk stores rawLen+16 bytes. The bitmap, the index and the device state
// are each cut into blocks of 1 MiB of content, the last one shorter (an
// empty section is one empty block), each sealed as a message: n bytes of
// content take n + 16*max(1, ceil(n/2^20)) bytes. The trailer's indexLen
// and devLen are these stored lengths. Everything else is as in version 1:
// in particular the CRCs, of the stored bytes; the chunks' CRCs are in the
// (sealed) index. Compression comes before sealing, as ciphertext does not
// compress.
//
// A reader checks a part's CRC before it opens it, so an accident shows as
// a CRC mismatch ([ErrCorrupt]) and a deliberate change with the CRCs made
// to match as a failed authentication ([ErrAuthFailed], which wraps
// ErrCorrupt). The device state, streamed, is the exception: each block is
// authenticated as it is read, the CRC at the end.
//
// # Trust model
//
// A checkpoint file is untrusted input: it may be truncated, corrupted, or
// crafted. A [Reader] checks every length and offset against the file size
// and the limits above before it uses or allocates by it, walks no list
// whose length it has not bounded, and verifies each part's checksum
// before using that part: [Open] checks the header, bitmap, trailer and
// index; chunks are checked when read, the device state at the end of its
// stream, and [Reader.Verify] checks all of them and the whole-file
// checksum. Every problem is reported as a [*FormatError] naming the part
// (header, bitmap, chunk N, index, device state, trailer) and wrapping
// [ErrCorrupt], [ErrTruncated], [ErrBadMagic] or [ErrNewerVersion], or,
// for encrypted files, [ErrAuthFailed], [ErrEncrypted], [ErrNotEncrypted]
// or [ErrWrongKey]; nothing in a malformed file makes a Reader panic.
//
// CRC-32C detects accidents, not tampering: anyone who can write the file
// can forge a consistent one. The file holds the guest's memory, secrets
// included, so the writer creates it with mode 0600.
//
// Encryption is against someone who gets the file but not the key: a
// copied disk or backup, a shared checkpoint directory. To them, it keeps
// secret the pages, the device state, the header body (the kernel banner,
// the QEMU command line, which may hold passwords, the RAM file paths),
// the bitmap of saved pages and the index; and it makes any change to
// those parts detectable, including moving chunks or blocks to other
// positions or files and cutting sections short. A reader given a key
// accepts only a file encrypted under it ([ErrNotEncrypted],
// [ErrWrongKey]), so a forged plain file cannot pass for an encrypted one;
// a reader without a key refuses an encrypted file ([ErrEncrypted]).
//
// It does not hide that the file is a checkpoint, nor the sizes: of the
// file, the header body, the bitmap (so the guest's RAM size), the index
// (so the number of chunks, about the number of saved pages), the stored
// chunks (so how well the memory compressed) and the device state. As
// compression comes first, someone who can both put data into the guest
// and see the sizes of many of its checkpoints can learn something of the
// memory near that data, as in the CRIME attack on TLS; use
// [CompressionNone] where that matters. It does not stop someone who can
// write the files from replacing a checkpoint with an older one sealed
// under the same key, or deleting it. The trailer and the CRCs are not
// authenticated, and need not be: they only locate and check parts that
// are. The key, and the file key derived from it, are in the memory of
// the process that writes or reads the file.
//
// Checking an encrypted file needs the key: there is no Reader without
// it, and so no [Reader.Verify]. With the key, Verify authenticates every
// part.
//
// # Writing
//
// A [Writer] writes into a temporary file beside the target and renames it
// over the target in [Writer.Commit], after fsync of the file and before
// fsync of the directory, so a crash or error leaves either the old file
// or the complete new one. See [Create] and [CleanStale].
//
// Where the file system allows it, the file is written with O_DIRECT in
// aligned 4 MiB blocks (the last, partial block without): a checkpoint is
// written once and not read back soon, and page-cache write-back throttles
// a writer of hundreds of MiB to a fraction of the disk's speed on some
// hosts. The fsync before the rename still flushes the disk's own cache.
package writer

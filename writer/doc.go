// Package writer writes and reads kvmckpt checkpoint files. This comment is
// the format specification; [FormatVersion] is the version it describes.
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
// precede it.
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
//	  "created": "2025-06-01T12:00:00Z"
//	}
//
// pages.total is the sum of the region sizes over page_size and
// pages.saved the bitmap's population; the other counts are informative.
// A mapping says that guest-physical [gpa, gpa+size) is region bytes
// [offset, offset+size).
//
// # Versions
//
// version is 1. A reader rejects a higher version with an error wrapping
// [ErrNewerVersion] before looking past the version field, as a later
// version may change anything after it.
//
// # Limits
//
// Header body at most [MaxHeaderBody] bytes; at most [MaxRegions] regions
// of at most [MaxMappings] mappings; at most [MaxPages] pages in all;
// chunk_pages at most [MaxChunkPages]; storedLen at most the LZ4 bound of
// rawLen. The device state is at most [Options].MaxDeviceState bytes when
// written (default 4 GiB), and is only bounded by the file size when read,
// as it is streamed and never held in memory.
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
// [ErrCorrupt], [ErrTruncated], [ErrBadMagic] or [ErrNewerVersion];
// nothing in a malformed file makes a Reader panic.
//
// CRC-32C detects accidents, not tampering: anyone who can write the file
// can forge a consistent one. The file holds the guest's memory, secrets
// included, so the writer creates it with mode 0600.
//
// TODO(encryption): version 2 may add encryption at rest: a random
// per-file salt in the header, AES-256-GCM per chunk and for the device
// state with a nonce derived from the salt and the chunk number, and the
// header as additional authenticated data.
//
// # Writing
//
// A [Writer] writes into a temporary file beside the target and renames it
// over the target in [Writer.Commit], after fsync of the file and before
// fsync of the directory, so a crash or error leaves either the old file
// or the complete new one. See [Create] and [CleanStale].
package writer

package writer

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"iter"
	"sort"
	"strings"
	"time"

	"github.com/pierrec/lz4/v4"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// FormatVersion is the newest version of the format, which this package
// reads and writes. It writes version 1 for a checkpoint without a key and
// version 2, which adds encryption, for one with a key, so that readers
// that know only version 1 go on reading the files they can.
const FormatVersion = 4

// The format versions.
const (
	versionPlain   = 1 // no encryption
	versionSealed  = 2 // encrypted: AES-256-GCM
	versionPlaced  = 3 // chunks placed anywhere: live checkpoints
	versionChained = 4 // page hashes, and a parent: incremental checkpoints
)

// MaxChainDepth bounds the parents of a checkpoint: the links a restore
// follows before it reaches a checkpoint without a parent.
const MaxChainDepth = 64

// LayoutPlaced is the [Header].Layout of a version 4 file whose chunks
// are placed as in version 3.
const LayoutPlaced = "placed"

// placedAlign is the alignment of the chunk area, and of every chunk a
// [Live] writer places, in a version 3 file.
const placedAlign = 4096

// alignUp rounds n up to a multiple of placedAlign.
func alignUp(n int64) int64 { return (n + placedAlign - 1) &^ (placedAlign - 1) }

// Limits of the format; see the package documentation.
const (
	// PageSize is the only page size of version 1.
	PageSize = 4096
	// MaxHeaderBody bounds the JSON header body.
	MaxHeaderBody = 1 << 20
	// MaxRegions bounds the number of RAM regions.
	MaxRegions = 256
	// MaxMappings bounds the number of guest-physical mappings of a region.
	MaxMappings = 256
	// MaxPages bounds the total number of pages, 256 TiB of 4 KiB pages.
	MaxPages = 1 << 36
	// MaxChunkPages bounds the pages per chunk, so a chunk is at most
	// 16 MiB uncompressed.
	MaxChunkPages = 4096
	// DefaultChunkPages is the chunk size of [Create] unless
	// [Options].ChunkPages says otherwise: 1 MiB, large enough for LZ4 to
	// find matches and for I/O to be efficient, small enough that a few
	// per core stay in cache.
	DefaultChunkPages = 256
	// DefaultMaxDeviceState bounds the device state unless
	// [Options].MaxDeviceState says otherwise.
	DefaultMaxDeviceState = 4 << 30
)

var magic = [8]byte{'K', 'V', 'M', 'C', 'K', 'P', 'T', 0}

// Sizes of the fixed parts of the format.
const (
	fixedHeaderLen = 16 // magic, version, bodyLen
	crcLen         = 4
	indexEntryLen  = 32
	trailerLen     = 48
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Compression says how the writer stores chunks.
type Compression string

const (
	// CompressionLZ4 stores each chunk as an LZ4 block, or raw where that
	// saves less than 1/16 of it.
	CompressionLZ4 Compression = "lz4"
	// CompressionNone stores every chunk raw.
	CompressionNone Compression = "none"
	// CompressionAuto is a writer's choice, not a stored one: each chunk
	// goes as an LZ4 block when the disk has enough queued to stay busy
	// while the chunk is compressed, raw when the disk would wait for it
	// (see [Writer.WritePages]). The file says "lz4": its chunks are
	// those of a CompressionLZ4 file.
	CompressionAuto Compression = "auto"
)

// Encoding is how one chunk is stored.
type Encoding uint8

const (
	// EncodingRaw is a chunk stored as is.
	EncodingRaw Encoding = 0
	// EncodingLZ4 is a chunk stored as one LZ4 block.
	EncodingLZ4 Encoding = 1
)

func (e Encoding) String() string {
	switch e {
	case EncodingRaw:
		return "raw"
	case EncodingLZ4:
		return "lz4"
	}
	return fmt.Sprintf("Encoding(%d)", uint8(e))
}

// Header describes a checkpoint: its body is the JSON header of the file.
// Fields marked "set by the writer" are ignored in the argument of
// [Create].
type Header struct {
	// PageSize is the page size in bytes; 0 in [Create] means [PageSize],
	// the only value allowed.
	PageSize uint32 `json:"page_size"`
	// ChunkPages is the number of pages per chunk. Set by the writer.
	ChunkPages uint32 `json:"chunk_pages"`
	// Compression is how chunks were stored. Set by the writer.
	Compression Compression `json:"compression"`
	// FillByte is the value of every byte of the pages not saved: 0, or
	// for example 0xaa for a guest booted with page poisoning, which fills
	// freed pages with PAGE_POISON (include/linux/poison.h).
	FillByte uint8 `json:"fill_byte"`
	// Regions are the guest's RAM backends. The bitmap covers their pages,
	// concatenated in this order.
	Regions []Region `json:"regions"`
	// Pages counts pages by what the checkpointer decided about them.
	Pages PageCounts `json:"pages"`

	KernelBanner string `json:"kernel_banner,omitempty"`
	// Profile names the kernel profile used to find free pages.
	Profile     string `json:"profile,omitempty"`
	QEMUVersion string `json:"qemu_version,omitempty"`
	MachineType string `json:"machine_type,omitempty"`
	// CommandLine is the source QEMU's argv.
	CommandLine []string `json:"command_line,omitempty"`
	// Created is when the checkpoint was taken; if zero in [Create], the
	// writer sets it to the current time.
	Created time.Time `json:"created"`
	// DeviceStateForm says how the device state leaves out the regions'
	// RAM: "" (DeviceStateIgnoreShared), or DeviceStateFiltered.
	DeviceStateForm string `json:"device_state_form,omitempty"`
	// LibvirtDomain and LibvirtXML name the libvirt domain the
	// checkpoint was saved from and hold its XML (virsh dumpxml
	// --migratable), for a libvirt save image of it; empty for a QEMU
	// not managed by libvirt.
	LibvirtDomain string `json:"libvirt_domain,omitempty"`
	LibvirtXML    string `json:"libvirt_xml,omitempty"`
	// KernelPGD is the guest-physical address of the guest kernel's own
	// top-level page table (init_top_pgt), and LA57 whether it has five
	// levels: where a reader of the checkpoint as guest memory finds the
	// kernel (`kvmckpt ps FILE`). Zero when the kernel was not found.
	KernelPGD uint64 `json:"kernel_pgd,omitempty"`
	LA57      bool   `json:"la57,omitempty"`
	// CPUs are the vCPUs' registers at the pause, for a core of a thread
	// that was running (`kvmckpt core FILE`); empty when the kernel was
	// not found.
	CPUs []CPU `json:"cpus,omitempty"`
	// BalloonTarget is the guest's memory size (the balloon target, in
	// bytes) before a squeeze inflated its balloon for the save: a
	// restore that resumes the guest puts the balloon back there. 0 when
	// the save did not squeeze.
	BalloonTarget uint64 `json:"balloon_target,omitempty"`

	// PageHash names the hash of the in-use pages' table (pagehash.Name)
	// in a version 4 file; empty in the others. Set by the writer.
	PageHash string `json:"page_hash,omitempty"`
	// Layout is "" (chunks back to back, as in version 1) or
	// [LayoutPlaced] (as in version 3) in a version 4 file.
	Layout string `json:"layout,omitempty"`
	// Parent, in a version 4 file, names the checkpoint this one holds
	// the changes since: the pages it does not store come from there.
	Parent *Parent `json:"parent,omitempty"`
}

// Parent names the parent of an incremental checkpoint.
type Parent struct {
	// ID is the parent's [Reader.ID]: it changes with any change to the
	// parent's header, bitmaps, index or trailer.
	ID string `json:"id"`
	// Name is the parent's file name when this file was written, to look
	// for beside this file. Informative: the ID decides.
	Name string `json:"name"`
	// Depth is the number of links below this one: 1 when the parent has
	// no parent itself.
	Depth int `json:"depth"`
}

// CPU is one vCPU's registers at the pause.
type CPU struct {
	Index int `json:"index"`
	// CPL is the privilege level: 3 is user mode.
	CPL int `json:"cpl"`
	// GPR are RAX RCX RDX RBX RSP RBP RSI RDI R8..R15.
	GPR    [16]uint64 `json:"gpr"`
	RIP    uint64     `json:"rip"`
	RFLAGS uint64     `json:"rflags"`
	CR3    uint64     `json:"cr3"`
	// Selectors are ES CS SS DS FS GS; FSBase and GSBase the bases of FS
	// and GS.
	Selectors [6]uint16 `json:"selectors"`
	FSBase    uint64    `json:"fs_base"`
	GSBase    uint64    `json:"gs_base"`
}

// Forms of the device state (see [Header].DeviceStateForm).
const (
	// DeviceStateIgnoreShared is a migration stream QEMU wrote with the
	// x-ignore-shared capability on, which leaves shared RAM out: load
	// it with the capability on.
	DeviceStateIgnoreShared = ""
	// DeviceStateFiltered is a stream QEMU wrote with x-ignore-shared
	// off, from which kvmckpt dropped the pages of the regions (package
	// migstream): load it with the capability off.
	DeviceStateFiltered = "filtered"
)

// Region is one RAM backend of the guest.
type Region struct {
	// ID is the QEMU memory backend id, for example "pc.ram" or "mem0".
	ID string `json:"id"`
	// Size is the backend's size in bytes, a multiple of the page size.
	Size uint64 `json:"size"`
	// MemPath is the backend's mem-path at the source.
	MemPath string `json:"mem_path,omitempty"`
	// Mappings place the backend in the guest-physical address space.
	Mappings []Mapping `json:"mappings,omitempty"`
}

// Mapping says that guest-physical [GPA, GPA+Size) is the bytes
// [Offset, Offset+Size) of its region.
type Mapping struct {
	GPA    uint64 `json:"gpa"`
	Offset uint64 `json:"offset"`
	Size   uint64 `json:"size"`
}

// PageCounts counts pages. Total and Saved are set by the writer and
// checked by the reader; the others are the checkpointer's statistics.
type PageCounts struct {
	// Total is the number of pages of all regions.
	Total uint64 `json:"total"`
	// Saved is the number of pages in the file.
	Saved uint64 `json:"saved"`
	// FreeBuddy and FreePCP are pages skipped as free in the guest's buddy
	// allocator and per-CPU page lists.
	FreeBuddy uint64 `json:"free_buddy"`
	FreePCP   uint64 `json:"free_pcp"`
	// Zero is pages skipped because all their bytes were zero.
	Zero uint64 `json:"zero"`
	// Hole is pages skipped because the RAM file had no block there.
	Hole uint64 `json:"hole"`
	// InUse, in a version 4 file, is the number of pages in use: those
	// the in-use bitmap holds. Set by the writer.
	InUse uint64 `json:"in_use,omitempty"`
}

// clone returns a deep copy of h, so that a caller's later changes to its
// slices cannot reach a Writer or Reader, nor the reverse.
func (h *Header) clone() Header {
	c := *h
	c.Regions = make([]Region, len(h.Regions))
	for i, r := range h.Regions {
		r.Mappings = append([]Mapping(nil), r.Mappings...)
		c.Regions[i] = r
	}
	c.CommandLine = append([]string(nil), h.CommandLine...)
	c.CPUs = append([]CPU(nil), h.CPUs...)
	if h.Parent != nil {
		p := *h.Parent
		c.Parent = &p
	}
	return c
}

// totalPages returns the number of pages of the regions, checking the
// region and mapping geometry on the way.
func (h *Header) totalPages() (uint64, error) {
	if h.PageSize != PageSize {
		return 0, fmt.Errorf("page size %d, want %d", h.PageSize, PageSize)
	}
	if len(h.Regions) > MaxRegions {
		return 0, fmt.Errorf("%d regions, more than %d", len(h.Regions), MaxRegions)
	}
	ps := uint64(h.PageSize)
	var total uint64
	for i, r := range h.Regions {
		if r.Size == 0 || r.Size%ps != 0 {
			return 0, fmt.Errorf("region %d (%q): size %#x is not a positive multiple of the page size", i, r.ID, r.Size)
		}
		if r.Size/ps > MaxPages-total {
			return 0, fmt.Errorf("regions exceed %d pages", MaxPages)
		}
		total += r.Size / ps
		if len(r.Mappings) > MaxMappings {
			return 0, fmt.Errorf("region %d (%q): %d mappings, more than %d", i, r.ID, len(r.Mappings), MaxMappings)
		}
		for j, m := range r.Mappings {
			if m.Size == 0 || m.GPA%ps != 0 || m.Offset%ps != 0 || m.Size%ps != 0 {
				return 0, fmt.Errorf("region %d (%q): mapping %d is empty or not page aligned", i, r.ID, j)
			}
			if m.Offset > r.Size || m.Size > r.Size-m.Offset {
				return 0, fmt.Errorf("region %d (%q): mapping %d: [%#x, %#x+%#x) past the region's end %#x", i, r.ID, j, m.Offset, m.Offset, m.Size, r.Size)
			}
			if m.GPA+m.Size < m.GPA {
				return 0, fmt.Errorf("region %d (%q): mapping %d: guest-physical range wraps", i, r.ID, j)
			}
		}
	}
	return total, nil
}

// check validates everything in h that does not depend on the bitmap.
func (h *Header) check() error {
	total, err := h.totalPages()
	if err != nil {
		return err
	}
	if h.ChunkPages == 0 || h.ChunkPages > MaxChunkPages {
		return fmt.Errorf("chunk_pages %d not in [1, %d]", h.ChunkPages, MaxChunkPages)
	}
	if h.Compression != CompressionLZ4 && h.Compression != CompressionNone {
		return fmt.Errorf("unknown compression %q", h.Compression)
	}
	p := h.Pages
	if p.Total != total {
		return fmt.Errorf("pages.total %d, but the regions hold %d pages", p.Total, total)
	}
	for _, c := range []uint64{p.Saved, p.FreeBuddy, p.FreePCP, p.Zero, p.Hole} {
		if c > total {
			return fmt.Errorf("page count %d exceeds the total of %d", c, total)
		}
	}
	for _, c := range h.CPUs {
		if c.CPL < 0 || c.CPL > 3 || c.Index < 0 {
			return fmt.Errorf("vCPU %d with privilege level %d", c.Index, c.CPL)
		}
	}
	if h.PageHash != "" && h.PageHash != pagehash.Name {
		return fmt.Errorf("page hash %q, this kvmckpt knows %q", h.PageHash, pagehash.Name)
	}
	if h.Layout != "" && h.Layout != LayoutPlaced {
		return fmt.Errorf("unknown layout %q", h.Layout)
	}
	if p.InUse > total {
		return fmt.Errorf("page count %d exceeds the total of %d", p.InUse, total)
	}
	if h.Parent != nil {
		if err := h.Parent.check(); err != nil {
			return fmt.Errorf("parent: %w", err)
		}
	}
	return nil
}

func (p *Parent) check() error {
	if len(p.ID) != 2*sha256.Size || strings.Trim(p.ID, "0123456789abcdef") != "" {
		return fmt.Errorf("id %.80q is no SHA-256 in lower-case hex", p.ID)
	}
	if p.Name == "" || p.Name == "." || p.Name == ".." || strings.ContainsAny(p.Name, "/\\\x00") || len(p.Name) > 255 {
		return fmt.Errorf("name %.80q is no file name", p.Name)
	}
	if p.Depth < 1 || p.Depth > MaxChainDepth {
		return fmt.Errorf("depth %d not in [1, %d]", p.Depth, MaxChainDepth)
	}
	return nil
}

// chunkCount returns the number of chunks of a checkpoint with saved pages
// cut into chunks of chunkPages.
func chunkCount(saved uint64, chunkPages uint32) uint64 {
	return (saved + uint64(chunkPages) - 1) / uint64(chunkPages)
}

// encodeHeader returns the header section: fixed part, JSON body, CRC.
// With a sealer it is a version 2 header, with the body sealed, and it sets
// the sealer's context.
func encodeHeader(h *Header, s *sealer, salt []byte) ([]byte, error) {
	body, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encode header: %w", err)
	}
	version, fixedLen, bodyLen := versionPlain, fixedHeaderLen, len(body)
	if h.PageHash != "" {
		version = versionChained
	}
	if s != nil {
		version, fixedLen, bodyLen = versionSealed, sealedFixedHeaderLen, len(body)+tagLen
	}
	if bodyLen > MaxHeaderBody {
		return nil, fmt.Errorf("encode header: body of %d bytes exceeds %d: %w", bodyLen, MaxHeaderBody, ErrTooLarge)
	}
	b := make([]byte, 0, fixedLen+bodyLen+crcLen)
	b = append(b, magic[:]...)
	b = binary.LittleEndian.AppendUint32(b, uint32(version))
	b = binary.LittleEndian.AppendUint32(b, uint32(bodyLen))
	if s == nil {
		b = append(b, body...)
	} else {
		b = binary.LittleEndian.AppendUint32(b, cipherAES256GCM)
		b = append(b, salt...)
		b = append(b, s.check[:]...)
		b = s.sealHeader(b, body)
	}
	return binary.LittleEndian.AppendUint32(b, crc(b)), nil
}

// fixedHeader is the fixed, clear part of the header.
type fixedHeader struct {
	version uint32
	len     int    // of the fixed part: where the body starts
	bodyLen uint32 // stored
	salt    []byte // version 2
}

// parseFixedHeader checks the fixed part of the header. avail is the file
// size: fixed, read from the file's start, may be shorter than
// sealedFixedHeaderLen if the file is.
func parseFixedHeader(fixed []byte, avail int64) (fixedHeader, error) {
	var fh fixedHeader
	n := min(len(fixed), len(magic))
	if string(fixed[:n]) != string(magic[:n]) {
		return fh, formatErr(PartHeader, 0, 0, ErrBadMagic, "magic %q", fixed[:n])
	}
	if len(fixed) < fixedHeaderLen {
		return fh, formatErr(PartHeader, 0, 0, ErrTruncated, "file of %d bytes", avail)
	}
	switch fh.version = binary.LittleEndian.Uint32(fixed[8:]); {
	case fh.version > FormatVersion:
		return fh, formatErr(PartHeader, 0, 8, ErrNewerVersion, "version %d, newest supported %d", fh.version, FormatVersion)
	case fh.version < versionPlain:
		return fh, formatErr(PartHeader, 0, 8, ErrCorrupt, "version %d", fh.version)
	case fh.version == versionPlain, fh.version == versionPlaced, fh.version == versionChained:
		fh.len = fixedHeaderLen
	case fh.version == versionSealed:
		fh.len = sealedFixedHeaderLen
		if len(fixed) < fh.len {
			return fh, formatErr(PartHeader, 0, 0, ErrTruncated, "file of %d bytes", avail)
		}
		if c := binary.LittleEndian.Uint32(fixed[16:]); c != cipherAES256GCM {
			return fh, formatErr(PartHeader, 0, 16, ErrCorrupt, "unknown cipher %d", c)
		}
		fh.salt = fixed[20 : 20+saltLen]
	}
	fh.bodyLen = binary.LittleEndian.Uint32(fixed[12:])
	if fh.bodyLen > MaxHeaderBody {
		return fh, formatErr(PartHeader, 0, 12, ErrCorrupt, "body length %d exceeds %d", fh.bodyLen, MaxHeaderBody)
	}
	if int64(fh.len)+int64(fh.bodyLen)+crcLen > avail {
		return fh, formatErr(PartHeader, 0, 12, ErrTruncated, "body length %d past the end of a %d-byte file", fh.bodyLen, avail)
	}
	return fh, nil
}

// decodeHeader checks the CRC of the header section b (fixed part of
// fixedLen bytes, body, CRC) and decodes and validates its body. With a
// sealer, derived from the salt of b, it checks the key check value and
// opens the body first, and returns the context of the header.
func decodeHeader(b []byte, fixedLen int, s *sealer) (Header, [sha256.Size]byte, error) {
	var h Header
	var context [sha256.Size]byte
	n := len(b) - crcLen
	if got, want := crc(b[:n]), binary.LittleEndian.Uint32(b[n:]); got != want {
		return h, context, formatErr(PartHeader, 0, int64(n), ErrCorrupt, "crc %#08x, stored %#08x", got, want)
	}
	body := b[fixedLen:n]
	if s != nil {
		// The key check value is no secret: HKDF's output blocks are
		// independent, so it says nothing of the file key; and a key is
		// 256 random bits, not a password to guess.
		const checkOff = sealedFixedHeaderLen - keyCheckLen
		if subtle.ConstantTimeCompare(b[checkOff:fixedLen], s.check[:]) != 1 {
			return h, context, formatErr(PartHeader, 0, checkOff, ErrWrongKey, "key check value does not match")
		}
		var err error
		if body, err = s.openHeader(b[:fixedLen], body); err != nil {
			return h, context, formatErr(PartHeader, 0, int64(fixedLen), ErrAuthFailed, "body changed since it was sealed")
		}
		context = headerContext(b[:fixedLen], body)
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return h, context, formatErr(PartHeader, 0, int64(fixedLen), ErrCorrupt, "decode body: %v", err)
	}
	if err := h.check(); err != nil {
		return h, context, formatErr(PartHeader, 0, int64(fixedLen), ErrCorrupt, "%v", err)
	}
	return h, context, nil
}

// indexEntry is the on-disk form of [ChunkInfo].
type indexEntry struct {
	offset    uint64
	firstPage uint64
	rawLen    uint32
	storedLen uint32
	crc       uint32
	encoding  Encoding
}

func (e *indexEntry) append(b []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, e.offset)
	b = binary.LittleEndian.AppendUint64(b, e.firstPage)
	b = binary.LittleEndian.AppendUint32(b, e.rawLen)
	b = binary.LittleEndian.AppendUint32(b, e.storedLen)
	b = binary.LittleEndian.AppendUint32(b, e.crc)
	return append(b, byte(e.encoding), 0, 0, 0)
}

// parseIndexEntry decodes an entry; it reports false if reserved bytes
// are set.
func parseIndexEntry(b []byte) (indexEntry, bool) {
	e := indexEntry{
		offset:    binary.LittleEndian.Uint64(b),
		firstPage: binary.LittleEndian.Uint64(b[8:]),
		rawLen:    binary.LittleEndian.Uint32(b[16:]),
		storedLen: binary.LittleEndian.Uint32(b[20:]),
		crc:       binary.LittleEndian.Uint32(b[24:]),
		encoding:  Encoding(b[28]),
	}
	return e, b[29]|b[30]|b[31] == 0
}

type trailer struct {
	indexOff, indexLen uint64
	devOff, devLen     uint64
	fileCRC            uint32
}

func (t *trailer) append(b []byte) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(b, t.indexOff)
	b = binary.LittleEndian.AppendUint64(b, t.indexLen)
	b = binary.LittleEndian.AppendUint64(b, t.devOff)
	b = binary.LittleEndian.AppendUint64(b, t.devLen)
	b = binary.LittleEndian.AppendUint32(b, t.fileCRC)
	b = binary.LittleEndian.AppendUint32(b, crc(b[start:]))
	return append(b, magic[:]...)
}

// parseTrailer decodes and checks the trailer b, found at offset off.
func parseTrailer(b []byte, off int64) (trailer, error) {
	if string(b[40:]) != string(magic[:]) {
		return trailer{}, formatErr(PartTrailer, 0, off+40, ErrTruncated, "no trailer magic (file cut short or never committed)")
	}
	if got, want := crc(b[:36]), binary.LittleEndian.Uint32(b[36:]); got != want {
		return trailer{}, formatErr(PartTrailer, 0, off+36, ErrCorrupt, "crc %#08x, stored %#08x", got, want)
	}
	return trailer{
		indexOff: binary.LittleEndian.Uint64(b),
		indexLen: binary.LittleEndian.Uint64(b[8:]),
		devOff:   binary.LittleEndian.Uint64(b[16:]),
		devLen:   binary.LittleEndian.Uint64(b[24:]),
		fileCRC:  binary.LittleEndian.Uint32(b[32:]),
	}, nil
}

// maxStored is the largest stored length of a chunk of rawLen bytes.
func maxStored(rawLen uint32) uint32 {
	return uint32(lz4.CompressBlockBound(int(rawLen)))
}

// chunkSpans returns an iterator over the chunks of the saved pages of
// used, cut into chunks of n pages: the first page of each chunk and its
// number of pages. The writer cuts chunks with it and the reader checks the
// index against it.
func chunkSpans(used *pagemap.Bitmap, n uint64) iter.Seq2[uint64, uint64] {
	return func(yield func(first, pages uint64) bool) {
		var first, have uint64
		for start, count := range used.Runs() {
			for count > 0 {
				if have == 0 {
					first = start
				}
				take := min(count, n-have)
				have, start, count = have+take, start+take, count-take
				if have == n {
					if !yield(first, have) {
						return
					}
					have = 0
				}
			}
		}
		if have > 0 {
			yield(first, have)
		}
	}
}

// chunkRuns returns an iterator over the runs of set pages of used that
// make up the chunk of the given pages starting at first.
func chunkRuns(used *pagemap.Bitmap, first, pages uint64) iter.Seq2[uint64, uint64] {
	return func(yield func(start, count uint64) bool) {
		for p := first; pages > 0; {
			start, ok := used.NextSet(p)
			if !ok {
				return
			}
			end, _ := used.NextClear(start)
			count := min(end-start, pages)
			if !yield(start, count) {
				return
			}
			pages -= count
			p = start + count
		}
	}
}

// contiguous reports whether the pages of used from first on are all set.
func contiguous(used *pagemap.Bitmap, first, pages uint64) bool {
	end, _ := used.NextClear(first)
	return end-first >= pages
}

// space maps page numbers of the concatenated regions to the memory that
// holds them: the writer's source or the reader's restore target.
type space struct {
	mem    [][]byte
	starts []uint64 // starts[i] is region i's first page; one more, the total
	// src, if not nil, holds the pages instead of mem: page p at byte
	// p*PageSize (see [Writer.WritePagesFrom]).
	src io.ReaderAt
}

// read copies the pages from p on into dst, whole pages.
func (s *space) read(dst []byte, p uint64) error {
	if s.src != nil {
		if _, err := s.src.ReadAt(dst, int64(p*PageSize)); err != nil {
			return err
		}
		return nil
	}
	for len(dst) > 0 {
		mem, n := s.span(p, uint64(len(dst))/PageSize)
		copy(dst, mem)
		dst, p = dst[n*PageSize:], p+n
	}
	return nil
}

func newSpace(mem [][]byte, h *Header) (*space, error) {
	if len(mem) != len(h.Regions) {
		return nil, fmt.Errorf("%d memory slices for %d regions", len(mem), len(h.Regions))
	}
	s := &space{mem: mem, starts: make([]uint64, 0, len(mem)+1)}
	var p uint64
	for i, m := range mem {
		if uint64(len(m)) != h.Regions[i].Size {
			return nil, fmt.Errorf("region %d (%q): memory of %d bytes, want %d", i, h.Regions[i].ID, len(m), h.Regions[i].Size)
		}
		s.starts = append(s.starts, p)
		p += h.Regions[i].Size / PageSize
	}
	s.starts = append(s.starts, p)
	return s, nil
}

// span returns the memory of the longest prefix of pages [p, p+n) that
// lies in one region, and the number of pages in it.
func (s *space) span(p, n uint64) ([]byte, uint64) {
	i := sort.Search(len(s.mem), func(i int) bool { return s.starts[i+1] > p })
	c := min(n, s.starts[i+1]-p)
	off := (p - s.starts[i]) * PageSize
	return s.mem[i][off : off+c*PageSize], c
}

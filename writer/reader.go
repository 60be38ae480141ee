package writer

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"iter"
	"os"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/pierrec/lz4/v4"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// ChunkInfo describes one chunk, from the index.
type ChunkInfo struct {
	// Offset is the file offset of the stored bytes.
	Offset int64
	// FirstPage is the page number of the chunk's first page; the others
	// are the next saved pages in page order.
	FirstPage uint64
	// Pages is the number of pages in the chunk.
	Pages uint64
	// RawLen is Pages times the page size; StoredLen is the stored size,
	// with the GCM tag in an encrypted file.
	RawLen, StoredLen uint32
	// CRC is the CRC-32C of the stored bytes.
	CRC      uint32
	Encoding Encoding
}

// Reader reads a checkpoint. Its methods are safe for concurrent use if
// the underlying io.ReaderAt is, as an *os.File is.
type Reader struct {
	ra     io.ReaderAt
	size   int64
	closer io.Closer

	seal      *sealer // nil if the file is not encrypted
	version   uint32
	fixedLen  int // of the fixed part of the header
	h         Header
	used      *pagemap.Bitmap
	bitmapOff int64 // end of the header, start of the bitmap
	chunksOff int64 // start of chunk 0
	chunks    []ChunkInfo
	tr        trailer
	devLen    uint64 // content length of the device state
	// In a version 4 file: the in-use bitmap, and where the page hashes
	// start.
	inUse   *pagemap.Bitmap
	sumsOff int64
}

// Open opens the checkpoint at path and checks its header, bitmap, trailer
// and index; see [NewReader]. The caller must Close the Reader.
func Open(path string) (*Reader, error) { return OpenKey(path, nil) }

// OpenKey is [Open] with a key, for a checkpoint that may be encrypted;
// see [NewReaderKey]. The caller must Close the Reader.
func OpenKey(path string, key []byte) (*Reader, error) {
	b, err := openBlob(path)
	if err != nil {
		return nil, fmt.Errorf("open checkpoint: %w", err)
	}
	r, err := NewReaderKey(b, b.Size(), key)
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("open checkpoint %s: %w", path, err)
	}
	r.closer = b
	return r, nil
}

// openBlob opens the checkpoint name in its store, or as a local file.
func openBlob(name string) (Blob, error) {
	st, err := storeOf(name)
	if err != nil {
		return nil, err
	}
	if st != nil {
		return st.Open(name)
	}
	f, err := safefile.Open(name)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return fileBlob{f, fi.Size()}, nil
}

// fileBlob is a local checkpoint file as a [Blob].
type fileBlob struct {
	*os.File
	size int64
}

func (b fileBlob) Size() int64 { return b.size }

// Size is the checkpoint's size in bytes.
func (r *Reader) Size() int64 { return r.size }

// Close closes the file opened by [Open]. For a Reader from [NewReader] it
// does nothing.
func (r *Reader) Close() error {
	if r.closer == nil {
		return nil
	}
	return r.closer.Close()
}

// NewReader reads the checkpoint of size bytes in ra. It checks the
// header, bitmap, trailer and index, their checksums and that they agree
// with each other and with size; it returns a [*FormatError] if they do
// not. The chunks and the device state are checked when read, or all at
// once by [Reader.Verify].
//
// An encrypted checkpoint needs [NewReaderKey]: NewReader returns an error
// wrapping [ErrEncrypted].
func NewReader(ra io.ReaderAt, size int64) (*Reader, error) {
	return NewReaderKey(ra, size, nil)
}

// NewReaderKey is [NewReader] with a key. With a nil key it is NewReader.
// Otherwise the checkpoint must be encrypted, under key: it returns an
// error wrapping [ErrNotEncrypted] if the checkpoint is not encrypted, as
// nothing in such a file is authenticated, and [ErrWrongKey] if it is
// encrypted under another key. Then it authenticates the header, bitmap
// and index; chunks and the device state are authenticated when read, and
// a part that does not authenticate is reported as an error wrapping
// [ErrAuthFailed].
func NewReaderKey(ra io.ReaderAt, size int64, key []byte) (*Reader, error) {
	if size < 0 {
		return nil, fmt.Errorf("read checkpoint: negative size %d", size)
	}
	if key != nil && len(key) != KeySize {
		return nil, fmt.Errorf("read checkpoint: key of %d bytes, want %d", len(key), KeySize)
	}
	r := &Reader{ra: ra, size: size}

	fixed := make([]byte, min(size, sealedFixedHeaderLen))
	if err := r.readAt(PartHeader, 0, fixed, 0); err != nil {
		return nil, err
	}
	fh, err := parseFixedHeader(fixed, size)
	if err != nil {
		return nil, err
	}
	switch {
	case fh.version == versionSealed && key == nil:
		return nil, formatErr(PartHeader, 0, 8, ErrEncrypted, "version %d, AES-256-GCM", fh.version)
	case fh.version != versionSealed && key != nil:
		return nil, formatErr(PartHeader, 0, 8, ErrNotEncrypted, "version %d read with a key", fh.version)
	case key != nil:
		if r.seal, err = newSealer(key, fh.salt); err != nil {
			return nil, fmt.Errorf("read checkpoint: %w", err)
		}
	}
	r.fixedLen = fh.len
	r.version = fh.version
	// parseFixedHeader bounded bodyLen by MaxHeaderBody and size.
	hdr := make([]byte, fh.len+int(fh.bodyLen)+crcLen)
	if err := r.readAt(PartHeader, 0, hdr, 0); err != nil {
		return nil, err
	}
	var context [sha256.Size]byte
	if r.h, context, err = decodeHeader(hdr, fh.len, r.seal); err != nil {
		return nil, err
	}
	if r.seal != nil {
		r.seal.context = context
	}
	if chained := r.version == versionChained; chained != (r.h.PageHash != "") || !chained && (r.h.Parent != nil || r.h.Layout != "") {
		return nil, formatErr(PartHeader, 0, int64(fh.len), ErrCorrupt, "version %d with page hash %q, layout %q, parent %v", r.version, r.h.PageHash, r.h.Layout, r.h.Parent != nil)
	}
	r.bitmapOff = int64(len(hdr))
	if err := r.readBitmap(); err != nil {
		return nil, err
	}
	if err := r.readTrailer(); err != nil {
		return nil, err
	}
	if err := r.readIndex(); err != nil {
		return nil, err
	}
	return r, nil
}

// Parent returns the parent the checkpoint names, or nil if it stores
// every page it has in use.
func (r *Reader) Parent() *Parent {
	if r.h.Parent == nil {
		return nil
	}
	p := *r.h.Parent
	return &p
}

// InUse returns the pages in use at the checkpoint: in a version 4 file,
// its in-use bitmap, else the bitmap of saved pages. Pages not in use
// restore as the fill byte.
func (r *Reader) InUse() *pagemap.Bitmap {
	if r.inUse != nil {
		return r.inUse.Clone()
	}
	return r.used.Clone()
}

// HasPageSums reports whether the checkpoint holds its pages' hashes
// (version 4).
func (r *Reader) HasPageSums() bool { return r.inUse != nil }

// PageSums reads and checks the hashes of the pages the file stores, of
// a version 4 file: for a file without a parent, every page in use. The
// hashes of the pages a chain restores are [Chain.PageSums].
func (r *Reader) PageSums() (*pagehash.Table, error) {
	if r.inUse == nil {
		return nil, fmt.Errorf("checkpoint of version %d has no page hashes", r.version)
	}
	// readChain checked that they fit in the file.
	b, err := r.readSection(PartHashes, r.sumsOff, pagehash.EncodedLen(r.h.Pages.Saved))
	if err != nil {
		return nil, err
	}
	t, err := pagehash.DecodeSums(r.used.Clone(), b)
	if err != nil {
		return nil, formatErr(PartHashes, 0, r.sumsOff, ErrCorrupt, "%v", err)
	}
	return t, nil
}

// ID returns the checkpoint's identity, the lower-case hex SHA-256 of its
// header section, the CRC of its bitmap, its index section, the CRCs of
// its chain section and its trailer: what a child names it by. Any change
// to the checkpoint changes a CRC or a section hashed whole, so changes
// the ID; the chunks and device state are covered through their CRCs
// (the index holds the chunks') and the trailer (the whole-file CRC, or
// in version 3 and placed version 4 files, which have none, the device
// state's CRC through the section after it).
func (r *Reader) ID() (string, error) {
	h := sha256.New()
	add := func(part Part, off, n int64) error {
		b := make([]byte, n)
		if err := r.readAt(part, 0, b, off); err != nil {
			return err
		}
		h.Write(b)
		return nil
	}
	bmLen, _ := pagemap.EncodedLen(r.h.Pages.Total)
	bmEnd := r.bitmapOff + int64(r.storedLen(bmLen)) + crcLen
	devEnd := int64(r.tr.devOff + r.tr.devLen + crcLen)
	trailerOff := r.size - trailerLen
	type span struct {
		part   Part
		off, n int64
	}
	parts := []span{
		{PartHeader, 0, r.bitmapOff},
		{PartBitmap, bmEnd - crcLen, crcLen},
		{PartIndex, int64(r.tr.indexOff), int64(r.tr.indexLen) + crcLen},
		{PartDeviceState, devEnd - crcLen, crcLen},
	}
	if r.chained() {
		parts = append(parts, span{PartInUse, r.sumsOff - crcLen, crcLen}, span{PartHashes, trailerOff - crcLen, crcLen})
	}
	for _, p := range parts {
		if err := add(p.part, p.off, p.n); err != nil {
			return "", err
		}
	}
	if err := add(PartTrailer, trailerOff, trailerLen); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Encrypted reports whether the checkpoint is encrypted.
func (r *Reader) Encrypted() bool { return r.seal != nil }

// storedLen returns the stored length of a section with n content bytes.
func (r *Reader) storedLen(n uint64) uint64 {
	if r.seal != nil {
		return sealedLen(n)
	}
	return n
}

// overhead returns the bytes sealing adds to a message: 0 in a file that
// is not encrypted.
func (r *Reader) overhead() uint32 {
	if r.seal != nil {
		return tagLen
	}
	return 0
}

// readSection reads the section of part at off with n content bytes,
// checks its CRC, opens it if the file is encrypted, and returns its
// content. The caller has bounded its stored length by the file size.
func (r *Reader) readSection(part Part, off int64, n uint64) ([]byte, error) {
	stored := r.storedLen(n)
	b := make([]byte, stored+crcLen)
	if err := r.readAt(part, 0, b, off); err != nil {
		return nil, err
	}
	if got, want := crc(b[:stored]), binary.LittleEndian.Uint32(b[stored:]); got != want {
		return nil, formatErr(part, 0, off+int64(stored), ErrCorrupt, "crc %#08x, stored %#08x", got, want)
	}
	if r.seal == nil {
		return b[:n], nil
	}
	return r.seal.openBlocks(part, off, b[:stored])
}

// readAt reads len(b) bytes at off, part of part.
func (r *Reader) readAt(part Part, idx int, b []byte, off int64) error {
	n, err := r.ra.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = ErrTruncated
	}
	return formatErr(part, idx, off+int64(n), err, "read %d bytes at %#x", len(b), off)
}

func (r *Reader) readBitmap() error {
	// totalPages <= MaxPages, so the lengths fit.
	n, _ := pagemap.EncodedLen(r.h.Pages.Total)
	if uint64(r.size-r.bitmapOff) < r.storedLen(n)+crcLen+trailerLen {
		return formatErr(PartBitmap, 0, r.bitmapOff, ErrTruncated,
			"%d-byte bitmap and trailer past the end of a %d-byte file", r.storedLen(n), r.size)
	}
	b, err := r.readSection(PartBitmap, r.bitmapOff, n)
	if err != nil {
		return err
	}
	r.used = new(pagemap.Bitmap)
	if err := r.used.UnmarshalBinary(b); err != nil {
		return formatErr(PartBitmap, 0, r.bitmapOff, ErrCorrupt, "%v", err)
	}
	if r.used.Len() != r.h.Pages.Total {
		return formatErr(PartBitmap, 0, r.bitmapOff, ErrCorrupt, "covers %d pages, header says %d", r.used.Len(), r.h.Pages.Total)
	}
	if c := r.used.Count(); c != r.h.Pages.Saved {
		return formatErr(PartBitmap, 0, r.bitmapOff, ErrCorrupt, "has %d pages set, header says %d saved", c, r.h.Pages.Saved)
	}
	r.chunksOff = r.bitmapOff + int64(r.storedLen(n)) + crcLen
	if r.placed() {
		// Zeros (a hole) up to the aligned chunk area; the trailer
		// check below makes sure the file reaches that far.
		r.chunksOff = alignUp(r.chunksOff)
	}
	return nil
}

// placed reports whether chunks may lie anywhere in the chunk area, with
// gaps, in any order (version 3), rather than back to back in page order.
func (r *Reader) placed() bool {
	return r.version == versionPlaced || r.version == versionChained && r.h.Layout == LayoutPlaced
}

// chained reports whether the file is of version 4, with a chain section.
func (r *Reader) chained() bool { return r.version == versionChained }

func (r *Reader) readTrailer() error {
	off := r.size - trailerLen // readBitmap made sure this is past the bitmap
	b := make([]byte, trailerLen)
	if err := r.readAt(PartTrailer, 0, b, off); err != nil {
		return err
	}
	t, err := parseTrailer(b, off)
	if err != nil {
		return err
	}
	// All offsets and lengths are below the file size, so sums of two do
	// not overflow.
	u := uint64(off)
	nChunks := chunkCount(r.h.Pages.Saved, r.h.ChunkPages)
	if r.placed() {
		// As many chunks as the index holds: at least as many as
		// full ones would take, at most one per saved page.
		if n := t.indexLen / indexEntryLen; t.indexLen%indexEntryLen == 0 && n >= nChunks && n <= r.h.Pages.Saved {
			nChunks = n
		}
		if t.fileCRC != 0 {
			return formatErr(PartTrailer, 0, off+32, ErrCorrupt, "file crc %#08x in a version 3 file, which has none", t.fileCRC)
		}
	}
	devLen, devOK := t.devLen, true
	if r.seal != nil {
		devLen, devOK = openedLen(t.devLen)
	}
	switch {
	case t.indexOff > u || t.indexLen > u || t.devOff > u || t.devLen > u:
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "offset or length past the end of the file")
	case t.indexLen != r.storedLen(nChunks*indexEntryLen):
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "index of %d bytes for %d chunks", t.indexLen, nChunks)
	case t.indexOff < uint64(r.chunksOff):
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "index at %#x before the chunks at %#x", t.indexOff, r.chunksOff)
	case t.indexOff+t.indexLen+crcLen != t.devOff:
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "device state at %#x, index ends at %#x", t.devOff, t.indexOff+t.indexLen+crcLen)
	case !r.chained() && t.devOff+t.devLen+crcLen != u, r.chained() && t.devOff+t.devLen+crcLen > u:
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "device state ends at %#x, trailer at %#x", t.devOff+t.devLen+crcLen, u)
	case !devOK:
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "device state of %d bytes is no sequence of sealed blocks", t.devLen)
	}
	r.tr = t
	r.devLen = devLen
	if r.chained() {
		return r.readChain(int64(t.devOff+t.devLen+crcLen), off)
	}
	return nil
}

// readChain reads the in-use bitmap of a version 4 file, at off, and
// checks that it and the page hashes after it end at the trailer, at end.
func (r *Reader) readChain(off, end int64) error {
	n, _ := pagemap.EncodedLen(r.h.Pages.Total)
	if uint64(end-off) < n+crcLen {
		return formatErr(PartInUse, 0, off, ErrTruncated, "%d-byte in-use bitmap past the trailer at %#x", n, end)
	}
	b, err := r.readSection(PartInUse, off, n)
	if err != nil {
		return err
	}
	inUse := new(pagemap.Bitmap)
	if err := inUse.UnmarshalBinary(b); err != nil {
		return formatErr(PartInUse, 0, off, ErrCorrupt, "%v", err)
	}
	count := inUse.Count()
	switch {
	case inUse.Len() != r.h.Pages.Total:
		return formatErr(PartInUse, 0, off, ErrCorrupt, "covers %d pages, header says %d", inUse.Len(), r.h.Pages.Total)
	case count != r.h.Pages.InUse:
		return formatErr(PartInUse, 0, off, ErrCorrupt, "has %d pages set, header says %d in use", count, r.h.Pages.InUse)
	case !r.used.SubsetOf(inUse):
		return formatErr(PartInUse, 0, off, ErrCorrupt, "a stored page is not in use")
	case r.h.Parent == nil && count != r.h.Pages.Saved:
		return formatErr(PartInUse, 0, off, ErrCorrupt, "%d pages in use, %d stored, and no parent to hold the others", count, r.h.Pages.Saved)
	}
	r.sumsOff = off + int64(n) + crcLen
	if want := pagehash.EncodedLen(r.h.Pages.Saved) + crcLen; uint64(end-r.sumsOff) != want {
		return formatErr(PartHashes, 0, r.sumsOff, ErrCorrupt, "%d bytes before the trailer, %d pages stored need %d", end-r.sumsOff, r.h.Pages.Saved, want)
	}
	r.inUse = inUse
	return nil
}

func (r *Reader) readIndex() error {
	off := int64(r.tr.indexOff)
	if r.placed() {
		return r.readPlacedIndex(off)
	}
	// readTrailer bounded indexLen by the file size and checked it against
	// the number of chunks.
	n := chunkCount(r.h.Pages.Saved, r.h.ChunkPages) * indexEntryLen
	b, err := r.readSection(PartIndex, off, n)
	if err != nil {
		return err
	}
	r.chunks = make([]ChunkInfo, 0, n/indexEntryLen)
	next := uint64(r.chunksOff)
	tag := r.overhead()
	for first, pages := range chunkSpans(r.used, uint64(r.h.ChunkPages)) {
		i := len(r.chunks)
		e, ok := parseIndexEntry(b[i*indexEntryLen:])
		rawLen := pages * uint64(r.h.PageSize)
		var msg string
		switch {
		case !ok:
			msg = "reserved bytes set"
		case e.offset != next:
			msg = fmt.Sprintf("offset %#x, previous chunk ends at %#x", e.offset, next)
		case e.firstPage != first:
			msg = fmt.Sprintf("first page %d, bitmap says %d", e.firstPage, first)
		case uint64(e.rawLen) != rawLen:
			msg = fmt.Sprintf("raw length %d for %d pages", e.rawLen, pages)
		case e.encoding == EncodingRaw && e.storedLen != e.rawLen+tag:
			msg = fmt.Sprintf("raw chunk stores %d bytes of %d", e.storedLen, e.rawLen)
		case e.encoding == EncodingLZ4 && r.h.Compression == CompressionNone:
			msg = "lz4 chunk in a file without compression"
		case e.encoding == EncodingLZ4 && (e.storedLen <= tag || e.storedLen-tag > maxStored(e.rawLen)):
			msg = fmt.Sprintf("lz4 chunk stores %d bytes of %d", e.storedLen, e.rawLen)
		case e.encoding != EncodingRaw && e.encoding != EncodingLZ4:
			msg = fmt.Sprintf("unknown encoding %d", e.encoding)
		case uint64(e.storedLen) > r.tr.indexOff-next:
			msg = fmt.Sprintf("%d stored bytes at %#x run into the index at %#x", e.storedLen, next, r.tr.indexOff)
		}
		if msg != "" {
			return formatErr(PartIndex, 0, r.contentOff(off, uint64(i*indexEntryLen)), ErrCorrupt, "entry %d: %s", i, msg)
		}
		r.chunks = append(r.chunks, e.info(pages))
		next += uint64(e.storedLen)
	}
	if next != r.tr.indexOff {
		return formatErr(PartIndex, 0, off, ErrCorrupt, "chunks end at %#x, index starts at %#x", next, r.tr.indexOff)
	}
	return nil
}

// readPlacedIndex reads the index of a version 3 file. Its chunks, in
// index order, cover the saved pages in page order, each exactly once:
// chunk i holds rawLen/page_size saved pages (1 to chunk_pages) from
// firstPage, which must be the first saved page no chunk before covers.
// Each lies in the chunk area [C, index), placedAlign-aligned, and no two
// overlap; bytes of the area that no chunk holds are not read.
func (r *Reader) readPlacedIndex(off int64) error {
	n := r.tr.indexLen // readTrailer checked it: a whole number of entries, at most one per saved page
	b, err := r.readSection(PartIndex, off, n)
	if err != nil {
		return err
	}
	k := int(n / indexEntryLen)
	r.chunks = make([]ChunkInfo, 0, k)
	ps := uint64(r.h.PageSize)
	var cursor, covered uint64 // next page that may start a chunk; saved pages covered
	for i := range k {
		e, ok := parseIndexEntry(b[i*indexEntryLen:])
		pages := uint64(e.rawLen) / ps
		first, have := r.used.NextSet(cursor)
		var msg string
		switch {
		case !ok:
			msg = "reserved bytes set"
		case uint64(e.rawLen)%ps != 0 || pages == 0 || pages > uint64(r.h.ChunkPages):
			msg = fmt.Sprintf("raw length %d is not 1 to %d pages", e.rawLen, r.h.ChunkPages)
		case !have || e.firstPage != first:
			msg = fmt.Sprintf("first page %d, the next saved page is %d", e.firstPage, first)
		case covered+pages > r.h.Pages.Saved:
			msg = fmt.Sprintf("covers saved pages past the %d of the bitmap", r.h.Pages.Saved)
		case e.encoding == EncodingRaw && e.storedLen != e.rawLen:
			msg = fmt.Sprintf("raw chunk stores %d bytes of %d", e.storedLen, e.rawLen)
		case e.encoding == EncodingLZ4 && r.h.Compression == CompressionNone:
			msg = "lz4 chunk in a file without compression"
		case e.encoding == EncodingLZ4 && (e.storedLen == 0 || e.storedLen > maxStored(e.rawLen)):
			msg = fmt.Sprintf("lz4 chunk stores %d bytes of %d", e.storedLen, e.rawLen)
		case e.encoding != EncodingRaw && e.encoding != EncodingLZ4:
			msg = fmt.Sprintf("unknown encoding %d", e.encoding)
		case e.offset < uint64(r.chunksOff) || e.offset%placedAlign != 0 || e.offset > r.tr.indexOff || uint64(e.storedLen) > r.tr.indexOff-e.offset:
			msg = fmt.Sprintf("%d stored bytes at %#x outside the aligned chunk area [%#x, %#x)", e.storedLen, e.offset, r.chunksOff, r.tr.indexOff)
		}
		if msg != "" {
			return formatErr(PartIndex, 0, r.contentOff(off, uint64(i*indexEntryLen)), ErrCorrupt, "entry %d: %s", i, msg)
		}
		// The page after the chunk's last: pages saved pages on from
		// first (bounded: covered+pages <= saved).
		last := first
		for range pages - 1 {
			last, _ = r.used.NextSet(last + 1)
		}
		cursor = last + 1
		covered += pages
		r.chunks = append(r.chunks, e.info(pages))
	}
	if covered != r.h.Pages.Saved {
		return formatErr(PartIndex, 0, off, ErrCorrupt, "chunks cover %d saved pages of %d", covered, r.h.Pages.Saved)
	}
	byOff := make([]int, k)
	for i := range byOff {
		byOff[i] = i
	}
	slices.SortFunc(byOff, func(a, b int) int { return cmp.Compare(r.chunks[a].Offset, r.chunks[b].Offset) })
	for j := 1; j < k; j++ {
		a, c := r.chunks[byOff[j-1]], r.chunks[byOff[j]]
		if a.Offset+int64(a.StoredLen) > c.Offset {
			return formatErr(PartIndex, 0, off, ErrCorrupt, "chunks %d and %d overlap at %#x", byOff[j-1], byOff[j], c.Offset)
		}
	}
	return nil
}

// info is the entry as a [ChunkInfo] of the given pages.
func (e indexEntry) info(pages uint64) ChunkInfo {
	return ChunkInfo{
		Offset:    int64(e.offset),
		FirstPage: e.firstPage,
		Pages:     pages,
		RawLen:    e.rawLen,
		StoredLen: e.storedLen,
		CRC:       e.crc,
		Encoding:  e.encoding,
	}
}

// contentOff returns the file offset of content byte n of the section at
// off: in an encrypted file, past the tags of the blocks before.
func (r *Reader) contentOff(off int64, n uint64) int64 {
	if r.seal != nil {
		n += n / sealBlock * tagLen
	}
	return off + int64(n)
}

// Header returns the checkpoint's header.
func (r *Reader) Header() Header { return r.h.clone() }

// Bitmap returns a copy of the bitmap of saved pages.
func (r *Reader) Bitmap() *pagemap.Bitmap { return r.used.Clone() }

// UnsavedRuns returns an iterator over the runs of pages not saved, as
// (first page, count): the pages [Reader.FillUnsaved] fills, for callers
// that punch holes instead (fallocate FALLOC_FL_PUNCH_HOLE) when the fill
// byte is 0.
func (r *Reader) UnsavedRuns() iter.Seq2[uint64, uint64] { return r.used.ClearRuns() }

// NumChunks returns the number of chunks.
func (r *Reader) NumChunks() int { return len(r.chunks) }

// Chunk returns the index entry of chunk i, which must be in
// [0, NumChunks()).
func (r *Reader) Chunk(i int) ChunkInfo { return r.chunks[i] }

// DeviceStateLen returns the length of the device state.
func (r *Reader) DeviceStateLen() int64 { return int64(r.devLen) }

// ReadChunk reads, checks and decodes chunk i, and returns its pages,
// concatenated in page order. It uses dst if it has room.
func (r *Reader) ReadChunk(i int, dst []byte) ([]byte, error) {
	if i < 0 || i >= len(r.chunks) {
		return nil, fmt.Errorf("read chunk %d: not in [0, %d)", i, len(r.chunks))
	}
	c := &r.chunks[i]
	if cap(dst) < int(c.RawLen) {
		dst = make([]byte, c.RawLen)
	}
	dst = dst[:c.RawLen]
	stored := make([]byte, c.StoredLen)
	if err := r.readAt(PartChunk, i, stored, c.Offset); err != nil {
		return nil, err
	}
	if err := r.decodeChunk(i, stored, dst); err != nil {
		return nil, err
	}
	return dst, nil
}

// decodeChunk checks the stored bytes of chunk i, opens them if the file
// is encrypted, and decodes them into raw, of the chunk's raw length.
// stored and raw may be the same slice for a raw chunk.
func (r *Reader) decodeChunk(i int, stored, raw []byte) error {
	c := &r.chunks[i]
	if got := crc(stored); got != c.CRC {
		return formatErr(PartChunk, i, c.Offset, ErrCorrupt, "crc %#08x, index says %#08x", got, c.CRC)
	}
	plain := stored
	if r.seal != nil {
		// Open a raw chunk straight into raw, an LZ4 one in place to
		// decode from there.
		dst := stored[:0]
		if c.Encoding == EncodingRaw {
			dst = raw[:0]
		}
		var err error
		if plain, err = r.seal.open(dst, stored, PartChunk, uint64(i), true); err != nil {
			return formatErr(PartChunk, i, c.Offset, ErrAuthFailed, "changed or moved since it was sealed")
		}
	}
	switch c.Encoding {
	case EncodingRaw:
		if &plain[0] != &raw[0] {
			copy(raw, plain)
		}
	case EncodingLZ4:
		n, err := lz4.UncompressBlock(plain, raw)
		if err != nil || n != len(raw) {
			return formatErr(PartChunk, i, c.Offset, ErrCorrupt, "lz4 block decodes to %d bytes of %d (%v)", n, len(raw), err)
		}
	}
	return nil
}

// RestoreOptions tunes [Reader.RestorePages].
type RestoreOptions struct {
	// Workers is the number of goroutines decoding chunks; 0 means
	// the number of CPUs (GOMAXPROCS outside a pipeline).
	Workers int
	// Progress, if not nil, is called after each chunk with the number of
	// pages restored and the number to restore. Calls are serialized, from
	// the workers' goroutines.
	Progress func(done, total uint64)
	// Only, if not nil, restricts the restore to the saved pages it
	// holds: a chunk with none of them is not even read. It must cover
	// the header's pages.
	Only *pagemap.Bitmap
}

// RestorePages writes the saved pages into dst, where dst[i] is the
// memory of region i of the header, of its size: typically the mapping of
// the restore target's RAM file. It reads, checks and decodes chunks in
// parallel and writes each page at its offset in its region.
//
// It writes only the saved pages. Unless dst is known to hold the fill
// byte already (a new sparse file and fill byte 0), call
// [Reader.FillUnsaved] too, or punch holes over [Reader.UnsavedRuns].
//
// On error, dst holds a partial restore. A fault writing dst (a tmpfs out
// of space) is returned as an error.
func (r *Reader) RestorePages(dst [][]byte, opts RestoreOptions) error {
	sp, err := newSpace(dst, &r.h)
	if err != nil {
		return fmt.Errorf("restore pages: %w", err)
	}
	return r.restore(memSink{sp}, opts)
}

// RestorePagesTo is [Reader.RestorePages] for a target written with
// WriteAt, at page number times page size: the offset in the RAM file of a
// single-region guest. dst must be safe for concurrent WriteAt calls, as an
// *os.File is.
func (r *Reader) RestorePagesTo(dst io.WriterAt, opts RestoreOptions) error {
	return r.restore(writerAtSink{dst}, opts)
}

// sink is a restore target.
type sink interface {
	// direct returns the memory of pages [first, first+pages) if it is
	// contiguous, so that chunks can be decoded in place, or nil.
	direct(first, pages uint64) []byte
	// put writes data, whole pages, at page first.
	put(first uint64, data []byte) error
}

type memSink struct{ sp *space }

func (s memSink) direct(first, pages uint64) []byte {
	if mem, n := s.sp.span(first, pages); n == pages {
		return mem
	}
	return nil
}

func (s memSink) put(first uint64, data []byte) error {
	for len(data) > 0 {
		mem, _ := s.sp.span(first, uint64(len(data))/PageSize)
		n := copy(mem, data)
		data = data[n:]
		first += uint64(n) / PageSize
	}
	return nil
}

type writerAtSink struct{ w io.WriterAt }

func (writerAtSink) direct(uint64, uint64) []byte { return nil }

func (s writerAtSink) put(first uint64, data []byte) error {
	_, err := s.w.WriteAt(data, int64(first*PageSize))
	return err
}

// chunkBuffers are a restore worker's buffers, grown as needed.
type chunkBuffers struct{ stored, raw []byte }

func grow(b []byte, n uint32) []byte {
	if cap(b) < int(n) {
		return make([]byte, n)
	}
	return b[:n]
}

func (r *Reader) restore(s sink, opts RestoreOptions) error {
	workers := opts.Workers
	if workers <= 0 {
		workers = cpus()
	}
	// The chunks to restore, and how many of their pages.
	todo := make([]int, 0, len(r.chunks))
	total := r.h.Pages.Saved
	if opts.Only != nil {
		if opts.Only.Len() != r.h.Pages.Total {
			return fmt.Errorf("restore pages: a mask of %d pages for %d", opts.Only.Len(), r.h.Pages.Total)
		}
		total = 0
	}
	for i, c := range r.chunks {
		if opts.Only != nil {
			n := r.onlyPages(c, opts.Only)
			if n == 0 {
				continue
			}
			total += n
		}
		todo = append(todo, i)
	}
	workers = min(workers, len(todo))

	var (
		next     atomic.Int64
		failed   atomic.Bool
		firstErr error
		mu       sync.Mutex // guards firstErr, done and calls of Progress
		done     uint64
		wg       sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
			var b chunkBuffers
			for !failed.Load() {
				k := int(next.Add(1) - 1)
				if k >= len(todo) {
					return
				}
				i := todo[k]
				n, err := r.restoreChunk(i, s, &b, opts.Only)
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					failed.Store(true)
				} else if done += n; opts.Progress != nil {
					opts.Progress(done, total)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return fmt.Errorf("restore pages: %w", firstErr)
	}
	return nil
}

// storedChunk returns chunk i as stored, to be decoded and then released:
// lent by a [Viewer] where it can (never for a sealed chunk, which is
// opened in place), else read into b.stored.
func (r *Reader) storedChunk(i int, b *chunkBuffers) ([]byte, func(), error) {
	c := &r.chunks[i]
	if v, ok := r.ra.(Viewer); ok && r.seal == nil {
		if view, release, ok := v.View(c.Offset, int(c.StoredLen)); ok {
			return view, release, nil
		}
	}
	b.stored = grow(b.stored, c.StoredLen)
	if err := r.readAt(PartChunk, i, b.stored, c.Offset); err != nil {
		return nil, nil, err
	}
	return b.stored, func() {}, nil
}

// onlyPages returns how many of chunk c's pages only holds.
func (r *Reader) onlyPages(c ChunkInfo, only *pagemap.Bitmap) uint64 {
	var n uint64
	for start, count := range chunkRuns(r.used, c.FirstPage, c.Pages) {
		n += only.CountRange(start, count)
	}
	return n
}

// restoreChunk writes chunk i's pages, those in only if it is not nil,
// and returns how many it wrote.
func (r *Reader) restoreChunk(i int, s sink, b *chunkBuffers, only *pagemap.Bitmap) (written uint64, err error) {
	defer catchFault(&err)
	c := &r.chunks[i]
	all := only == nil || r.onlyPages(*c, only) == c.Pages
	var direct []byte
	if all && contiguous(r.used, c.FirstPage, c.Pages) {
		direct = s.direct(c.FirstPage, c.Pages)
	}
	if direct != nil && c.Encoding == EncodingRaw && r.seal == nil {
		// Read straight into place; decodeChunk then only checks the CRC.
		if err := r.readAt(PartChunk, i, direct, c.Offset); err != nil {
			return 0, err
		}
		return c.Pages, r.decodeChunk(i, direct, direct)
	}
	stored, release, err := r.storedChunk(i, b)
	if err != nil {
		return 0, err
	}
	raw := direct
	if raw == nil {
		b.raw = grow(b.raw, c.RawLen)
		raw = b.raw
	}
	err = r.decodeChunk(i, stored, raw)
	release()
	if err != nil {
		return 0, err
	}
	if direct != nil {
		return c.Pages, nil
	}
	off := uint64(0)
	put := func(start, count, at uint64) error {
		n := count * PageSize
		if err := s.put(start, raw[at:at+n]); err != nil {
			return fmt.Errorf("chunk %d: write pages [%d, %d): %w", i, start, start+count, err)
		}
		written += count
		return nil
	}
	for start, count := range chunkRuns(r.used, c.FirstPage, c.Pages) {
		if all {
			if err := put(start, count, off); err != nil {
				return written, err
			}
		} else {
			// The runs of only inside this run.
			for p := start; p < start+count; {
				q, ok := only.NextSet(p)
				if !ok || q >= start+count {
					break
				}
				e, _ := only.NextClear(q)
				e = min(e, start+count)
				if err := put(q, e-q, off+(q-start)*PageSize); err != nil {
					return written, err
				}
				p = e
			}
		}
		off += count * PageSize
	}
	return written, nil
}

// FillUnsaved sets every byte of the pages not saved to the header's fill
// byte, in dst as for [Reader.RestorePages]. It is the step after
// RestorePages for targets that do not hold the fill byte already.
func (r *Reader) FillUnsaved(dst [][]byte) error {
	return fillRuns(dst, &r.h, r.used.ClearRuns())
}

// FillUnsavedTo is [Reader.FillUnsaved] for a target written with
// WriteAt, as for [Reader.RestorePagesTo].
func (r *Reader) FillUnsavedTo(dst io.WriterAt) error {
	return fillRunsTo(dst, r.h.FillByte, r.used.ClearRuns())
}

// fillRuns sets every byte of the pages of runs to h's fill byte, in dst
// as for [Reader.RestorePages].
func fillRuns(dst [][]byte, h *Header, runs iter.Seq2[uint64, uint64]) (err error) {
	sp, err := newSpace(dst, h)
	if err != nil {
		return fmt.Errorf("fill unsaved pages: %w", err)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer catchFault(&err)
	fill := h.FillByte
	for start, count := range runs {
		for count > 0 {
			mem, n := sp.span(start, count)
			if fill == 0 {
				clear(mem)
			} else {
				mem[0] = fill
				for k := 1; k < len(mem); k *= 2 {
					copy(mem[k:], mem[:k])
				}
			}
			start, count = start+n, count-n
		}
	}
	return nil
}

// fillRunsTo is fillRuns for a target written with WriteAt.
func fillRunsTo(dst io.WriterAt, fill byte, runs iter.Seq2[uint64, uint64]) error {
	var pattern []byte
	for start, count := range runs {
		if pattern == nil {
			pattern = make([]byte, min(count*PageSize, 1<<20))
			for k := range pattern {
				pattern[k] = fill
			}
		}
		off, n := start*PageSize, count*PageSize
		for n > 0 {
			k := min(n, uint64(len(pattern)))
			if _, err := dst.WriteAt(pattern[:k], int64(off)); err != nil {
				return fmt.Errorf("fill unsaved pages: %w", err)
			}
			off, n = off+k, n-k
		}
	}
	return nil
}

// DeviceState returns a reader of the device state. It checks the CRC when
// it reaches the end: its last Read returns a [*FormatError] instead of
// io.EOF if the state is corrupt. The bytes before are delivered
// unchecked; call [Reader.Verify] first to know before feeding them to
// QEMU.
//
// In an encrypted file, each block of the device state is authenticated
// before any of its bytes is delivered, and the last block is marked as
// such, so the bytes delivered are the ones written, and all of them if
// the last Read returns io.EOF. A block that does not authenticate fails
// with an error wrapping [ErrAuthFailed].
func (r *Reader) DeviceState() io.Reader {
	return &deviceStateReader{r: r, sr: io.NewSectionReader(r.ra, int64(r.tr.devOff), int64(r.tr.devLen))}
}

type deviceStateReader struct {
	r   *Reader
	sr  *io.SectionReader
	crc uint32
	n   int64 // stored bytes read
	err error

	// Encrypted file.
	block uint64 // number of the next block
	buf   []byte // stored bytes of a block, opened in place
	plain []byte // the unread content of the last block read
}

func (d *deviceStateReader) Read(p []byte) (int, error) {
	if d.r.seal != nil {
		return d.readSealed(p)
	}
	if d.err != nil {
		return 0, d.err
	}
	n, err := d.sr.Read(p)
	d.crc = crc32.Update(d.crc, castagnoli, p[:n])
	d.n += int64(n)
	switch {
	case errors.Is(err, io.EOF):
		err = d.r.checkDeviceState(d.n, d.crc)
	case err != nil:
		err = formatErr(PartDeviceState, 0, int64(d.r.tr.devOff)+d.n, err, "read")
	}
	d.err = err
	return n, err
}

func (d *deviceStateReader) readSealed(p []byte) (int, error) {
	for len(d.plain) == 0 {
		if d.err != nil {
			return 0, d.err
		}
		d.err = d.nextBlock()
	}
	n := copy(p, d.plain)
	d.plain = d.plain[n:]
	return n, nil
}

// nextBlock reads, checks and opens the next block of an encrypted device
// state into d.plain; past the last block, it checks the CRC, and returns
// io.EOF if it is right.
func (d *deviceStateReader) nextBlock() error {
	total := int64(d.r.tr.devLen)
	if d.n == total {
		return d.r.checkDeviceState(d.n, d.crc)
	}
	if d.buf == nil {
		d.buf = make([]byte, min(total, sealBlock+tagLen))
	}
	b := d.buf[:min(total-d.n, sealBlock+tagLen)]
	off := int64(d.r.tr.devOff) + d.n
	if err := d.r.readAt(PartDeviceState, 0, b, off); err != nil {
		return err
	}
	d.crc = crc32.Update(d.crc, castagnoli, b)
	d.n += int64(len(b))
	plain, err := d.r.seal.open(b[:0], b, PartDeviceState, d.block, d.n == total)
	if err != nil {
		return formatErr(PartDeviceState, 0, off, ErrAuthFailed, "block %d: changed or moved since it was sealed", d.block)
	}
	d.block++
	d.plain = plain
	return nil
}

// checkDeviceState checks n stored bytes of device state with the CRC got;
// it returns io.EOF if they are right.
func (r *Reader) checkDeviceState(n int64, got uint32) error {
	end := int64(r.tr.devOff + r.tr.devLen)
	if n != int64(r.tr.devLen) {
		return formatErr(PartDeviceState, 0, int64(r.tr.devOff)+n, ErrTruncated, "%d bytes of %d", n, r.tr.devLen)
	}
	var b [crcLen]byte
	if err := r.readAt(PartDeviceState, 0, b[:], end); err != nil {
		return err
	}
	if want := binary.LittleEndian.Uint32(b[:]); got != want {
		return formatErr(PartDeviceState, 0, end, ErrCorrupt, "crc %#08x, stored %#08x", got, want)
	}
	return io.EOF
}

// Verify reads the whole file and checks every part: the checksums of the
// header, bitmap, every chunk, the index and the device state, that every
// chunk decodes to its length, the trailer and the whole-file checksum.
// In an encrypted file it also authenticates every part but the trailer,
// which needs the key: a Reader of an encrypted file has it. It returns a
// [*FormatError] for the first bad part in file order. progress, if not
// nil, is called with the bytes checked and the file size.
func (r *Reader) Verify(progress func(done, total uint64)) error {
	block := int64(1 << 20)
	if r.seal != nil {
		// Read sealed sections block by block, to open each.
		block = sealBlock + tagLen
	}
	v := verifier{r: r, progress: progress, buf: make([]byte, min(block, r.size))}
	if err := v.header(); err != nil {
		return err
	}
	bitmapLen := r.chunksOff - crcLen - r.bitmapOff
	if r.placed() {
		n, _ := pagemap.EncodedLen(r.h.Pages.Total)
		bitmapLen = int64(n)
	}
	if err := v.section(PartBitmap, r.bitmapOff, bitmapLen); err != nil {
		return err
	}
	var b chunkBuffers
	for i := range r.chunks {
		if err := v.chunk(i, &b); err != nil {
			return err
		}
	}
	if err := v.section(PartIndex, int64(r.tr.indexOff), int64(r.tr.indexLen)); err != nil {
		return err
	}
	if err := v.section(PartDeviceState, int64(r.tr.devOff), int64(r.tr.devLen)); err != nil {
		return err
	}
	off := r.size - trailerLen
	if r.chained() {
		n, _ := pagemap.EncodedLen(r.h.Pages.Total)
		if err := v.section(PartInUse, r.sumsOff-int64(n)-crcLen, int64(n)); err != nil {
			return err
		}
		if err := v.section(PartHashes, r.sumsOff, off-crcLen-r.sumsOff); err != nil {
			return err
		}
	}
	tb := make([]byte, trailerLen)
	if err := r.readAt(PartTrailer, 0, tb, off); err != nil {
		return err
	}
	t, err := parseTrailer(tb, off)
	if err != nil {
		return err
	}
	if t != r.tr {
		return formatErr(PartTrailer, 0, off, ErrCorrupt, "changed since the file was opened")
	}
	if !r.placed() && v.fileCRC != t.fileCRC {
		return formatErr(PartTrailer, 0, off+32, ErrCorrupt, "file crc %#08x, stored %#08x", v.fileCRC, t.fileCRC)
	}
	v.pos = off
	v.advance(trailerLen)
	return nil
}

// verifier reads a checkpoint front to back for [Reader.Verify].
type verifier struct {
	r        *Reader
	progress func(done, total uint64)
	buf      []byte
	pos      int64 // bytes checked
	fileCRC  uint32
}

func (v *verifier) advance(n int64) {
	v.pos += n
	if v.progress != nil {
		v.progress(uint64(v.pos), uint64(v.r.size))
	}
}

// header checks the header section again, as NewReaderKey did: in an
// encrypted file, that it authenticates and is the one the Reader was
// opened with.
func (v *verifier) header() error {
	// NewReaderKey bounded the header by MaxHeaderBody.
	b := make([]byte, v.r.bitmapOff)
	if err := v.r.readAt(PartHeader, 0, b, 0); err != nil {
		return err
	}
	v.fileCRC = crc32.Update(v.fileCRC, castagnoli, b)
	_, context, err := decodeHeader(b, v.r.fixedLen, v.r.seal)
	if err != nil {
		return err
	}
	if v.r.seal != nil && context != v.r.seal.context {
		return formatErr(PartHeader, 0, int64(v.r.fixedLen), ErrCorrupt, "changed since the file was opened")
	}
	v.advance(int64(len(b)))
	return nil
}

// section checks the n stored bytes at off followed by their CRC; in an
// encrypted file, it opens each block.
func (v *verifier) section(part Part, off, n int64) error {
	if v.r.placed() {
		// Version 3 has gaps (holes) and no file CRC: each part is
		// checked where the index and trailer place it.
		v.pos = off
	}
	if off != v.pos {
		// The layout checks of NewReader rule this out.
		return formatErr(part, 0, off, ErrCorrupt, "starts at %#x, previous part ends at %#x", off, v.pos)
	}
	var sum uint32
	for k := uint64(0); n > 0; k++ {
		b := v.buf[:min(n, int64(len(v.buf)))]
		if err := v.r.readAt(part, 0, b, v.pos); err != nil {
			return err
		}
		sum = crc32.Update(sum, castagnoli, b)
		v.fileCRC = crc32.Update(v.fileCRC, castagnoli, b)
		n -= int64(len(b))
		if v.r.seal != nil {
			if _, err := v.r.seal.open(b[:0], b, part, k, n == 0); err != nil {
				return formatErr(part, 0, v.pos, ErrAuthFailed, "block %d: changed or moved since it was sealed", k)
			}
		}
		v.advance(int64(len(b)))
	}
	b := v.buf[:crcLen]
	if err := v.r.readAt(part, 0, b, v.pos); err != nil {
		return err
	}
	v.fileCRC = crc32.Update(v.fileCRC, castagnoli, b)
	if want := binary.LittleEndian.Uint32(b); sum != want {
		return formatErr(part, 0, v.pos, ErrCorrupt, "crc %#08x, stored %#08x", sum, want)
	}
	v.advance(crcLen)
	return nil
}

func (v *verifier) chunk(i int, b *chunkBuffers) error {
	c := &v.r.chunks[i]
	if v.r.placed() {
		v.pos = c.Offset
	}
	if c.Offset != v.pos {
		return formatErr(PartChunk, i, c.Offset, ErrCorrupt, "starts at %#x, previous part ends at %#x", c.Offset, v.pos)
	}
	b.stored = grow(b.stored, c.StoredLen)
	if err := v.r.readAt(PartChunk, i, b.stored, c.Offset); err != nil {
		return err
	}
	v.fileCRC = crc32.Update(v.fileCRC, castagnoli, b.stored)
	raw := b.stored // a raw chunk needs only its CRC checked, and opening in place
	if c.Encoding != EncodingRaw {
		b.raw = grow(b.raw, c.RawLen)
		raw = b.raw
	}
	if err := v.r.decodeChunk(i, b.stored, raw); err != nil {
		return err
	}
	v.advance(int64(c.StoredLen))
	return nil
}

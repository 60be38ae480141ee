package writer

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"sync"

	"github.com/pierrec/lz4/v4"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// Live writes a version 3 checkpoint whose chunks are placed, and
// replaced, in any order before the set of saved pages is final: the file
// of a live checkpoint, whose pre-copy rounds write pages while the guest
// runs and rewrite those it changes. Each chunk has a key (the caller's:
// a group of pages, say); [Live.Put] stores the chunk of a key, replacing
// the one it had. A replaced chunk is rewritten in place where the new one
// fits its extent, else placed at the end and its old extent punched out
// of the file (FALLOC_FL_PUNCH_HOLE), so that no stale copy survives to
// the committed file, whose chunks are exactly the last Put of each key.
//
// [CreateLive], any number of [Live.Put] and [Live.Drop] (with
// [Live.Sync] between rounds, so that the last round's sync is short),
// then [Live.WriteDeviceState] and [Live.Commit]. The bitmap of saved
// pages is the union of the chunks' pages, known at Commit, and written
// with the header into the space reserved for them at the start of the
// file.
//
// [Live.Put], [Live.PutRaw], [Live.Patch] and [Live.Drop] may run in
// parallel for distinct keys, and nothing else may run meanwhile: the
// rounds of a live save store groups from several goroutines. It writes
// through the page
// cache (rewrites in place would defeat O_DIRECT's alignment) and does not
// encrypt: a rewritten chunk sealed again under its position's nonce would
// reuse it.
type Live struct {
	// mu guards, while chunks are put in parallel, state, err, end,
	// chunks (the map; a chunk's own fields belong to the one goroutine
	// putting its key), stats and the file's closing.
	mu    sync.Mutex
	dir   *targetDir
	f     *os.File
	tmp   string
	h     Header
	opts  Options
	state writerState
	err   error

	reserve  int // header body bytes reserved at the start
	chunksAt int64
	end      int64 // end of the chunk area so far
	devOff   int64
	devLen   uint64
	index    []indexEntry
	chunks   map[uint64]*placed
	lz4      sync.Pool // of *liveLZ4
	stats    LiveStats
	replaced *os.File // see renameOver
	stored   *pagemap.Bitmap
	// inUse, for a checkpoint with a parent (version 4), is the pages in
	// use and their hashes, given by SetInUse before the device state.
	inUse *pagehash.Table
	// wb takes the ranges written since [Live.WriteBehind] to the
	// goroutine that starts their write-back; wbDone is closed when it
	// has stopped.
	wb     chan [2]int64
	wbDone chan struct{}
}

// placed is a chunk's place in the file.
type placed struct {
	off    int64
	extent int64 // bytes of the file it may use: stored length, aligned up
	pages  []uint64
	e      indexEntry
	// pageCRCs are a raw chunk's pages' CRCs, whose combination is its
	// CRC (crcCombinePages): a patch recomputes only those it changes.
	pageCRCs []uint32
}

// LiveStats counts what a [Live] writer did.
type LiveStats struct {
	Stats
	// Puts counts [Live.Put] and [Live.PutRaw] calls; InPlace those that
	// rewrote a chunk in its old extent, Moved those that placed it anew
	// and punched the old one. Patches counts [Live.Patch] calls that
	// patched.
	Puts, InPlace, Moved, Patches int
	// PutBytes is what every Put and Patch stored, rewrites included: the
	// bytes written for pages. Punched is what was punched out again.
	PutBytes, Punched int64
}

// headerReserve is how many bytes the header body may grow between
// [CreateLive] and Commit: the page counts, at most 2^36 (11 digits) each,
// are all that changes.
const headerReserve = 256

// CreateLive starts writing a version 3 checkpoint to be committed at
// path, as [Create] does for version 1: a temporary file beside it, mode
// 0600, never through a symlink. opts.Key must be nil; opts.Zeros and
// opts.Workers are not used.
func CreateLive(path string, h Header, opts Options) (*Live, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("create checkpoint: %w", err)
	}
	if opts.Key != nil {
		return nil, fmt.Errorf("create checkpoint: a live checkpoint cannot be encrypted")
	}
	if IsStored(path) {
		return nil, fmt.Errorf("create checkpoint: a live checkpoint is written in place, round after round, which %s cannot take: save it to a local file, or save without --live", path)
	}
	if opts.InUse != nil {
		return nil, fmt.Errorf("create checkpoint: a live checkpoint takes its pages in use at the end (Live.SetInUse)")
	}
	if h, err = newHeader(h, opts, true); err != nil {
		return nil, err
	}
	body, err := json.Marshal(&h)
	if err != nil {
		return nil, fmt.Errorf("create checkpoint: header: %w", err)
	}
	reserve := len(body) + headerReserve
	if reserve > MaxHeaderBody {
		return nil, fmt.Errorf("create checkpoint: header body of %d bytes: %w", len(body), ErrTooLarge)
	}
	bitmapLen, _ := pagemap.EncodedLen(h.Pages.Total)
	chunksAt := alignUp(int64(fixedHeaderLen+reserve+crcLen) + int64(bitmapLen) + crcLen)

	dir, f, tmp, err := createBeside(path)
	if err != nil {
		return nil, err
	}
	return &Live{
		dir: dir, f: f, tmp: tmp, h: h, opts: opts,
		reserve: reserve, chunksAt: chunksAt, end: chunksAt,
		chunks: map[uint64]*placed{},
	}, nil
}

// liveLZ4 is one goroutine's LZ4 compressor and output buffer.
type liveLZ4 struct {
	c   lz4.Compressor
	buf []byte
}

// TempPath returns the path of the temporary file being written.
func (l *Live) TempPath() string { return l.dir.join(l.tmp) }

// Stats returns what l has done so far.
func (l *Live) Stats() LiveStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stats
}

// ChunkBytes returns the stored bytes of key's chunk, 0 if it has none.
func (l *Live) ChunkBytes(key uint64) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p := l.chunks[key]; p != nil {
		return int64(p.e.storedLen)
	}
	return 0
}

func (l *Live) fail(err error) error {
	l.err = err
	l.state = stateFailed
	l.cleanup()
	return err
}

func (l *Live) cleanup() {
	l.stopWriteBehind()
	if l.f != nil {
		l.f.Close()
		l.f = nil
		unix.Unlinkat(l.dir.fd, l.tmp, 0)
	}
	l.dir.close()
}

func (l *Live) expect(s writerState, op string) error {
	switch {
	case l.state == s:
		return nil
	case l.state == stateFailed:
		return fmt.Errorf("%s: checkpoint writer failed earlier: %w", op, l.err)
	case l.state >= stateCommitted:
		return fmt.Errorf("%s: checkpoint writer closed", op)
	}
	return fmt.Errorf("%s: called out of order", op)
}

// Abort removes the temporary file unless Commit succeeded; it may be
// deferred and called more than once.
func (l *Live) Abort() error {
	if l.state >= stateCommitted {
		return nil
	}
	l.state = stateAborted
	l.cleanup()
	return nil
}

// Put stores the chunk of key: the pages (page numbers of the checkpoint,
// ascending, 1 to chunk_pages of them) whose contents data holds, one page
// after the other. It replaces the chunk key had. data is not kept.
func (l *Live) Put(key uint64, pages []uint64, data []byte) error {
	return l.put(key, pages, data, l.h.Compression == CompressionLZ4)
}

// PutRaw is [Live.Put] storing the chunk raw, whatever the compression:
// for a chunk likely to change again, which [Live.Patch] can then rewrite
// page by page.
func (l *Live) PutRaw(key uint64, pages []uint64, data []byte) error {
	return l.put(key, pages, data, false)
}

// Patch rewrites, in place, the pages of key's chunk that changed: the
// chunk must be stored raw and hold exactly pages, data is laid out as
// the chunk's whole content and changed lists the indexes, in pages, of
// the pages whose content differs from what the chunk holds, ascending; only those
// are read from data and written (the chunk's CRC is combined from its
// pages'). It reports false, having done nothing, when the chunk is not
// raw or holds other pages: then Put it.
func (l *Live) Patch(key uint64, pages []uint64, data []byte, changed []int) (bool, error) {
	l.mu.Lock()
	if err := l.expect(stateOpen, "patch chunk"); err != nil {
		l.mu.Unlock()
		return false, err
	}
	p, f := l.chunks[key], l.f
	l.mu.Unlock()
	if p == nil || p.e.encoding != EncodingRaw || !slices.Equal(p.pages, pages) {
		return false, nil
	}
	ps := int(l.h.PageSize)
	if len(data) != len(pages)*ps {
		return false, fmt.Errorf("patch chunk: %d bytes for %d pages", len(data), len(pages))
	}
	for k, i := range changed {
		if i < 0 || i >= len(pages) || k > 0 && i <= changed[k-1] {
			return false, fmt.Errorf("patch chunk: page index %d of %d, after %v", i, len(pages), changed[:k])
		}
	}
	// Runs of consecutive pages go out in one write each.
	for k := 0; k < len(changed); {
		first := changed[k]
		n := 1
		for k+n < len(changed) && changed[k+n] == first+n {
			n++
		}
		run := data[first*ps : (first+n)*ps]
		if _, err := f.WriteAt(run, p.off+int64(first*ps)); err != nil {
			l.mu.Lock()
			defer l.mu.Unlock()
			return false, l.fail(fmt.Errorf("patch chunk: %w", err))
		}
		for j := range n {
			p.pageCRCs[first+j] = crc(run[j*ps : (j+1)*ps])
		}
		k += n
	}
	p.e.crc = crcCombinePages(p.pageCRCs)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stats.PutBytes += int64(len(changed) * ps)
	l.stats.Patches++
	l.startWriteback(p.off, p.extent)
	return true, nil
}

func (l *Live) put(key uint64, pages []uint64, data []byte, compress bool) error {
	ps := uint64(l.h.PageSize)
	switch {
	case len(pages) == 0 || len(pages) > int(l.h.ChunkPages):
		return fmt.Errorf("put chunk: %d pages, want 1 to %d", len(pages), l.h.ChunkPages)
	case uint64(len(data)) != uint64(len(pages))*ps:
		return fmt.Errorf("put chunk: %d bytes for %d pages", len(data), len(pages))
	case pages[len(pages)-1] >= l.h.Pages.Total:
		return fmt.Errorf("put chunk: page %d past the %d of the regions", pages[len(pages)-1], l.h.Pages.Total)
	}
	for i := 1; i < len(pages); i++ {
		if pages[i] <= pages[i-1] {
			return fmt.Errorf("put chunk: pages not ascending at %d", i)
		}
	}
	e := indexEntry{firstPage: pages[0], rawLen: uint32(len(data)), encoding: EncodingRaw}
	out := data
	if compress {
		z, _ := l.lz4.Get().(*liveLZ4)
		if z == nil {
			z = &liveLZ4{buf: make([]byte, lz4.CompressBlockBound(int(l.h.ChunkPages)*int(ps)))}
		}
		defer l.lz4.Put(z)
		// As the sequential writer: LZ4 only where it saves 1/16.
		limit := len(data) - len(data)/16
		if n, _ := z.c.CompressBlock(data, z.buf[:limit]); n > 0 {
			e.encoding, out = EncodingLZ4, z.buf[:n]
		}
	}
	e.storedLen = uint32(len(out))
	var pageCRCs []uint32
	if e.encoding == EncodingRaw {
		pageCRCs = make([]uint32, len(pages))
		for i := range pages {
			pageCRCs[i] = crc(out[i*int(ps) : (i+1)*int(ps)])
		}
		e.crc = crcCombinePages(pageCRCs)
	} else {
		e.crc = crc(out)
	}
	need := alignUp(int64(len(out)))
	// The place: decided under the lock, written outside it.
	l.mu.Lock()
	if err := l.expect(stateOpen, "put chunk"); err != nil {
		l.mu.Unlock()
		return err
	}
	p := l.chunks[key]
	switch {
	case p != nil && need <= p.extent:
		l.stats.InPlace++
	case p != nil:
		if err := l.punch(p.off, p.extent); err != nil {
			defer l.mu.Unlock()
			return l.fail(err)
		}
		l.stats.Moved++
		p.off, p.extent = l.end, need
		l.end += need
	default:
		p = &placed{off: l.end, extent: need}
		l.end += need
		l.chunks[key] = p
	}
	f := l.f
	l.mu.Unlock()
	if _, err := f.WriteAt(out, p.off); err != nil {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.fail(fmt.Errorf("put chunk: %w", err))
	}
	e.offset = uint64(p.off)
	p.e = e
	p.pageCRCs = pageCRCs
	p.pages = append(p.pages[:0], pages...)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stats.Puts++
	l.stats.PutBytes += int64(len(out))
	l.startWriteback(p.off, int64(len(out)))
	return nil
}

// Drop removes the chunk of key, if it has one, and punches its extent.
func (l *Live) Drop(key uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.expect(stateOpen, "drop chunk"); err != nil {
		return err
	}
	p, ok := l.chunks[key]
	if !ok {
		return nil
	}
	delete(l.chunks, key)
	if err := l.punch(p.off, p.extent); err != nil {
		return l.fail(err)
	}
	return nil
}

// punch frees [off, off+n) of the file; it reads as zeros afterwards. A
// file system that cannot punch gets zeros written, so that no stale page
// stays in the file either way.
func (l *Live) punch(off, n int64) error {
	l.stats.Punched += n
	err := unix.Fallocate(int(l.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("punch stale chunk: %w", err)
	}
	if _, err := l.f.WriteAt(make([]byte, n), off); err != nil {
		return fmt.Errorf("zero stale chunk: %w", err)
	}
	return nil
}

// WriteBehind makes every later Put and Patch start writing its chunk to
// the disk (sync_file_range, SYNC_FILE_RANGE_WRITE, from a goroutine of
// its own, as the call may wait for the disk's queue), so that the disk
// works while the caller prepares the next chunks and the sync in Commit
// finds little left: for the final round of a live save, whose writes and
// sync are all in the guest's pause.
func (l *Live) WriteBehind() {
	if l.wb != nil || l.f == nil {
		return
	}
	l.wb, l.wbDone = make(chan [2]int64, 4096), make(chan struct{})
	fd := int(l.f.Fd()) // open until stopWriteBehind returns
	go func() {
		defer close(l.wbDone)
		for r := range l.wb {
			// A failure is not an error: Commit's sync writes it.
			_ = unix.SyncFileRange(fd, r[0], r[1], unix.SYNC_FILE_RANGE_WRITE)
		}
	}()
}

// startWriteback hands [off, off+n) to the write-back goroutine, if there
// is one and it keeps up; what it skips, the sync in Commit writes.
func (l *Live) startWriteback(off, n int64) {
	if l.wb == nil {
		return
	}
	select {
	case l.wb <- [2]int64{off, n}:
	default:
	}
}

// stopWriteBehind ends the write-back goroutine, before the file closes.
func (l *Live) stopWriteBehind() {
	if l.wb != nil {
		close(l.wb)
		<-l.wbDone
		l.wb = nil
	}
}

// Sync makes what was put so far durable (fdatasync), so that the sync in
// Commit has only the last round's chunks to write.
func (l *Live) Sync() error {
	if err := l.expect(stateOpen, "sync checkpoint"); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(l.f.Fd())); err != nil {
		return l.fail(fmt.Errorf("sync checkpoint: %w", err))
	}
	return nil
}

// SetInUse gives a checkpoint whose header names a parent, or one created
// with [Options].PageHashes, the pages in use at its moment and the hash
// of each, as [Options].InUse does for a
// [Writer]: the pages its chunks hold must be among them, and the others
// are what the parent restores. Call it before [Live.WriteDeviceState].
func (l *Live) SetInUse(t *pagehash.Table) error {
	if err := l.expect(stateOpen, "set pages in use"); err != nil {
		return err
	}
	if l.h.PageHash == "" {
		return fmt.Errorf("set pages in use: the checkpoint keeps no page hashes (no parent, no Options.PageHashes)")
	}
	if err := t.Check(); err != nil {
		return fmt.Errorf("set pages in use: %w", err)
	}
	if t.Pages.Len() != l.h.Pages.Total {
		return fmt.Errorf("set pages in use: bitmap of %d pages, regions hold %d", t.Pages.Len(), l.h.Pages.Total)
	}
	l.inUse = t
	return nil
}

// WriteDeviceState writes the index of the chunks put so far, then QEMU's
// device state, read from r until EOF; no chunk can be put after it.
func (l *Live) WriteDeviceState(r io.Reader) (int64, error) {
	if err := l.expect(stateOpen, "write device state"); err != nil {
		return 0, err
	}
	if l.h.PageHash != "" && l.inUse == nil {
		return 0, l.fail(fmt.Errorf("write device state: a checkpoint with a parent or page hashes needs its pages in use (SetInUse)"))
	}
	ps := make([]*placed, 0, len(l.chunks))
	for _, p := range l.chunks {
		ps = append(ps, p)
	}
	slices.SortFunc(ps, func(a, b *placed) int { return cmp.Compare(a.pages[0], b.pages[0]) })
	used := pagemap.NewBitmap(l.h.Pages.Total)
	var last uint64
	for i, p := range ps {
		if i > 0 && p.pages[0] <= last {
			return 0, l.fail(fmt.Errorf("write device state: chunks overlap at page %d", p.pages[0]))
		}
		for _, pg := range p.pages {
			used.Set(pg)
		}
		last = p.pages[len(p.pages)-1]
		l.index = append(l.index, p.e)
		l.stats.PagesWritten += uint64(len(p.pages))
		l.stats.PageBytes += int64(p.e.rawLen)
		l.stats.StoredBytes += int64(p.e.storedLen)
		if p.e.encoding == EncodingLZ4 {
			l.stats.ChunksLZ4++
		} else {
			l.stats.ChunksRaw++
		}
	}
	l.h.Pages.Saved = l.stats.PagesWritten
	if l.inUse != nil {
		if !used.SubsetOf(l.inUse.Pages) {
			return 0, l.fail(fmt.Errorf("write device state: a page stored is not in use"))
		}
		if l.h.Parent == nil && !used.Equal(l.inUse.Pages) {
			return 0, l.fail(fmt.Errorf("write device state: a checkpoint without a parent stores every page in use"))
		}
		l.h.Pages.InUse = uint64(len(l.inUse.Sums))
		l.stored = used
	}
	idx := make([]byte, 0, len(l.index)*indexEntryLen+crcLen)
	for i := range l.index {
		idx = l.index[i].append(idx)
	}
	idx = binary.LittleEndian.AppendUint32(idx, crc(idx))
	if _, err := l.f.WriteAt(idx, l.end); err != nil {
		return 0, l.fail(fmt.Errorf("write index: %w", err))
	}
	l.devOff = l.end + int64(len(idx))
	cw := &crcWriterAt{f: l.f, off: l.devOff}
	n, err := io.CopyBuffer(cw, io.LimitReader(r, l.opts.MaxDeviceState+1), make([]byte, 1<<20))
	switch {
	case cw.err != nil:
		return n, l.fail(fmt.Errorf("write device state: %w", cw.err))
	case err != nil:
		return n, l.fail(fmt.Errorf("read device state: %w", err))
	case n > l.opts.MaxDeviceState:
		return n, l.fail(fmt.Errorf("write device state: more than %d bytes: %w", l.opts.MaxDeviceState, ErrTooLarge))
	}
	l.devLen = uint64(n)
	l.stats.DeviceStateBytes = n
	if _, err := l.f.WriteAt(binary.LittleEndian.AppendUint32(nil, cw.crc), cw.off); err != nil {
		return n, l.fail(fmt.Errorf("write device state: %w", err))
	}
	// The header and bitmap, at the start: written now that the saved
	// pages are known.
	body, err := json.Marshal(&l.h)
	if err != nil || len(body) > l.reserve {
		return n, l.fail(fmt.Errorf("write header: body of %d bytes outgrew the %d reserved", len(body), l.reserve))
	}
	head := make([]byte, 0, fixedHeaderLen+l.reserve+crcLen)
	head = append(head, magic[:]...)
	version := uint32(versionPlaced)
	if l.inUse != nil {
		version = versionChained
	}
	head = binary.LittleEndian.AppendUint32(head, version)
	head = binary.LittleEndian.AppendUint32(head, uint32(l.reserve))
	head = append(head, body...)
	for len(head) < fixedHeaderLen+l.reserve {
		head = append(head, ' ') // JSON allows trailing white space
	}
	head = binary.LittleEndian.AppendUint32(head, crc(head))
	bm, err := used.MarshalBinary()
	if err != nil {
		return n, l.fail(fmt.Errorf("write bitmap: %w", err))
	}
	head = append(head, bm...)
	head = binary.LittleEndian.AppendUint32(head, crc(bm))
	if int64(len(head)) > l.chunksAt {
		return n, l.fail(fmt.Errorf("write header: %d bytes, %d reserved", len(head), l.chunksAt))
	}
	if _, err := l.f.WriteAt(head, 0); err != nil {
		return n, l.fail(fmt.Errorf("write header: %w", err))
	}
	l.state = stateDevice
	return n, nil
}

// crcWriterAt writes sequentially at off with WriteAt, keeping a CRC.
type crcWriterAt struct {
	f   *os.File
	off int64
	crc uint32
	err error
}

func (c *crcWriterAt) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.f.WriteAt(p, c.off)
	c.off += int64(n)
	c.crc = crc32.Update(c.crc, castagnoli, p[:n])
	c.err = err
	return n, err
}

// ReleaseReplaced is [Writer.ReleaseReplaced].
func (l *Live) ReleaseReplaced() {
	if l.replaced != nil {
		l.replaced.Close()
		l.replaced = nil
	}
}

// Commit writes the trailer, syncs the file, renames it over the target
// and syncs the directory, as [Writer.Commit].
func (l *Live) Commit() error {
	if err := l.expect(stateDevice, "commit checkpoint"); err != nil {
		return err
	}
	tr := trailer{
		indexOff: uint64(l.end),
		indexLen: uint64(len(l.index) * indexEntryLen),
		devOff:   uint64(l.devOff),
		devLen:   l.devLen,
	}
	end := l.devOff + int64(l.devLen) + crcLen
	if t := l.inUse; t != nil {
		// The chain section, as [Writer.Commit] writes it.
		bm, err := t.Pages.MarshalBinary()
		if err != nil {
			return l.fail(fmt.Errorf("commit checkpoint: %w", err))
		}
		sec := binary.LittleEndian.AppendUint32(bm, crc(bm))
		sums := storedSums(t, l.stored)
		sec = append(sec, sums...)
		sec = binary.LittleEndian.AppendUint32(sec, crc(sums))
		if _, err := l.f.WriteAt(sec, end); err != nil {
			return l.fail(fmt.Errorf("commit checkpoint: %w", err))
		}
		end += int64(len(sec))
	}
	if _, err := l.f.WriteAt(tr.append(nil), end); err != nil {
		return l.fail(fmt.Errorf("commit checkpoint: %w", err))
	}
	l.stats.BytesWritten = end + trailerLen
	l.stopWriteBehind()
	f := l.f
	l.f = nil // closed by renameOver, which removes it on failure
	renamed, replaced, err := renameOver(l.dir, f, l.tmp)
	l.replaced = replaced
	if !renamed {
		return l.fail(err)
	}
	l.state = stateCommitted
	return err
}

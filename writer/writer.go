package writer

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/pierrec/lz4/v4"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// Options tunes a [Writer]. The zero value means the defaults.
type Options struct {
	// Compression is how chunks are stored; "" means [CompressionLZ4].
	// [CompressionAuto] paces a [Writer]'s LZ4 by its disk; a [Live]
	// writer takes it as CompressionLZ4.
	Compression Compression
	// ChunkPages is the number of pages per chunk; 0 means
	// [DefaultChunkPages].
	ChunkPages int
	// Workers is the number of goroutines compressing chunks; 0 means
	// the number of CPUs (GOMAXPROCS outside a pipeline).
	Workers int
	// MaxDeviceState bounds the device state in bytes; 0 means
	// [DefaultMaxDeviceState].
	MaxDeviceState int64
	// Key, if not nil, is the [KeySize]-byte key to encrypt the checkpoint
	// with (see [LoadKeyFile]); nil means no encryption. The writer keeps
	// only the file key derived from it.
	Key []byte
	// Zeros, if not nil, marks saved pages known to read as zero without
	// reading them: holes of a RAM file, which a read through the mapping
	// would make the host allocate. Its length must be the regions' page
	// count.
	Zeros *pagemap.Bitmap
	// InUse, if not nil, makes the file version 4: it holds the pages in
	// use in the guest and the hash of each as restored; the file's chain
	// section keeps the bitmap and the hashes of the pages it stores, so
	// that a later checkpoint can name this one as its parent. The pages [Writer.WritePages] stores must be among
	// them: all of them, unless the header names a parent. Not with Key.
	InUse *pagehash.Table
	// PageHashes makes a file without a parent version 4 too: the
	// writer hashes every page it writes, as it writes it, so that the
	// file can be a parent without being read again. Not with Key; for a
	// [Live] writer, the hashes come from [Live.SetInUse].
	PageHashes bool
}

func (o Options) withDefaults() (Options, error) {
	if o.Compression == "" {
		o.Compression = CompressionLZ4
	}
	if o.Compression != CompressionLZ4 && o.Compression != CompressionNone && o.Compression != CompressionAuto {
		return o, fmt.Errorf("unknown compression %q", o.Compression)
	}
	if o.ChunkPages == 0 {
		o.ChunkPages = DefaultChunkPages
	}
	if o.ChunkPages < 0 || o.ChunkPages > MaxChunkPages {
		return o, fmt.Errorf("chunk pages %d not in [1, %d]", o.ChunkPages, MaxChunkPages)
	}
	if o.Workers <= 0 {
		o.Workers = cpus()
	}
	if o.MaxDeviceState == 0 {
		o.MaxDeviceState = DefaultMaxDeviceState
	}
	if o.MaxDeviceState < 0 {
		return o, fmt.Errorf("negative device state limit %d", o.MaxDeviceState)
	}
	return o, nil
}

// Stats counts what a [Writer] wrote.
type Stats struct {
	// BytesWritten is the size of the file so far; after Commit, its size.
	BytesWritten int64
	// PagesWritten is the number of pages saved.
	PagesWritten uint64
	// ChunksRaw and ChunksLZ4 count chunks by how they were stored.
	ChunksRaw, ChunksLZ4 int
	// PageBytes is the size of the saved pages, StoredBytes what they
	// took in the file.
	PageBytes, StoredBytes int64
	// DeviceStateBytes is the size of the device state.
	DeviceStateBytes int64
	// Stages is where the pages' time went.
	Stages Stages
}

// Stages is the time the pages of [Writer.WritePages] spent in each
// stage of its pipeline. The workers' stages are summed over the
// workers, so they add up to about Workers times the wall time when the
// workers are the limit; Disk is the time the disk took to write, which
// is the wall time when it is the limit.
type Stages struct {
	// Workers is the number of workers.
	Workers int
	// Read is the workers' time getting the pages: mapping them in,
	// reading or copying them into chunk buffers.
	Read time.Duration
	// Hash is the workers' time hashing pages (Options.PageHashes).
	Hash time.Duration
	// Compress is the workers' time in LZ4, Seal their time encrypting,
	// Checksum their time computing CRCs.
	Compress time.Duration
	Seal     time.Duration
	Checksum time.Duration
	// Idle is the workers' time waiting for a chunk to work on: the
	// writer is behind.
	Idle time.Duration
	// WaitChunk is the writing goroutine's time waiting for the next
	// chunk in file order: the workers are behind.
	WaitChunk time.Duration
	// WaitDisk is its time handing chunks to the disk's buffers:
	// copying them in, and waiting for a buffer the disk has written
	// when the disk is behind.
	WaitDisk time.Duration
	// Disk is the time the disk's writes took.
	Disk time.Duration
	// RawChunks is the number of chunks CompressionAuto stored raw
	// without trying LZ4, because the disk would have waited for them.
	RawChunks int
}

func (s *Stages) add(o *Stages) {
	s.Read += o.Read
	s.Hash += o.Hash
	s.Compress += o.Compress
	s.Seal += o.Seal
	s.Checksum += o.Checksum
	s.Idle += o.Idle
	s.RawChunks += o.RawChunks
}

type writerState uint8

const (
	stateOpen      writerState = iota // created; WritePages next
	statePages                        // WriteDeviceState next
	stateDevice                       // Commit next
	stateCommitted                    // done
	stateAborted                      // temporary file removed by Abort
	stateFailed                       // temporary file removed after an error
)

// flushWriter is where the Writer's bytes go: a [fileWriter], or a test's
// stand-in.
type flushWriter interface {
	Write(p []byte) (int, error)
	Flush() error
}

// Writer writes one checkpoint: [Create], then [Writer.WritePages],
// [Writer.WriteDeviceState] and [Writer.Commit], in that order. Any error
// in these calls removes the temporary file and makes later calls fail;
// the target is only replaced by a successful Commit. Call [Writer.Abort]
// (deferred) to remove the temporary file on other paths.
//
// A Writer is not safe for concurrent use.
type Writer struct {
	// A local file: its directory, the temporary file and its name there;
	// or a store's sink (then dir and f are nil).
	dir     *targetDir
	f       *os.File
	tmp     string // name of f in dir
	sink    Sink
	bw      flushWriter
	off     int64  // bytes written to bw
	fileCRC uint32 // of the bytes written to bw
	err     error  // first write error, sticky

	h     Header
	opts  Options
	seal  *sealer // nil without encryption
	salt  []byte
	state writerState
	index []byte // encoded index entries
	// stored is the bitmap of the pages written, for the chain section;
	// hashing says the compressors fill in opts.InUse's hashes.
	stored  *pagemap.Bitmap
	hashing bool
	tr      trailer
	stats   Stats
	// replaced is the file the commit replaced, open (see renameOver).
	replaced *os.File
}

// Create starts writing a checkpoint to be committed at path, with the
// header h (see [Header] for the fields the writer sets). It creates a
// temporary file in the directory of path, with mode 0600; it refuses a
// path that exists and is not a regular file, so it never writes through
// a symlink. Callers should remove temporary files of crashed writers with
// [CleanStale].
//
// With [Options].Key, the checkpoint is encrypted: see the package
// documentation.
func Create(path string, h Header, opts Options) (*Writer, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("create checkpoint: %w", err)
	}
	var seal *sealer
	var salt []byte
	if opts.Key != nil {
		// A fresh salt makes a fresh file key, under which the fixed
		// nonces of the format are never reused.
		salt = make([]byte, saltLen)
		rand.Read(salt) // never fails since Go 1.24
		if seal, err = newSealer(opts.Key, salt); err != nil {
			return nil, fmt.Errorf("create checkpoint: %w", err)
		}
		opts.Key = nil
	}
	if opts.PageHashes && seal != nil {
		return nil, fmt.Errorf("create checkpoint: a checkpoint with page hashes cannot be encrypted")
	}
	if opts.InUse != nil {
		if seal != nil {
			return nil, fmt.Errorf("create checkpoint: a checkpoint with page hashes (incremental) cannot be encrypted")
		}
		if err := opts.InUse.Check(); err != nil {
			return nil, fmt.Errorf("create checkpoint: %w", err)
		}
	}
	if h, err = newHeader(h, opts, false); err != nil {
		return nil, err
	}
	w := &Writer{h: h, opts: opts, seal: seal, salt: salt}
	st, err := storeOf(path)
	if err != nil {
		return nil, fmt.Errorf("create checkpoint: %w", err)
	}
	if st != nil {
		// About the size of the file: every page raw, and some.
		hint := int64(h.Pages.Total)*int64(h.PageSize) + 1<<20
		if w.sink, err = st.Create(path, hint); err != nil {
			return nil, fmt.Errorf("create checkpoint: %w", err)
		}
		w.bw = sinkWriter{w.sink}
		return w, nil
	}
	if w.dir, w.f, w.tmp, err = createBeside(path); err != nil {
		return nil, err
	}
	w.bw = newFileWriter(w.f)
	return w, nil
}

// newHeader is h as a writer with opts writes it: the fields the writer
// sets, set, and checked. A live writer (live) takes the page hashes of a
// file with a parent at its end, not in opts.
func newHeader(h Header, opts Options, live bool) (Header, error) {
	h = h.clone()
	if h.PageSize == 0 {
		h.PageSize = PageSize
	}
	h.ChunkPages = uint32(opts.ChunkPages)
	h.Compression = opts.Compression
	if h.Compression == CompressionAuto {
		h.Compression = CompressionLZ4
	}
	if h.Created.IsZero() {
		h.Created = time.Now().UTC()
	}
	h.Pages.Saved = 0
	h.PageHash, h.Pages.InUse = "", 0
	var err error
	if h.Pages.Total, err = h.totalPages(); err != nil {
		return h, fmt.Errorf("create checkpoint: header: %w", err)
	}
	if t := opts.InUse; t != nil {
		if t.Pages.Len() != h.Pages.Total {
			return h, fmt.Errorf("create checkpoint: in-use bitmap of %d pages, regions hold %d", t.Pages.Len(), h.Pages.Total)
		}
		h.PageHash, h.Pages.InUse = pagehash.Name, uint64(len(t.Sums))
	} else if live && (h.Parent != nil || opts.PageHashes) {
		h.PageHash, h.Layout = pagehash.Name, LayoutPlaced
	} else if opts.PageHashes && h.Parent == nil && h.Layout == "" {
		h.PageHash = pagehash.Name
	} else if h.Parent != nil || h.Layout != "" {
		return h, fmt.Errorf("create checkpoint: a parent or a layout needs page hashes (Options.InUse)")
	}
	if err := h.check(); err != nil {
		return h, fmt.Errorf("create checkpoint: header: %w", err)
	}
	return h, nil
}

// createBeside opens the directory of path, checks the target, and
// creates the temporary file that will be renamed over it.
func createBeside(path string) (*targetDir, *os.File, string, error) {
	dir, err := openTargetDir(path)
	if err != nil {
		return nil, nil, "", fmt.Errorf("create checkpoint: %w", err)
	}
	if err := dir.checkTarget(); err != nil {
		dir.close()
		return nil, nil, "", fmt.Errorf("create checkpoint: %w", err)
	}
	f, tmp, err := dir.createTemp()
	if err != nil {
		dir.close()
		return nil, nil, "", fmt.Errorf("create checkpoint: %w", err)
	}
	return dir, f, tmp, nil
}

// renameOver syncs and closes f, the temporary file tmp in dir, renames it
// over the target and syncs the directory. On an error before the rename
// the temporary file is removed; f is closed in every case. renamed
// reports whether the target was replaced (an error after it is the
// directory sync's: the file is in place, but may not survive a crash).
//
// The file it replaces is returned open, if there was one: a file system
// frees a large file's blocks when its last reference goes, which takes
// ext4 about 200 ms for 512 MiB; the rename would pay that, in the guest's
// pause. The caller closes it once the guest runs again (see
// [Writer.ReleaseReplaced]); if the process dies first, its exit does.
func renameOver(dir *targetDir, f *os.File, tmp string) (renamed bool, replaced *os.File, err error) {
	if err := f.Sync(); err != nil {
		f.Close()
		unix.Unlinkat(dir.fd, tmp, 0)
		return false, nil, fmt.Errorf("commit checkpoint: %w", err)
	}
	if err := f.Close(); err != nil {
		unix.Unlinkat(dir.fd, tmp, 0)
		return false, nil, fmt.Errorf("commit checkpoint: %w", err)
	}
	replaced = dir.openReplaced()
	if err := unix.Renameat(dir.fd, tmp, dir.fd, dir.base); err != nil {
		unix.Unlinkat(dir.fd, tmp, 0)
		if replaced != nil {
			replaced.Close()
		}
		return false, nil, fmt.Errorf("commit checkpoint: %w", &os.LinkError{Op: "rename", Old: dir.join(tmp), New: dir.join(dir.base), Err: err})
	}
	err = unix.Fsync(dir.fd)
	dir.close()
	if err != nil {
		return true, replaced, fmt.Errorf("commit checkpoint: sync directory %s: %w", dir.path, err)
	}
	return true, replaced, nil
}

// ReleaseReplaced lets go of the file the checkpoint replaced at its path,
// whose blocks the file system frees now: call it once the guest runs
// again, so that the freeing is not in its pause. Commit without it leaves
// the file open until the process exits. It may be called more than once,
// and after a failed or aborted save.
func (w *Writer) ReleaseReplaced() {
	if w.replaced != nil {
		w.replaced.Close()
		w.replaced = nil
	}
}

// TempPath returns the path of the temporary file being written, or for a
// checkpoint in a store, where its bytes go.
func (w *Writer) TempPath() string {
	if w.sink != nil {
		return w.sink.String()
	}
	return w.dir.join(w.tmp)
}

// Stats returns what w has written so far.
func (w *Writer) Stats() Stats {
	s := w.stats
	s.BytesWritten = w.off
	return s
}

func (w *Writer) expect(s writerState, op string) error {
	switch {
	case w.state == s:
		return nil
	case w.state == stateFailed:
		return fmt.Errorf("%s: checkpoint writer failed earlier: %w", op, w.err)
	case w.state >= stateCommitted:
		return fmt.Errorf("%s: checkpoint writer closed", op)
	}
	return fmt.Errorf("%s: called out of order", op)
}

// fail records err as the writer's error, removes the temporary file and
// returns err.
func (w *Writer) fail(err error) error {
	w.err = err
	w.state = stateFailed
	w.cleanup()
	return err
}

// cleanup closes and removes the temporary file and closes the directory.
func (w *Writer) cleanup() error {
	if w.sink != nil {
		return w.sink.Abort()
	}
	var errs []error
	if c, ok := w.bw.(interface{ Close() }); ok {
		c.Close() // no write may run on the file closed next
	}
	if w.f != nil {
		w.f.Close()
		w.f = nil
		if err := unix.Unlinkat(w.dir.fd, w.tmp, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, &os.PathError{Op: "remove", Path: w.TempPath(), Err: err})
		}
	}
	w.dir.close()
	return errors.Join(errs...)
}

// Abort removes the temporary file, unless Commit succeeded, and makes the
// Writer unusable. It may be called more than once and after Commit, so a
// deferred Abort is the way to clean up on every path.
func (w *Writer) Abort() error {
	if w.state >= stateCommitted {
		return nil
	}
	w.state = stateAborted
	if err := w.cleanup(); err != nil {
		return fmt.Errorf("abort checkpoint: %w", err)
	}
	return nil
}

// write appends p to the file. Errors are sticky in w.err.
func (w *Writer) write(p []byte) {
	if w.err == nil {
		w.fileCRC = crc32.Update(w.fileCRC, castagnoli, p)
		w.put(p)
	}
}

// writeCRCd is write for bytes whose CRC is known: the file's CRC is
// combined from it rather than computed again.
func (w *Writer) writeCRCd(p []byte, c uint32) {
	if w.err == nil {
		w.fileCRC = crcCombine(w.fileCRC, c, len(p))
		w.put(p)
	}
}

// put appends p to the file, its CRC already counted.
func (w *Writer) put(p []byte) {
	n, err := w.bw.Write(p)
	w.off += int64(n)
	if err != nil {
		w.err = fmt.Errorf("write %s: %w", w.TempPath(), err)
	}
}

func (w *Writer) writeCRC(v uint32) {
	w.write(binary.LittleEndian.AppendUint32(nil, v))
}

// WritePages writes the header, the bitmap and the pages of used, read
// from ram: ram[i] is the memory of region i of the header, of its size,
// typically the host mapping of the region's RAM file. The caller clears
// the pages it does not save (free, zero) from used. ram must not change
// until WritePages returns: pause the guest.
//
// Chunks are compressed by [Options].Workers goroutines and written in
// order; memory use is two chunk buffers per worker. progress, if not nil,
// is called on the calling goroutine after each chunk with the number of
// pages written and the number to write.
//
// A fault reading ram (its file truncated) is returned as an error.
func (w *Writer) WritePages(ram [][]byte, used *pagemap.Bitmap, progress func(done, total uint64)) error {
	return w.WritePagesContext(context.Background(), ram, used, progress)
}

// WritePagesContext is [Writer.WritePages] that stops between chunks when
// ctx ends, failing the Writer (its temporary file is removed) with ctx's
// error.
func (w *Writer) WritePagesContext(ctx context.Context, ram [][]byte, used *pagemap.Bitmap, progress func(done, total uint64)) error {
	if err := w.expect(stateOpen, "write pages"); err != nil {
		return err
	}
	sp, err := newSpace(ram, &w.h)
	if err != nil {
		return fmt.Errorf("write pages: %w", err)
	}
	return w.writePages(ctx, sp, used, progress)
}

// WritePagesFrom is [Writer.WritePagesContext] for RAM that is not mapped
// into kvmckpt (another process's memory): page p of the page space, the
// regions one after another, is read from src at byte p*PageSize. src
// must be safe for concurrent ReadAt calls. A read error fails the
// Writer.
func (w *Writer) WritePagesFrom(ctx context.Context, src io.ReaderAt, used *pagemap.Bitmap, progress func(done, total uint64)) error {
	if err := w.expect(stateOpen, "write pages"); err != nil {
		return err
	}
	var total uint64
	for _, r := range w.h.Regions {
		total += r.Size / PageSize
	}
	return w.writePages(ctx, &space{src: src, starts: []uint64{0, total}}, used, progress)
}

func (w *Writer) writePages(ctx context.Context, sp *space, used *pagemap.Bitmap, progress func(done, total uint64)) error {
	// A sink that can wait long (a store's upload) gives up when ctx
	// does, rather than holding the writer, and the paused guest, until
	// its requests time out.
	if c, ok := w.bw.(interface{ Cancel() }); ok {
		defer context.AfterFunc(ctx, c.Cancel)()
	}
	if used.Len() != w.h.Pages.Total {
		return fmt.Errorf("write pages: bitmap of %d pages, regions hold %d", used.Len(), w.h.Pages.Total)
	}
	if z := w.opts.Zeros; z != nil && z.Len() != w.h.Pages.Total {
		return fmt.Errorf("write pages: zero-page bitmap of %d pages, regions hold %d", z.Len(), w.h.Pages.Total)
	}
	w.h.Pages.Saved = used.Count()
	w.stored = used
	if w.opts.PageHashes && w.opts.InUse == nil {
		// Hashed by the compressors as they gather the pages: the
		// hashes of chunk i start at i*chunk_pages.
		w.opts.InUse = &pagehash.Table{Pages: used, Sums: make([]pagehash.Sum, w.h.Pages.Saved)}
		w.hashing = true
		w.h.Pages.InUse = w.h.Pages.Saved
	}
	if t := w.opts.InUse; t != nil {
		switch {
		case !used.SubsetOf(t.Pages):
			return fmt.Errorf("write pages: a page to store is not in use")
		case w.h.Parent == nil && w.h.Pages.Saved != w.h.Pages.InUse:
			return fmt.Errorf("write pages: %d pages to store, %d in use: a checkpoint without a parent stores every page in use", w.h.Pages.Saved, w.h.Pages.InUse)
		}
	}
	if err := w.h.check(); err != nil {
		return fmt.Errorf("write pages: header: %w", err)
	}
	hdr, err := encodeHeader(&w.h, w.seal, w.salt)
	if err != nil {
		return fmt.Errorf("write pages: %w", err)
	}
	w.write(hdr)
	bm, err := used.MarshalBinary()
	if err != nil {
		return w.fail(fmt.Errorf("write pages: %w", err))
	}
	w.writeSection(PartBitmap, bm)

	if err := w.writeChunks(ctx, sp, used, progress); err != nil {
		return w.fail(fmt.Errorf("write pages: %w", err))
	}

	w.tr.indexOff = uint64(w.off)
	w.tr.indexLen = w.writeSection(PartIndex, w.index)
	if w.err != nil {
		return w.fail(w.err)
	}
	w.state = statePages
	return nil
}

// chunkJob is one chunk on its way through the pipeline of
// [Writer.writeChunks]. The producer fills in first and pages, a worker
// out, enc, crc and err, and the in-order writer consumes it.
type chunkJob struct {
	index        uint64 // chunk number
	first, pages uint64
	buf          []byte // owned by the job; out is a prefix of it, or a raw chunk in ram
	out          []byte
	enc          Encoding
	crc          uint32
	err          error
	done         chan struct{} // a worker sends when the job is ready
}

// writeChunks runs the pipeline: a producer cuts the bitmap into chunks,
// workers gather and compress them in any order, and the calling goroutine
// writes them in order. A fixed set of jobs circulates, so memory is
// bounded: jobs not yet written hold their stored bytes, and the producer
// waits for a free job.
func (w *Writer) writeChunks(ctx context.Context, sp *space, used *pagemap.Bitmap, progress func(done, total uint64)) error {
	workers := w.opts.Workers
	defer spareP()()
	// Room for the workers to run ahead of a chunk being compressed,
	// so that the disk has raw chunks to write meanwhile.
	nJobs := 4 * workers
	free := make(chan *chunkJob, nJobs)
	for range nJobs {
		free <- &chunkJob{done: make(chan struct{}, 1)}
	}
	work := make(chan *chunkJob, nJobs)
	ordered := make(chan *chunkJob, nJobs)
	stop := make(chan struct{})
	w.stats.Stages.Workers = workers
	pc := &pace{workers: float64(workers)}
	if p, ok := w.bw.(diskPace); ok && w.opts.Compression == CompressionAuto {
		pc.disk = p
	}

	var wg sync.WaitGroup
	var stagesMu sync.Mutex
	for range workers {
		wg.Go(func() {
			// Reading a mapping whose file shrank faults; turn that into
			// an error rather than a crash.
			defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
			c := compressor{lz4: w.h.Compression == CompressionLZ4, seal: w.seal, zeros: w.opts.Zeros, pace: pc}
			if w.hashing {
				c.sums = w.opts.InUse.Sums
				c.chunkPages = uint64(w.h.ChunkPages)
			}
			t := time.Now()
			for j := range work {
				c.st.Idle += time.Since(t)
				c.do(j, sp, used)
				j.done <- struct{}{}
				t = time.Now()
			}
			stagesMu.Lock()
			w.stats.Stages.add(&c.st)
			stagesMu.Unlock()
		})
	}
	wg.Go(func() {
		defer close(work)
		defer close(ordered)
		var index uint64
		for first, pages := range chunkSpans(used, uint64(w.h.ChunkPages)) {
			var j *chunkJob
			select {
			case <-stop:
				return
			case j = <-free:
			}
			j.index, j.first, j.pages = index, first, pages
			index++
			// Both sends succeed at once: neither channel can hold more
			// than the nJobs jobs in circulation.
			work <- j
			ordered <- j
		}
	})

	// Chunks stored raw are copied out of ram by this goroutine: a fault
	// there (the RAM file truncated) is an error too.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	var err error
	var done uint64
	saved := w.h.Pages.Saved
	st := &w.stats.Stages
	for j := range ordered {
		t := time.Now()
		<-j.done
		st.WaitChunk += time.Since(t)
		if err == nil {
			if err = ctx.Err(); err == nil {
				err = j.err
			}
			if err == nil {
				t := time.Now()
				err = w.writeChunkSafe(j)
				st.WaitDisk += time.Since(t)
			}
			if err != nil {
				close(stop)
			} else if done += j.pages; progress != nil {
				progress(done, saved)
			}
		}
		free <- j
	}
	wg.Wait()
	if fw, ok := w.bw.(*fileWriter); ok {
		st.Disk = fw.Busy()
	}
	return err
}

// diskPace is what [CompressionAuto] asks of the disk: the bytes it has
// queued and its speed (a [fileWriter]).
type diskPace interface {
	Rate() float64
}

// pace is what the workers of one [Writer.writeChunks] share to choose,
// chunk by chunk, between LZ4 and raw ([CompressionAuto]). LZ4 costs the
// workers' time and saves the disk's; the pages are written soonest when
// both are busy to the end. With W workers, a share f of the chunks
// compressed, and the measured rates (the disk's D bytes/s; LZ4's L raw
// bytes/s per worker on what it compresses, to a ratio r; the rest of a
// worker's work, b seconds per byte), the workers take b/W + f/(W·L)
// seconds per raw byte and the disk (1 - f·(1-r))/D: equal at
//
//	f = (1/D - b/W) / (1/(W·L) + (1-r)/D)
//
// which is 1 or more on a disk slower than the workers compress (every
// chunk compressed, as CompressionLZ4) and falls towards 0 as the disk
// gets faster than they can compress. Chunks are offered to LZ4 at that
// share, spread evenly; until the rates are measured, all are.
type pace struct {
	disk    diskPace // nil: always LZ4
	workers float64
	mu      sync.Mutex
	acc     float64 // the share owed to LZ4 so far, spread over chunks
	// The workers' sums: bytes and time of LZ4 on the chunks it
	// compressed and what they became; bytes and time of the rest.
	lz4In, lz4Out, baseIn int64
	lz4Time, baseTime     time.Duration
}

// share is f above; false if it cannot be computed yet.
func (p *pace) share() (float64, bool) {
	d := p.disk.Rate()
	if d == 0 || p.lz4Time == 0 || p.lz4In == 0 || p.baseIn == 0 {
		return 0, false
	}
	l := float64(p.lz4In) / p.lz4Time.Seconds()
	r := float64(p.lz4Out) / float64(p.lz4In)
	b := p.baseTime.Seconds() / float64(p.baseIn)
	return (1/d - b/p.workers) / (1/(p.workers*l) + (1-r)/d), true
}

// compress reports whether the next chunk should be offered to LZ4.
func (p *pace) compress() bool {
	if p.disk == nil {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	f, ok := p.share()
	if !ok || f >= 1 {
		return true
	}
	p.acc += max(f, 0)
	if p.acc >= 1 {
		p.acc--
		return true
	}
	return false
}

// report adds a chunk's work to the sums: its raw size, the time of the
// rest of its work, and, if LZ4 compressed it, LZ4's time and output.
func (p *pace) report(raw int, base time.Duration, lz4 time.Duration, out int) {
	if p.disk == nil {
		return
	}
	p.mu.Lock()
	p.baseIn += int64(raw)
	p.baseTime += base
	if out > 0 {
		p.lz4In += int64(raw)
		p.lz4Out += int64(out)
		p.lz4Time += lz4
	}
	p.mu.Unlock()
}

// writeChunkSafe is writeChunk with a memory fault, reading a chunk
// straight out of ram, returned as an error (see catchFault).
func (w *Writer) writeChunkSafe(j *chunkJob) (err error) {
	defer catchFault(&err)
	return w.writeChunk(j)
}

func (w *Writer) writeChunk(j *chunkJob) error {
	e := indexEntry{
		offset:    uint64(w.off),
		firstPage: j.first,
		rawLen:    uint32(j.pages * PageSize),
		storedLen: uint32(len(j.out)),
		crc:       j.crc,
		encoding:  j.enc,
	}
	w.writeCRCd(j.out, j.crc)
	if w.err != nil {
		return w.err
	}
	w.index = e.append(w.index)
	w.stats.PagesWritten += j.pages
	w.stats.PageBytes += int64(e.rawLen)
	w.stats.StoredBytes += int64(e.storedLen)
	if j.enc == EncodingLZ4 {
		w.stats.ChunksLZ4++
	} else {
		w.stats.ChunksRaw++
	}
	return nil
}

// compressor is a worker's state: its LZ4 tables and a scratch buffer for
// gathering scattered pages.
type compressor struct {
	// sums, if not nil, gets the hash of every page gathered: chunk i's
	// from i*chunkPages on.
	sums       []pagehash.Sum
	chunkPages uint64
	lz4        bool
	seal       *sealer         // nil without encryption
	zeros      *pagemap.Bitmap // pages not to read, see [Options.Zeros]; may be nil
	c          lz4.Compressor
	raw        []byte
	pace       *pace
	st         Stages
}

// do gathers the pages of j and stores them compressed or raw in j.buf,
// then sealed if the file is encrypted. Both buffers have room for the
// LZ4 bound of the chunk, which exceeds its raw length by more than the
// GCM tag, so sealing is in place.
func (c *compressor) do(j *chunkJob, sp *space, used *pagemap.Bitmap) {
	j.err = nil
	j.out = nil
	defer catchFault(&j.err)
	t := time.Now()
	begin := t
	rawLen := j.pages * PageSize
	bufLen := lz4.CompressBlockBound(int(rawLen))
	if cap(j.buf) < bufLen {
		j.buf = make([]byte, bufLen)
	}
	if cap(c.raw) < bufLen {
		c.raw = make([]byte, bufLen)
	}

	// src is the chunk's pages: straight from ram if they are one run in
	// one region with no page to leave unread, else gathered into c.raw,
	// or into j.buf if they will be stored raw.
	var src []byte
	whole := contiguous(used, j.first, j.pages) && !c.anyZero(j.first, j.pages)
	var mem []byte
	if whole && sp.src == nil {
		var n uint64
		if mem, n = sp.span(j.first, j.pages); n != j.pages {
			mem = nil
		}
	}
	if mem != nil {
		src = mem
	} else if whole {
		src = c.raw[:rawLen]
		if !c.lz4 {
			src = j.buf[:rawLen]
		}
		if err := sp.read(src, j.first); err != nil {
			j.err = err
			return
		}
	} else {
		dst := c.raw[:rawLen]
		if !c.lz4 {
			dst = j.buf[:rawLen]
		}
		off := uint64(0)
		for start, count := range chunkRuns(used, j.first, j.pages) {
			for count > 0 {
				n := c.zeroRun(start, count)
				if n > 0 {
					clear(dst[off : off+n*PageSize])
					off += n * PageSize
				} else {
					n = c.dataRun(start, count)
					if sp.src == nil {
						var mem []byte
						mem, n = sp.span(start, n)
						off += uint64(copy(dst[off:], mem))
					} else {
						if err := sp.read(dst[off:off+n*PageSize], start); err != nil {
							j.err = err
							return
						}
						off += n * PageSize
					}
				}
				start, count = start+n, count-n
			}
		}
		src = dst
	}

	t = c.lap(t, &c.st.Read)
	if c.sums != nil {
		base := j.index * c.chunkPages
		for k := range j.pages {
			c.sums[base+k] = pagehash.Of(src[k*PageSize : (k+1)*PageSize])
		}
		t = c.lap(t, &c.st.Hash)
	}
	j.enc = EncodingRaw
	var tried, lz4Time time.Duration
	var lz4Out int
	if c.lz4 && c.pace != nil && !c.pace.compress() {
		c.st.RawChunks++
	} else if c.lz4 {
		// Offer LZ4 only 15/16 of the raw size, so it gives up early on
		// data where it would save less.
		limit := int(rawLen - rawLen/16)
		if n, _ := c.c.CompressBlock(src, j.buf[:limit]); n > 0 {
			j.enc = EncodingLZ4
			j.out = j.buf[:n]
		}
		t0 := t
		t = c.lap(t, &c.st.Compress)
		tried = t.Sub(t0)
		if j.enc == EncodingLZ4 {
			// The speed of LZ4 on what it compresses: it gives up
			// on random data within a fraction of that time, and
			// such a chunk is better raw anyway.
			lz4Time, lz4Out = t.Sub(t0), len(j.out)
		}
	}
	if j.enc == EncodingRaw {
		j.out = j.buf[:rawLen]
		switch {
		case &src[0] == &j.buf[0]:
			// Gathered in place.
		case &src[0] == &c.raw[0]:
			// Gathered into scratch: trade buffers instead of copying.
			j.buf, c.raw = c.raw, j.buf
			j.out = j.buf[:rawLen]
		case c.seal == nil:
			// Straight out of ram: the writer copies it once, into
			// the disk's buffer. ram does not change until WritePages
			// returns (the guest is paused), so the CRC below is of
			// the bytes written.
			j.out = src
		default:
			// Sealed in place: copied out of ram first.
			copy(j.buf, src)
		}
		t = c.lap(t, &c.st.Read)
	}
	if c.seal != nil {
		j.out = c.seal.seal(j.out[:0], j.out, PartChunk, j.index, true)
		t = c.lap(t, &c.st.Seal)
	}
	j.crc = crc(j.out)
	t = c.lap(t, &c.st.Checksum)
	if c.pace != nil {
		// The rest of the work: from the start, less LZ4's.
		c.pace.report(int(rawLen), t.Sub(begin)-tried, lz4Time, lz4Out)
	}
}

// lap adds the time since t to *d and returns now.
func (c *compressor) lap(t time.Time, d *time.Duration) time.Time {
	now := time.Now()
	*d += now.Sub(t)
	return now
}

// anyZero reports whether a page of [first, first+count) is in c.zeros.
func (c *compressor) anyZero(first, count uint64) bool {
	return c.zeros != nil && c.zeros.AnyInRange(first, count)
}

// zeroRun is the number of pages from start on, at most count, that are in
// c.zeros: 0 if start is not.
func (c *compressor) zeroRun(start, count uint64) uint64 {
	if c.zeros == nil || !c.zeros.Test(start) {
		return 0
	}
	end, _ := c.zeros.NextClear(start)
	return min(end-start, count)
}

// dataRun is the number of pages from start on, at most count, before the
// next page in c.zeros.
func (c *compressor) dataRun(start, count uint64) uint64 {
	if c.zeros == nil {
		return count
	}
	// NextSet may scan far past the run; a clear range stops it early.
	if !c.zeros.AnyInRange(start, count) {
		return count
	}
	z, _ := c.zeros.NextSet(start)
	return z - start
}

// catchFault turns the panic of a memory fault, made by
// debug.SetPanicOnFault, into *err. A fault on a file mapping means the
// file is shorter than the mapping, or, when writing to tmpfs or
// hugetlbfs, out of space. Other panics propagate.
func catchFault(err *error) {
	r := recover()
	if r == nil {
		return
	}
	if f, ok := r.(interface{ Addr() uintptr }); ok {
		*err = fmt.Errorf("memory fault at %#x: RAM file truncated or out of space", f.Addr())
		return
	}
	panic(r)
}

// WriteDeviceState writes QEMU's device state, read from r until EOF, and
// returns its length. It fails with an error wrapping [ErrTooLarge] if r
// has more than [Options].MaxDeviceState bytes.
func (w *Writer) WriteDeviceState(r io.Reader) (int64, error) {
	if err := w.expect(statePages, "write device state"); err != nil {
		return 0, err
	}
	w.tr.devOff = uint64(w.off)
	s := w.newSection(PartDeviceState, sealBlock)
	n, err := io.CopyBuffer(s, io.LimitReader(r, w.opts.MaxDeviceState+1), make([]byte, 1<<20))
	switch {
	case w.err != nil:
		return n, w.fail(w.err)
	case err != nil:
		return n, w.fail(fmt.Errorf("read device state: %w", err))
	case n > w.opts.MaxDeviceState:
		return n, w.fail(fmt.Errorf("write device state: more than %d bytes: %w", w.opts.MaxDeviceState, ErrTooLarge))
	}
	w.tr.devLen = s.close()
	if w.err != nil {
		return n, w.fail(w.err)
	}
	w.stats.DeviceStateBytes = n
	w.state = stateDevice
	return n, nil
}

// writeSection writes the section of part with content b and returns its
// stored length, without its CRC.
func (w *Writer) writeSection(part Part, b []byte) uint64 {
	s := w.newSection(part, len(b))
	s.Write(b)
	return s.close()
}

// sectionWriter writes a section: its content, sealed in blocks of
// [sealBlock] if the file is encrypted, and then the CRC of the stored
// bytes. Errors are sticky in w.err.
type sectionWriter struct {
	w      *Writer
	part   Part
	crc    uint32
	stored uint64
	buf    []byte // encrypted file: the content of the block being filled
	block  uint64 // number of buf's block
}

// newSection starts a section of part; sizeHint, the expected content
// length, sizes the sealing buffer.
func (w *Writer) newSection(part Part, sizeHint int) *sectionWriter {
	s := &sectionWriter{w: w, part: part}
	if w.seal != nil {
		s.buf = make([]byte, 0, min(sizeHint, sealBlock)+tagLen)
	}
	return s
}

func (s *sectionWriter) Write(p []byte) (int, error) {
	if s.w.seal == nil {
		s.store(p)
	} else {
		for rest := p; len(rest) > 0; {
			if len(s.buf) == sealBlock {
				// Seal a full block only when more follows, so that the
				// last block, sealed by close, is marked final.
				s.flush(false)
			}
			k := min(len(rest), sealBlock-len(s.buf))
			if cap(s.buf) < len(s.buf)+k+tagLen {
				s.buf = append(make([]byte, 0, sealBlock+tagLen), s.buf...)
			}
			s.buf = append(s.buf, rest[:k]...)
			rest = rest[k:]
		}
	}
	if s.w.err != nil {
		return 0, s.w.err
	}
	return len(p), nil
}

func (s *sectionWriter) store(p []byte) {
	s.w.write(p)
	s.crc = crc32.Update(s.crc, castagnoli, p)
	s.stored += uint64(len(p))
}

func (s *sectionWriter) flush(final bool) {
	s.store(s.w.seal.seal(s.buf[:0], s.buf, s.part, s.block, final))
	s.buf = s.buf[:0]
	s.block++
}

// close seals the last block, writes the CRC and returns the stored
// length of the section.
func (s *sectionWriter) close() uint64 {
	if s.w.seal != nil {
		s.flush(true)
	}
	s.w.writeCRC(s.crc)
	return s.stored
}

// Commit writes the trailer, syncs the file, renames it over the target
// and syncs the directory. Until the rename, the previous file at the
// target, if any, is untouched; an error from the final directory sync
// means the new file is in place but may not survive a crash.
func (w *Writer) Commit() error {
	if err := w.expect(stateDevice, "commit checkpoint"); err != nil {
		return err
	}
	if t := w.opts.InUse; t != nil {
		bm, err := t.Pages.MarshalBinary()
		if err != nil {
			return w.fail(fmt.Errorf("commit checkpoint: %w", err))
		}
		w.writeSection(PartInUse, bm)
		w.writeSection(PartHashes, storedSums(t, w.stored))
	}
	w.tr.fileCRC = w.fileCRC
	w.write(w.tr.append(nil))
	if w.err != nil {
		return w.fail(fmt.Errorf("commit checkpoint: %w", w.err))
	}
	if err := w.bw.Flush(); err != nil {
		return w.fail(fmt.Errorf("commit checkpoint: write %s: %w", w.TempPath(), err))
	}
	if w.sink != nil {
		if err := w.sink.Commit(); err != nil {
			return w.fail(fmt.Errorf("commit checkpoint: %w", err))
		}
		w.state = stateCommitted
		w.stats.BytesWritten = w.off
		return nil
	}
	f := w.f
	w.f = nil // closed by renameOver, which removes it on failure
	renamed, replaced, err := renameOver(w.dir, f, w.tmp)
	w.replaced = replaced
	if !renamed {
		return w.fail(err)
	}
	w.state = stateCommitted
	w.stats.BytesWritten = w.off
	return err
}

// storedSums returns the hashes of t of the pages in stored: what the
// chain section keeps. A restore of the chain gives the others, whose
// hashes the parent has.
func storedSums(t *pagehash.Table, stored *pagemap.Bitmap) []byte {
	sums := make([]byte, 0, pagehash.EncodedLen(stored.Count()))
	k := 0
	for start, count := range t.Pages.Runs() {
		for p := start; p < start+count; p++ {
			if stored.Test(p) {
				sums = append(sums, t.Sums[k][:]...)
			}
			k++
		}
	}
	return sums
}

package writer

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directBlock is the unit of direct I/O: a multiple of every logical block
// size a disk has (512 or 4096 bytes), and large enough to keep a disk busy.
const directBlock = 4 << 20

// directAlign is the alignment O_DIRECT asks of buffers, offsets and
// lengths: the logical block size, at most a page on the disks we meet.
const directAlign = 4096

// fileWriter writes the checkpoint file sequentially. Where the file system
// allows, it writes with O_DIRECT, in aligned blocks from aligned buffers:
// the data goes from kvmckpt's buffer to the disk without first filling the
// page cache, whose write-back throttles a large writer to well under the
// disk's speed on some hosts (see BENCHMARKS.md). The last, partial block
// is written after O_DIRECT is turned off again. Where O_DIRECT is refused
// (tmpfs, some network file systems), it is an ordinary buffered writer.
//
// Full blocks are written by I/O goroutines of their own while Write
// fills the next one, so that the disk never waits for the copying: a
// direct write returns only when the device has the data, and a writer
// that copied and wrote in turn would leave the disk idle for every copy.
// Two blocks are in flight at once: the thread whose write completed
// waits for a CPU (the workers keep them all busy) before it can issue the
// next write, and the disk would sit idle meanwhile; with a second write
// queued it does not. Direct writes that extend a file are serialized by
// the file system (ext4 takes the inode's lock for them), so the file's
// space is reserved ahead of the writes with fallocate, in steps; Flush
// trims what was reserved beyond the end. Write blocks only when every
// block is queued for the disk: that is the backpressure on a disk slower
// than its producers. An I/O error is returned by a later Write or by
// Flush.
//
// Not safe for concurrent use, except Rate and Busy.
type fileWriter struct {
	f   *os.File
	cur []byte // the block being filled, directBlock bytes, aligned
	n   int    // bytes in cur
	off int64  // file offset of cur[0]

	free   chan []byte      // blocks to fill
	full   chan queuedBlock // blocks for the I/O goroutines
	ended  chan struct{}    // closed when the I/O goroutines return
	closed bool

	mu       sync.Mutex    // guards what follows, shared by the I/O goroutines
	direct   bool          // writes go with O_DIRECT
	reserved int64         // the file's space is allocated up to here; -1: not reserving
	trim     bool          // space was reserved (maybe in part): Flush trims the file
	err      error         // the first I/O error; read after ended, or through errSeen
	inFlight int           // writes under way
	since    time.Time     // when inFlight last went from 0 to 1
	written  int64         // bytes written
	busy     time.Duration // closed spans of time with a write under way; the open one began at since

	errSeen atomic.Bool
}

const (
	// fileBlocks is the number of blocks of a fileWriter: one being
	// filled, the others queued or being written.
	fileBlocks = 4
	// ioDepth is the number of blocks written at once.
	ioDepth = 2
	// reserveStep is how much file space a fileWriter allocates at a
	// time ahead of its direct writes.
	reserveStep = 64 << 20
)

type queuedBlock struct {
	b   []byte
	off int64
}

func newFileWriter(f *os.File) *fileWriter {
	return newFileWriterDepth(f, ioDepth, true)
}

// newFileWriterDepth is newFileWriter with depth writes at once, reserving
// space ahead or not: for benchmarks of the choices.
func newFileWriterDepth(f *os.File, depth int, reserve bool) *fileWriter {
	raw := make([]byte, fileBlocks*directBlock+directAlign)
	skip := int(-uintptr(unsafe.Pointer(&raw[0])) & (directAlign - 1))
	fw := &fileWriter{
		f:     f,
		free:  make(chan []byte, fileBlocks),
		full:  make(chan queuedBlock, fileBlocks),
		ended: make(chan struct{}),
	}
	for i := range fileBlocks {
		fw.free <- raw[skip+i*directBlock : skip+(i+1)*directBlock : skip+(i+1)*directBlock]
	}
	fw.cur = <-fw.free
	fw.direct = setDirect(f, true) == nil
	if !fw.direct || !reserve {
		fw.reserved = -1
	}
	var wg sync.WaitGroup
	for range depth {
		wg.Go(fw.io)
	}
	go func() {
		wg.Wait()
		close(fw.ended)
	}()
	return fw
}

// io writes queued blocks. After an error no more are written, but the
// blocks are still returned, so that Write never waits forever.
func (fw *fileWriter) io() {
	for q := range fw.full {
		if !fw.errSeen.Load() {
			fw.begin(q.off + int64(len(q.b)))
			err := fw.writeBlock(q.b, q.off)
			fw.end(int64(len(q.b)), err)
		}
		fw.free <- q.b
	}
}

// begin accounts for a write that ends at end, reserving the file's
// space up to there and beyond first. A file system that cannot reserve
// (or is out of space ahead of the data) gets plain extending writes.
func (fw *fileWriter) begin(end int64) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.reserved >= 0 && end > fw.reserved {
		n := max(reserveStep, end-fw.reserved)
		// A failure may have allocated part of it, and grown the file.
		fw.trim = true
		if unix.Fallocate(int(fw.f.Fd()), 0, fw.reserved, n) == nil {
			fw.reserved += n
		} else {
			fw.reserved = -1
		}
	}
	if fw.inFlight == 0 {
		fw.since = time.Now()
	}
	fw.inFlight++
}

// end accounts for a write of n bytes that returned err.
func (fw *fileWriter) end(n int64, err error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.inFlight--; fw.inFlight == 0 {
		fw.busy += time.Since(fw.since)
	}
	if err != nil {
		if fw.err == nil {
			fw.err = err
		}
		fw.errSeen.Store(true)
		return
	}
	fw.written += n
}

// setDirect turns O_DIRECT on or off for f.
func setDirect(f *os.File, on bool) error {
	fd := int(f.Fd())
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		flags |= unix.O_DIRECT
	} else {
		flags &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
	return err
}

func (fw *fileWriter) Write(p []byte) (int, error) {
	if fw.closed {
		return 0, errors.New("write after flush")
	}
	written := 0
	for len(p) > 0 {
		c := copy(fw.cur[fw.n:], p)
		fw.n += c
		p = p[c:]
		written += c
		if fw.n == len(fw.cur) {
			if fw.errSeen.Load() {
				return written, fw.stop()
			}
			fw.full <- queuedBlock{fw.cur, fw.off}
			fw.off += int64(fw.n)
			fw.n = 0
			fw.cur = <-fw.free
		}
	}
	return written, nil
}

// stop ends the I/O goroutine after the blocks queued and returns its
// error. It may be called more than once.
func (fw *fileWriter) stop() error {
	if !fw.closed {
		fw.closed = true
		close(fw.full)
	}
	<-fw.ended
	return fw.err
}

// Close stops the I/O goroutine without writing what is not yet queued:
// for a writer given up.
func (fw *fileWriter) Close() { fw.stop() }

// Rate is the disk's write speed so far: bytes written per second with
// a write under way; 0 before the first block is written.
func (fw *fileWriter) Rate() float64 {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	busy := fw.busyNow()
	if busy <= 0 || fw.written == 0 {
		return 0
	}
	return float64(fw.written) / busy.Seconds()
}

// Busy is the time the disk has had a write under way, so far.
func (fw *fileWriter) Busy() time.Duration {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.busyNow()
}

// busyNow is Busy with fw.mu held: the closed intervals and the one
// open, if writes are under way (with two in flight the count may not
// fall to zero from the first write to the last).
func (fw *fileWriter) busyNow() time.Duration {
	if fw.inFlight > 0 {
		return fw.busy + time.Since(fw.since)
	}
	return fw.busy
}

// writeBlock writes b at off. A file system that takes the O_DIRECT flag
// but then refuses direct writes gets buffered ones from then on.
func (fw *fileWriter) writeBlock(b []byte, off int64) error {
	fw.mu.Lock()
	direct := fw.direct
	fw.mu.Unlock()
	_, err := fw.f.WriteAt(b, off)
	if err == nil || !direct || !errors.Is(err, unix.EINVAL) {
		return err
	}
	fw.mu.Lock()
	if fw.direct {
		if serr := setDirect(fw.f, false); serr != nil {
			fw.mu.Unlock()
			return err
		}
		fw.direct = false
	}
	fw.mu.Unlock()
	_, err = fw.f.WriteAt(b, off)
	return err
}

// Flush writes what is buffered, waits for every write and trims the
// space reserved beyond the end. It may be called once, at the end: the
// partial block it writes leaves the file unaligned for direct writes.
func (fw *fileWriter) Flush() error {
	if fw.closed {
		return errors.New("flush after flush")
	}
	if err := fw.stop(); err != nil {
		return err
	}
	if fw.n > 0 {
		if fw.direct {
			fw.direct = false
			if err := setDirect(fw.f, false); err != nil {
				return err
			}
		}
		t := time.Now()
		if err := fw.writeBlock(fw.cur[:fw.n], fw.off); err != nil {
			return err
		}
		fw.busy += time.Since(t)
		fw.written += int64(fw.n)
		fw.off += int64(fw.n)
		fw.n = 0
	}
	if fw.trim {
		return fw.f.Truncate(fw.off)
	}
	return nil
}

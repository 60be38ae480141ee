package ramblock

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// PageSize is the unit of a block's size and of its zero runs.
const PageSize = 4096

// ErrLayout means a block's host memory is not laid out as kvmckpt can
// read it: not wholly mapped, or mapped in pieces of different kinds.
var ErrLayout = errors.New("guest RAM block not readable as one piece")

// Block is one block of a guest's RAM: a memory backend of QEMU.
type Block interface {
	// Size is the block's length in bytes, a multiple of [PageSize].
	Size() uint64
	// Bytes returns the n bytes at off for reading (see package
	// introspect's Backend): valid until Close, and unchanged as long as
	// the guest is paused.
	Bytes(off, n uint64) ([]byte, bool)
	// ReadAt and WriteAt copy bytes out of and into the block. They
	// are safe for concurrent use on distinct bytes.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Mapped returns the whole block mapped into kvmckpt, or nil if it
	// is not (another process's memory).
	Mapped() []byte
	// File returns the file behind a mapped block, or nil; FileOffset
	// is where the block starts in it.
	File() *os.File
	FileOffset() int64
	// Zeros returns runs of pages that read as zero without being read:
	// holes of a file, pages a process never touched. It may return
	// fewer than there are (none, where the host cannot tell).
	Zeros() ([]pagemap.PageRange, error)
	// String says where the block is, for messages.
	String() string
	// Close releases the block; nothing of it may be used afterwards.
	Close() error
}

// fileBlock is a block in a file, mapped shared.
type fileBlock struct {
	f     *os.File
	off   int64 // the block's offset in f
	mem   []byte
	desc  string
	once  sync.Once
	unmap error
}

// OpenFile maps size bytes of f from offset off, shared, for reading and
// also for writing if writable (f must then be open for writing). The
// block owns f from then on, even if OpenFile fails. desc names the block
// in messages.
func OpenFile(f *os.File, off int64, size uint64, writable bool, desc string) (Block, error) {
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", desc, err)
	}
	if size == 0 || size%PageSize != 0 || off < 0 || off%PageSize != 0 || uint64(st.Size()) < uint64(off)+size || uint64(off)+size < size {
		f.Close()
		return nil, fmt.Errorf("%s: %w: %d bytes at offset %d of a file of %d bytes", desc, ErrLayout, size, off, st.Size())
	}
	prot := unix.PROT_READ
	if writable {
		prot |= unix.PROT_WRITE
	}
	mem, err := unix.Mmap(int(f.Fd()), off, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("map %s: %w", desc, err)
	}
	return &fileBlock{f: f, off: off, mem: mem, desc: desc}, nil
}

func (b *fileBlock) Size() uint64      { return uint64(len(b.mem)) }
func (b *fileBlock) Mapped() []byte    { return b.mem }
func (b *fileBlock) File() *os.File    { return b.f }
func (b *fileBlock) String() string    { return b.desc }
func (b *fileBlock) FileOffset() int64 { return b.off }
func (b *fileBlock) inBounds(off int64, n int) bool {
	return off >= 0 && uint64(off) <= uint64(len(b.mem)) && uint64(n) <= uint64(len(b.mem))-uint64(off)
}

func (b *fileBlock) Bytes(off, n uint64) ([]byte, bool) {
	if off > uint64(len(b.mem)) || n > uint64(len(b.mem))-off {
		return nil, false
	}
	return b.mem[off : off+n : off+n], true
}

func (b *fileBlock) ReadAt(p []byte, off int64) (n int, err error) {
	if !b.inBounds(off, len(p)) {
		return 0, fmt.Errorf("read %s at %#x: %w", b.desc, off, ErrLayout)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer catchFault(&err, b.desc)
	return copy(p, b.mem[off:]), nil
}

func (b *fileBlock) WriteAt(p []byte, off int64) (n int, err error) {
	if !b.inBounds(off, len(p)) {
		return 0, fmt.Errorf("write %s at %#x: %w", b.desc, off, ErrLayout)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer catchFault(&err, b.desc)
	return copy(b.mem[off:], p), nil
}

// Zeros returns the file's holes in the block (see pagemap.Holes).
func (b *fileBlock) Zeros() ([]pagemap.PageRange, error) {
	if b.off == 0 {
		return pagemap.Holes(b.f, int64(len(b.mem)))
	}
	// Holes counts from the file's start: find them up to the block's
	// end and keep the block's part.
	all, err := pagemap.Holes(b.f, b.off+int64(len(b.mem)))
	if err != nil {
		return nil, err
	}
	first, n := uint64(b.off)/PageSize, uint64(len(b.mem))/PageSize
	var out []pagemap.PageRange
	for _, h := range all {
		lo, hi := max(h.Start, first), min(h.End(), first+n)
		if lo < hi {
			out = append(out, pagemap.PageRange{Start: lo - first, Count: hi - lo})
		}
	}
	return out, nil
}

func (b *fileBlock) Close() error {
	b.once.Do(func() {
		b.unmap = unix.Munmap(b.mem)
		if err := b.f.Close(); b.unmap == nil {
			b.unmap = err
		}
	})
	return b.unmap
}

// catchFault turns the panic of a memory fault (a file truncated under
// its mapping, a tmpfs out of space) into *err; other panics propagate.
func catchFault(err *error, desc string) {
	r := recover()
	if r == nil {
		return
	}
	if e, ok := r.(interface{ Addr() uintptr }); ok {
		*err = fmt.Errorf("%s: memory fault at %#x: the file shrank or its file system is full", desc, e.Addr())
		return
	}
	panic(r)
}

package ramblock

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// mirrorChunk is the unit in which [Block.Bytes] copies a process's
// memory into the mirror.
const mirrorChunk = 64 << 10

// maxIO bounds one process_vm_readv or writev: the kernel copies at most
// this much per call anyway (it pins pages in batches), and a bound keeps
// a failing page's error close to it.
const maxIO = 4 << 20

// processBlock is guest RAM in another process's memory.
type processBlock struct {
	pid  int
	hva  uint64 // the block's address in the process
	size uint64
	anon bool // the mappings are anonymous: untouched pages read as zero
	desc string
	// zeros is [Block.Zeros], found before the first read: reading an
	// untouched page maps the zero page, and the page is then present.
	zeros    []pagemap.PageRange
	zerosErr error

	mirrorOnce sync.Once
	mirror     []byte
	mirrorErr  error
	loaded     []atomic.Uint64 // a bit per mirrorChunk
	closeOnce  sync.Once
}

// OpenProcess returns the size bytes of process pid's memory at address
// hva as a block. anon says the memory is anonymous, so that pages the
// process never touched read as zero ([Block.Zeros]). It checks only that
// the first and last page can be read; [Locate] checks the mappings.
func OpenProcess(pid int, hva, size uint64, anon bool) (Block, error) {
	desc := fmt.Sprintf("memory of process %d at %#x", pid, hva)
	if size == 0 || size%PageSize != 0 || hva%PageSize != 0 || hva+size < hva {
		return nil, fmt.Errorf("%s: %w: %d bytes", desc, ErrLayout, size)
	}
	b := &processBlock{pid: pid, hva: hva, size: size, anon: anon, desc: desc}
	if anon {
		b.zeros, b.zerosErr = b.untouched()
	}
	var probe [8]byte
	for _, off := range []int64{0, int64(size) - int64(len(probe))} {
		if _, err := b.ReadAt(probe[:], off); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func (b *processBlock) Size() uint64      { return b.size }
func (b *processBlock) Mapped() []byte    { return nil }
func (b *processBlock) File() *os.File    { return nil }
func (b *processBlock) FileOffset() int64 { return 0 }
func (b *processBlock) String() string    { return b.desc }
func (b *processBlock) inBounds(off int64, n int) bool {
	return off >= 0 && uint64(off) <= b.size && uint64(n) <= b.size-uint64(off)
}

// ReadAt copies len(p) bytes at off out of the process.
func (b *processBlock) ReadAt(p []byte, off int64) (int, error) {
	return b.transfer(p, off, false)
}

// WriteAt copies p into the process at off.
func (b *processBlock) WriteAt(p []byte, off int64) (int, error) {
	n, err := b.transfer(p, off, true)
	if n > 0 {
		b.forget(uint64(off), uint64(n))
	}
	return n, err
}

func (b *processBlock) transfer(p []byte, off int64, write bool) (int, error) {
	op := "read"
	if write {
		op = "write"
	}
	if !b.inBounds(off, len(p)) {
		return 0, fmt.Errorf("%s %s at %#x: %d bytes past its %#x: %w", op, b.desc, off, len(p), b.size, ErrLayout)
	}
	done := 0
	for done < len(p) {
		n := min(len(p)-done, maxIO)
		local := []unix.Iovec{{Base: &p[done]}}
		local[0].SetLen(n)
		remote := []unix.RemoteIovec{{Base: uintptr(b.hva + uint64(off) + uint64(done)), Len: n}}
		var got int
		var err error
		if write {
			got, err = unix.ProcessVMWritev(b.pid, local, remote, 0)
		} else {
			got, err = unix.ProcessVMReadv(b.pid, local, remote, 0)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("%s %s at %#x: %w%s", op, b.desc, uint64(off)+uint64(done), err, permHint(err))
		}
		if got == 0 {
			return done, fmt.Errorf("%s %s at %#x: %w", op, b.desc, uint64(off)+uint64(done), io.ErrUnexpectedEOF)
		}
		done += got
	}
	return done, nil
}

// permHint explains a refused process_vm_readv.
func permHint(err error) string {
	if err == unix.EPERM {
		return " (reading QEMU's memory needs the right to ptrace it: run kvmckpt as root, or as QEMU's user where kernel.yama.ptrace_scope is 0)"
	}
	if err == unix.ESRCH {
		return " (QEMU has exited)"
	}
	return ""
}

// Bytes returns the n bytes at off, copied into the mirror on first use.
func (b *processBlock) Bytes(off, n uint64) ([]byte, bool) {
	if off > b.size || n > b.size-off {
		return nil, false
	}
	b.mirrorOnce.Do(func() {
		// Reserved, not committed: only the chunks read take memory.
		b.mirror, b.mirrorErr = unix.Mmap(-1, 0, int(b.size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		b.loaded = make([]atomic.Uint64, (b.size/mirrorChunk+64)/64)
	})
	if b.mirrorErr != nil {
		return nil, false
	}
	if n == 0 {
		return b.mirror[off:off:off], true
	}
	for c := off / mirrorChunk; c <= (off+n-1)/mirrorChunk; c++ {
		w, bit := &b.loaded[c/64], uint64(1)<<(c%64)
		if w.Load()&bit != 0 {
			continue
		}
		lo := c * mirrorChunk
		hi := min(lo+mirrorChunk, b.size)
		// Two readers may copy the same chunk: the same bytes, as the
		// guest is paused.
		if _, err := b.ReadAt(b.mirror[lo:hi], int64(lo)); err != nil {
			return nil, false
		}
		w.Or(bit)
	}
	return b.mirror[off : off+n : off+n], true
}

// forget drops the mirror's copy of [off, off+n), written since.
func (b *processBlock) forget(off, n uint64) {
	if b.loaded == nil || n == 0 {
		return
	}
	for c := off / mirrorChunk; c <= (off+n-1)/mirrorChunk; c++ {
		b.loaded[c/64].And(^(uint64(1) << (c % 64)))
	}
}

// Zeros returns the pages of anonymous memory that were neither present
// nor swapped out (/proc/PID/pagemap) when the block was opened: never
// touched, or discarded, they read as zero. For other memory it returns
// none.
func (b *processBlock) Zeros() ([]pagemap.PageRange, error) {
	return b.zeros, b.zerosErr
}

func (b *processBlock) untouched() ([]pagemap.PageRange, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", b.pid))
	if err != nil {
		return nil, fmt.Errorf("zero pages of %s: %w", b.desc, err)
	}
	defer f.Close()
	const batch = 64 << 10 // entries per read
	buf := make([]byte, batch*8)
	var out []pagemap.PageRange
	pages := b.size / PageSize
	for first := uint64(0); first < pages; first += batch {
		n := min(batch, pages-first)
		if _, err := f.ReadAt(buf[:n*8], int64((b.hva/PageSize+first)*8)); err != nil {
			return nil, fmt.Errorf("zero pages of %s: %w", b.desc, err)
		}
		for i := range n {
			e := binary.NativeEndian.Uint64(buf[i*8:])
			const present, swapped = 1 << 63, 1 << 62
			if e&(present|swapped) != 0 {
				continue
			}
			p := first + i
			if k := len(out); k > 0 && out[k-1].End() == p {
				out[k-1].Count++
			} else {
				out = append(out, pagemap.PageRange{Start: p, Count: 1})
			}
		}
	}
	return out, nil
}

func (b *processBlock) Close() error {
	b.closeOnce.Do(func() {
		if b.mirror != nil {
			_ = unix.Munmap(b.mirror)
		}
	})
	return nil
}

package pagemap

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A HoleFinder finds the holes of a file that is mapped into memory, a
// range of pages at a time and from several goroutines at once, as the
// rounds of a live save need them. [Holes] walks the whole file with lseek,
// whose cost grows with the file (about 20 ms for 2 GiB of tmpfs, all of
// it before the first page can be read); a HoleFinder asks mincore(2)
// first, whose cost is bounded by the range: a page in memory is data.
// Only runs of pages that are not in memory (holes, or pages swapped out,
// which lseek counts as data) are looked up with SEEK_DATA, and what a
// lookup learns (no data in [from, to)) serves later ranges inside it, so
// that a long hole is walked once, not once per range.
//
// The answer has [Holes]'s meaning: a page partly in a hole counts as
// data, and a file system without SEEK_DATA has no holes.
type HoleFinder struct {
	f   *os.File
	mem []byte
	mu  sync.Mutex
	// known are the last ranges of bytes lookups found without data
	// ([0] from, [1] to): a few, as goroutines walk different holes.
	known [4][2]int64
	next  int
	// noSeek: SEEK_DATA is not supported: every page is data.
	noSeek bool
}

// NewHoleFinder returns a finder for f, whose first len(mem) bytes are
// mapped at mem (shared, so that mincore sees the file's pages).
func NewHoleFinder(f *os.File, mem []byte) *HoleFinder {
	return &HoleFinder{f: f, mem: mem}
}

// Holes returns the runs of pages of [first, first+n) (4 KiB pages of the
// file) that lie wholly in holes, in ascending order. A range past the
// mapping gives an error wrapping [ErrRAMSize].
func (h *HoleFinder) Holes(first, n uint64) ([]PageRange, error) {
	if first+n < first || (first+n)*hostPageSize > uint64(len(h.mem)) {
		return nil, fmt.Errorf("find holes: pages [%#x, %#x) past the %#x bytes mapped: %w", first, first+n, len(h.mem), ErrRAMSize)
	}
	if n == 0 {
		return nil, nil
	}
	vec := make([]byte, n)
	m := h.mem[first*hostPageSize : (first+n)*hostPageSize]
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		return nil, fmt.Errorf("find holes: mincore: %w", e)
	}
	var holes []PageRange
	add := func(p uint64) {
		if k := len(holes); k > 0 && holes[k-1].End() == p {
			holes[k-1].Count++
			return
		}
		holes = append(holes, PageRange{p, 1})
	}
	for i := uint64(0); i < n; i++ {
		if vec[i]&1 != 0 {
			continue // in memory: data
		}
		off := int64(first+i) * hostPageSize
		hole, err := h.noData(off)
		if err != nil {
			return nil, err
		}
		if hole {
			add(first + i)
		}
	}
	return holes, nil
}

// noData reports whether the page at off lies wholly in a hole.
func (h *HoleFinder) noData(off int64) (bool, error) {
	h.mu.Lock()
	if h.noSeek {
		h.mu.Unlock()
		return false, nil
	}
	for _, k := range h.known {
		if off >= k[0] && off+hostPageSize <= k[1] {
			h.mu.Unlock()
			return true, nil
		}
	}
	h.mu.Unlock()
	var data int64
	var err error
	rc, cerr := h.f.SyscallConn()
	if cerr != nil {
		return false, fmt.Errorf("find holes in %s: %w", h.f.Name(), cerr)
	}
	if cerr := rc.Control(func(fd uintptr) { data, err = unix.Seek(int(fd), off, unix.SEEK_DATA) }); cerr != nil {
		return false, fmt.Errorf("find holes in %s: %w", h.f.Name(), cerr)
	}
	switch {
	case errors.Is(err, unix.ENXIO):
		// No data at or after off.
		data = int64(len(h.mem))
	case err != nil && seekUnsupported(err):
		h.mu.Lock()
		h.noSeek = true
		h.mu.Unlock()
		return false, nil
	case err != nil:
		return false, fmt.Errorf("find holes in %s: lseek %#x SEEK_DATA: %w", h.f.Name(), off, err)
	case data < off:
		return false, fmt.Errorf("find holes in %s: lseek %#x SEEK_DATA returned %#x", h.f.Name(), off, data)
	}
	if data > off {
		h.mu.Lock()
		h.known[h.next] = [2]int64{off, data}
		h.next = (h.next + 1) % len(h.known)
		h.mu.Unlock()
	}
	return off+hostPageSize <= data, nil
}

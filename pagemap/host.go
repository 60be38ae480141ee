package pagemap

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
)

// Host-side exclusions: pages of the guest RAM file that need not be saved
// because they read as zero. Two kinds are found here, from the host's
// side, without interpreting guest memory:
//
//   - holes in the RAM file (never written, or punched by a balloon or
//     free page reporting), found with lseek SEEK_DATA/SEEK_HOLE ([Holes]);
//   - allocated pages whose bytes are all zero ([ZeroPages]).
//
// Holes must be found first and excluded from the zero scan. On tmpfs, the
// usual backing of QEMU's memory-backend-file and memfd RAM, a read fault
// on a hole through a shared mapping allocates a page: shmem_fault calls
// shmem_get_folio_gfp with SGP_CACHE, which finds no folio in the page
// cache and allocates and clears one, possibly a huge one if the mount
// allows (mm/shmem.c, Linux 6.x; only read(2), through SGP_READ, returns
// zeros for a hole without allocating). On Linux 6.18 one load from a hole
// page through a PROT_READ, MAP_SHARED mapping raised the file's st_blocks
// by 8 (4 KiB); TestScanRAM shows it. Scanning a sparse 64 GiB RAM file
// page by page would therefore fill it in and charge all of it to tmpfs and
// the memory cgroup. [ScanRAM] does both steps in the right order.

// hostPageSize is the unit of both scans: the guest's base page, which is
// also the smallest unit in which tmpfs allocates.
const (
	hostPageShift = 12
	hostPageSize  = 1 << hostPageShift
)

// PageRange is the run of 4 KiB pages [Start, Start+Count) of a RAM file,
// counted from the start of the file.
type PageRange struct {
	Start uint64
	Count uint64
}

// End returns Start+Count, the first page after r.
func (r PageRange) End() uint64 { return r.Start + r.Count }

// String formats r as the half-open page range [%#x, %#x).
func (r PageRange) String() string { return fmt.Sprintf("[%#x, %#x)", r.Start, r.End()) }

// zeroPage is what IsZero compares against. It stays in L1 cache.
var zeroPage [hostPageSize]byte

// IsZero reports whether every byte of p is zero. Most pages in use fail on
// the first word, so that is tested alone; the rest is compared against a
// zero page with bytes.Equal, whose vectorised memequal stops at the first
// differing 64-byte block (internal/bytealg). On a 256 MiB buffer this was
// about 7% faster than an unrolled loop of 8-byte loads, both limited by
// memory bandwidth.
func IsZero(p []byte) bool {
	if len(p) >= 8 && binary.LittleEndian.Uint64(p) != 0 {
		return false
	}
	for len(p) > 0 {
		n := min(len(p), hostPageSize)
		if !bytes.Equal(p[:n], zeroPage[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// zeroChunkWords is how many bitmap words one worker claims at a time:
// 8 words, 512 pages, 2 MiB of RAM. Claiming whole words means no two
// workers write the same word of the result.
const zeroChunkWords = 8

// ZeroPages returns the pages among candidates whose 4 KiB in ram are all
// zero: page i is ram[i*4096 : (i+1)*4096]. Pages not in candidates are not
// read at all, so candidates must exclude the holes of a tmpfs-backed ram
// (see [Holes]). ram must cover candidates.Len() pages, or the error wraps
// [ErrRAMSize].
//
// workers goroutines scan in parallel, claiming 2 MiB at a time; zero or
// less means GOMAXPROCS. Each maps its candidates in with one madvise a run
// before reading them (a fresh mapping of a RAM file would otherwise fault
// page by page), which leaves them mapped for later readers too. Then the
// scan is memory-bound: an all-zero page costs a full read of 4 KiB, a page
// in use usually one cache line.
//
// candidates must not be modified during the call. ram is read while the
// guest is expected to be paused; bytes changing under the scan give a
// result that is stale but not unsafe.
func ZeroPages(ram []byte, candidates *Bitmap, workers int) (*Bitmap, error) {
	n := candidates.Len()
	if n > uint64(len(ram))/hostPageSize {
		return nil, fmt.Errorf("scan zero pages: %d pages, RAM mapping of %#x bytes: %w", n, len(ram), ErrRAMSize)
	}
	zero := NewBitmap(n)
	words := len(candidates.words)
	chunks := (words + zeroChunkWords - 1) / zeroChunkWords
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	workers = min(workers, chunks)

	var next atomic.Int64
	scan := func() {
		for {
			c := int(next.Add(1) - 1)
			if c >= chunks {
				return
			}
			first, end := c*zeroChunkWords, min(words, (c+1)*zeroChunkWords)
			populate(ram, candidates.words[first:end], first*64)
			for w := first; w < end; w++ {
				cand, z := candidates.words[w], uint64(0)
				for cand != 0 {
					b := bits.TrailingZeros64(cand)
					cand &= cand - 1
					off := (w*64 + b) * hostPageSize
					if IsZero(ram[off : off+hostPageSize]) {
						z |= 1 << b
					}
				}
				zero.words[w] = z
			}
		}
	}
	if workers <= 1 {
		scan()
		return zero, nil
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Go(scan)
	}
	wg.Wait()
	return zero, nil
}

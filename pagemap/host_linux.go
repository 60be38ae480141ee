package pagemap

import (
	"errors"
	"fmt"
	"math/bits"
	"os"

	"golang.org/x/sys/unix"
)

// Holes returns the runs of 4 KiB pages of the first size bytes of f that
// lie wholly in holes of the file, in ascending order, found with lseek SEEK_DATA and SEEK_HOLE
// (lseek(2)). A hole reads as zero and, on tmpfs, holds no memory; the
// comment at the top of host.go says why [ZeroPages] must skip holes.
//
// The answer is exact on tmpfs and memfd, which track holes per page (or
// per huge page, if the mount allows huge pages). Other filesystems report
// holes at their own block granularity, or, with only the generic lseek
// (hugetlbfs among them), the whole file as data. A filesystem that
// rejects SEEK_DATA (EINVAL, EOPNOTSUPP, ENOSYS) gives an empty list: no
// holes known. A page partly in a hole counts as data.
//
// size must be a multiple of 4 KiB and no larger than the file, or the
// error wraps [ErrRAMSize]. f's offset is changed. The file should not
// change during the call; the guest is paused.
func Holes(f *os.File, size int64) ([]PageRange, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("find holes: %w", err)
	}
	if size < 0 || size%hostPageSize != 0 || size > fi.Size() {
		return nil, fmt.Errorf("find holes in %s: size %#x, file size %#x: %w", f.Name(), size, fi.Size(), ErrRAMSize)
	}
	var holes []PageRange
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("find holes in %s: %w", f.Name(), err)
	}
	var supported bool
	cerr := rc.Control(func(fd uintptr) {
		seek := func(off int64, whence int) (int64, error) {
			return unix.Seek(int(fd), off, whence)
		}
		supported, err = holeRanges(seek, size, func(start, count uint64) {
			holes = append(holes, PageRange{start, count})
		})
	})
	if cerr != nil {
		return nil, fmt.Errorf("find holes in %s: %w", f.Name(), cerr)
	}
	if err != nil {
		return nil, fmt.Errorf("find holes in %s: %w", f.Name(), err)
	}
	if !supported {
		return nil, nil
	}
	return holes, nil
}

// seekUnsupported reports whether err from lseek means the filesystem does
// not implement SEEK_DATA/SEEK_HOLE.
func seekUnsupported(err error) bool {
	return errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// holeRanges calls hole(start, count) for each run of pages of [0, size)
// that lies wholly in a hole, in ascending order, using seek as lseek(2).
// It returns false if seek reports that SEEK_DATA is unsupported, in which
// case hole may already have been called.
//
// Each step moves the offset forward by at least one byte, so the loop ends
// even if seek misbehaves; a seek result that would move it backwards is
// an error.
func holeRanges(seek func(off int64, whence int) (int64, error), size int64, hole func(start, count uint64)) (bool, error) {
	report := func(from, to int64) {
		first := (from + hostPageSize - 1) / hostPageSize
		last := to / hostPageSize
		if last > first {
			hole(uint64(first), uint64(last-first))
		}
	}
	for off := int64(0); off < size; {
		data, err := seek(off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
			// No data at or after off: the rest is a hole.
			data = size
		case err != nil && seekUnsupported(err):
			return false, nil
		case err != nil:
			return true, fmt.Errorf("lseek %#x SEEK_DATA: %w", off, err)
		case data < off:
			return true, fmt.Errorf("lseek %#x SEEK_DATA returned %#x", off, data)
		}
		data = min(data, size)
		report(off, data)
		if data == size {
			break
		}
		end, err := seek(data, unix.SEEK_HOLE)
		switch {
		case err != nil && seekUnsupported(err):
			return false, nil
		case err != nil:
			// ENXIO here means the file shrank below data since the
			// SEEK_DATA: it is changing under us.
			return true, fmt.Errorf("lseek %#x SEEK_HOLE: %w", data, err)
		case end <= data:
			return true, fmt.Errorf("lseek %#x SEEK_HOLE returned %#x", data, end)
		}
		off = end
	}
	return true, nil
}

// ScanRAM finds the pages of a guest RAM file that read as zero, without
// touching its holes: holes from [Holes], then [ZeroPages] over the rest of
// ram, the file's mapping, which must be len(ram) bytes from offset 0.
// zero excludes the holes; a page to skip when saving is in either.
func ScanRAM(f *os.File, ram []byte, workers int) (holes []PageRange, zero *Bitmap, err error) {
	holes, err = Holes(f, int64(len(ram)))
	if err != nil {
		return nil, nil, err
	}
	n := uint64(len(ram)) / hostPageSize
	data := NewBitmap(n)
	data.SetRange(0, n)
	for _, h := range holes {
		data.ClearRange(h.Start, h.Count)
	}
	zero, err = ZeroPages(ram, data, workers)
	if err != nil {
		return nil, nil, err
	}
	return holes, zero, nil
}

// populate maps the pages of ram whose bits are set in words, a slice of a
// bitmap's words starting at page first, into the process: one
// madvise(MADV_POPULATE_READ) a run instead of a page fault a page, ahead
// of reading them. The workers of [ZeroPages] do this in parallel. Holes
// must not be set: populating a hole of a tmpfs file allocates it. It is
// only an optimization (Linux 5.14 and later): failures are ignored.
func populate(ram []byte, words []uint64, first int) {
	var start, n int // the run being gathered
	flush := func() {
		if n > 0 {
			_ = unix.Madvise(ram[start*hostPageSize:(start+n)*hostPageSize], unix.MADV_POPULATE_READ)
		}
	}
	for w, word := range words {
		for ; word != 0; word &= word - 1 {
			p := first + w*64 + bits.TrailingZeros64(word)
			if n > 0 && p == start+n {
				n++
				continue
			}
			flush()
			start, n = p, 1
		}
	}
	flush()
}

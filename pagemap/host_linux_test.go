package pagemap

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeFile answers lseek SEEK_DATA/SEEK_HOLE for a file of size bytes with
// the given data extents (sorted, disjoint, half-open byte ranges).
type fakeFile struct {
	size int64
	data [][2]int64
}

func (f fakeFile) seek(off int64, whence int) (int64, error) {
	if off < 0 {
		return 0, unix.EINVAL
	}
	if off >= f.size {
		return 0, unix.ENXIO
	}
	switch whence {
	case unix.SEEK_DATA:
		for _, d := range f.data {
			if off < d[1] {
				return max(off, d[0]), nil
			}
		}
		return 0, unix.ENXIO
	case unix.SEEK_HOLE:
		for _, d := range f.data {
			if off >= d[0] && off < d[1] {
				return d[1], nil // extents are disjoint and not adjacent
			}
		}
		return off, nil
	}
	return 0, unix.EINVAL
}

type run struct{ Start, Count uint64 }

func holeRuns(tb testing.TB, seek func(int64, int) (int64, error), size int64) ([]run, bool, error) {
	tb.Helper()
	var got []run
	ok, err := holeRanges(seek, size, func(start, count uint64) {
		got = append(got, run{start, count})
	})
	return got, ok, err
}

func TestHoleRanges(t *testing.T) {
	const P = hostPageSize
	for _, tt := range []struct {
		name string
		file fakeFile
		size int64
		want []run
	}{
		{"all hole", fakeFile{16 * P, nil}, 16 * P, []run{{0, 16}}},
		{"all data", fakeFile{16 * P, [][2]int64{{0, 16 * P}}}, 16 * P, nil},
		{"empty", fakeFile{0, nil}, 0, nil},
		{"extents", fakeFile{16 * P, [][2]int64{{2 * P, 3 * P}, {8 * P, 10 * P}}}, 16 * P,
			[]run{{0, 2}, {3, 5}, {10, 6}}},
		{"partial pages are data", fakeFile{16 * P, [][2]int64{{2*P + 100, 3*P + 1}, {10*P - 1, 10 * P}}}, 16 * P,
			[]run{{0, 2}, {4, 5}, {10, 6}}},
		{"file longer than size", fakeFile{32 * P, [][2]int64{{4 * P, 5 * P}, {20 * P, 21 * P}}}, 16 * P,
			[]run{{0, 4}, {5, 11}}},
		{"data straddles size", fakeFile{32 * P, [][2]int64{{4 * P, 5 * P}, {15 * P, 21 * P}}}, 16 * P,
			[]run{{0, 4}, {5, 10}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := holeRuns(t, tt.file.seek, tt.size)
			if err != nil || !ok {
				t.Fatalf("holeRanges = %v, %v", ok, err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("holes = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestHoleRangesErrors(t *testing.T) {
	const size = 16 * hostPageSize
	for _, errno := range []error{unix.EINVAL, unix.EOPNOTSUPP, unix.ENOSYS} {
		t.Run(fmt.Sprintf("unsupported %v", errno), func(t *testing.T) {
			_, ok, err := holeRuns(t, func(int64, int) (int64, error) { return 0, errno }, size)
			if ok || err != nil {
				t.Errorf("holeRanges = %v, %v; want unsupported, no error", ok, err)
			}
		})
	}
	for _, tt := range []struct {
		name string
		seek func(off int64, whence int) (int64, error)
	}{
		{"EIO", func(int64, int) (int64, error) { return 0, unix.EIO }},
		{"SEEK_DATA backwards", func(off int64, whence int) (int64, error) { return off - 1, nil }},
		{"SEEK_HOLE not forward", func(off int64, whence int) (int64, error) { return off, nil }},
		{"shrank", func(off int64, whence int) (int64, error) {
			if whence == unix.SEEK_HOLE {
				return 0, unix.ENXIO
			}
			return off, nil
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, ok, err := holeRuns(t, tt.seek, size); err == nil || !ok {
				t.Errorf("holeRanges = %v, %v; want an error", ok, err)
			}
		})
	}
}

// sparseFile creates a file of pages pages in /dev/shm (tmpfs), or in
// t.TempDir if there is no /dev/shm, and writes page i with fill(i) for
// each i in written. It reports whether the file is on tmpfs.
func sparseFile(t *testing.T, pages int, written []int, fill func(i int) byte) (*os.File, bool) {
	t.Helper()
	dir := "/dev/shm"
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		dir = t.TempDir()
	}
	f, err := os.CreateTemp(dir, "kvmckpt-holes-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		os.Remove(f.Name())
	})
	if err := f.Truncate(int64(pages) * hostPageSize); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, hostPageSize)
	for _, i := range written {
		for j := range buf {
			buf[j] = fill(i)
		}
		if _, err := f.WriteAt(buf, int64(i)*hostPageSize); err != nil {
			t.Fatal(err)
		}
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return f, st.Type == unix.TMPFS_MAGIC
}

func blocks(t *testing.T, f *os.File) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

// probeSink keeps the compiler from dropping a probing read.
var probeSink byte

// holeSet checks that holes is a sorted list of maximal, non-empty runs
// within n pages and returns it as a bitmap.
func holeSet(tb testing.TB, holes []PageRange, n uint64) *Bitmap {
	tb.Helper()
	b := NewBitmap(n)
	for i, h := range holes {
		if h.Count == 0 || h.End() > n || h.End() < h.Start {
			tb.Fatalf("hole %v out of [0, %#x)", h, n)
		}
		if i > 0 && holes[i-1].End() >= h.Start {
			tb.Fatalf("holes %v and %v not sorted, disjoint and separate", holes[i-1], h)
		}
		b.SetRange(h.Start, h.Count)
	}
	return b
}

const sparsePages = 16384 // 64 MiB

// sparseWritten are the pages sparseFile writes: isolated pages, a run
// crossing 2 MiB boundaries, and the last page.
var sparseWritten = []int{0, 1, 100, 4000, 4001, 4002, 8191, 8192, sparsePages - 1}

func TestHoles(t *testing.T) {
	f, tmpfs := sparseFile(t, sparsePages, sparseWritten, func(int) byte { return 0xee })
	list, err := Holes(f, sparsePages*hostPageSize)
	if err != nil {
		t.Fatal(err)
	}
	holes := holeSet(t, list, sparsePages)
	for _, i := range sparseWritten {
		if holes.Test(uint64(i)) {
			t.Errorf("written page %d reported as a hole", i)
		}
	}
	if !tmpfs {
		t.Logf("%s is not tmpfs: only checked that data is not a hole", f.Name())
		return
	}
	// tmpfs may allocate huge pages if the mount allows, so only pages
	// 2 MiB away from any write are certain to be holes.
	for i := range sparsePages {
		near := slices.ContainsFunc(sparseWritten, func(w int) bool { return i/512 == w/512 })
		if !near && !holes.Test(uint64(i)) {
			t.Fatalf("page %d, far from any write, not reported as a hole", i)
		}
	}
	t.Logf("%d of %d pages are holes, in %d runs", holes.Count(), sparsePages, len(list))

	// A prefix of the file.
	plist, err := Holes(f, 200*hostPageSize)
	if err != nil {
		t.Fatal(err)
	}
	prefix := holeSet(t, plist, 200)
	for i := range uint64(200) {
		if prefix.Test(i) != holes.Test(i) {
			t.Fatalf("prefix page %d: hole %v, full scan says %v", i, prefix.Test(i), holes.Test(i))
		}
	}
}

func TestHolesSize(t *testing.T) {
	f, _ := sparseFile(t, 4, nil, nil)
	for _, size := range []int64{-hostPageSize, 100, 5 * hostPageSize} {
		if _, err := Holes(f, size); !errors.Is(err, ErrRAMSize) {
			t.Errorf("Holes(size %d) = %v, want ErrRAMSize", size, err)
		}
	}
	if h, err := Holes(f, 0); err != nil || len(h) != 0 {
		t.Errorf("Holes(size 0) = %v, %v", h, err)
	}
}

// TestScanRAM checks that the zero scan finds zero and non-zero pages and
// leaves holes alone: the file's allocated blocks do not grow.
func TestScanRAM(t *testing.T) {
	// Even pages of sparseWritten are written with zeros: allocated, but
	// zero.
	fill := func(i int) byte {
		if slices.Index(sparseWritten, i)%2 == 0 {
			return 0
		}
		return 0x5a
	}
	f, tmpfs := sparseFile(t, sparsePages, sparseWritten, fill)
	ram, err := unix.Mmap(int(f.Fd()), 0, sparsePages*hostPageSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(ram)

	before := blocks(t, f)
	list, zero, err := ScanRAM(f, ram, 2)
	if err != nil {
		t.Fatal(err)
	}
	holes := holeSet(t, list, sparsePages)
	if after := blocks(t, f); after != before {
		t.Errorf("scan allocated: st_blocks %d -> %d", before, after)
	}
	for _, i := range sparseWritten {
		if want := fill(i) == 0; zero.Test(uint64(i)) != want {
			t.Errorf("page %d: zero = %v, want %v", i, zero.Test(uint64(i)), want)
		}
	}
	for i := range uint64(sparsePages) {
		if holes.Test(i) && zero.Test(i) {
			t.Fatalf("page %d is both a hole and a scanned zero page", i)
		}
	}

	if !tmpfs {
		return
	}
	// What the ordering avoids: a read through the mapping of a hole
	// allocates on tmpfs (shmem_fault, SGP_CACHE).
	hole, ok := holes.NextSet(4096)
	if !ok {
		t.Fatal("no hole to probe")
	}
	probeSink = ram[hole*hostPageSize]
	t.Logf("reading hole page %d through a shared mapping: st_blocks %d -> %d", hole, before, blocks(t, f))
}

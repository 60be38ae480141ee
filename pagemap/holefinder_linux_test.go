package pagemap

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// mapFile maps f's first n pages, shared and read-only.
func mapFile(t *testing.T, f *os.File, n int) []byte {
	t.Helper()
	m, err := syscall.Mmap(int(f.Fd()), 0, n*hostPageSize, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Munmap(m) })
	return m
}

// TestHoleFinder checks that the holes a HoleFinder reports for any range,
// from several goroutines at once, are [Holes]'s within that range.
func TestHoleFinder(t *testing.T) {
	f, _ := sparseFile(t, sparsePages, sparseWritten, func(int) byte { return 0xee })
	full, err := Holes(f, sparsePages*hostPageSize)
	if err != nil {
		t.Fatal(err)
	}
	want := holeSet(t, full, sparsePages)
	h := NewHoleFinder(f, mapFile(t, f, sparsePages))
	check := func(first, n uint64) {
		list, err := h.Holes(first, n)
		if err != nil {
			t.Error(err)
			return
		}
		got := holeSet(t, list, sparsePages)
		for i := range uint64(sparsePages) {
			if in := i >= first && i < first+n; got.Test(i) != (in && want.Test(i)) {
				t.Errorf("range [%d, %d), page %d: hole %v, Holes says %v", first, first+n, i, got.Test(i), want.Test(i))
				return
			}
		}
	}
	for _, r := range [][2]uint64{{0, sparsePages}, {0, 1}, {3, 77}, {100, 1}, {sparsePages - 5, 5}, {40, 0}} {
		check(r[0], r[1])
	}
	var wg sync.WaitGroup
	for w := range uint64(2) {
		wg.Go(func() {
			for first := w * 1024; first < sparsePages; first += 2048 {
				check(first, 1024)
			}
		})
	}
	wg.Wait()
	if _, err := h.Holes(sparsePages-1, 2); !errors.Is(err, ErrRAMSize) {
		t.Errorf("a range past the mapping: %v, want ErrRAMSize", err)
	}
}

// TestHoleFinderDataNotInMemory checks that a page of data that is not in
// memory (written, made durable and dropped from the page cache of a disk
// file, as a swapped-out page of tmpfs) counts as data, not as a hole.
func TestHoleFinderDataNotInMemory(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "kvmckpt-holes-*")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const pages = 64
	if err := f.Truncate(pages * hostPageSize); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, hostPageSize)
	buf[0] = 1
	for _, i := range []int64{5, 6, 40} {
		if _, err := f.WriteAt(buf, i*hostPageSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	full, err := Holes(f, pages*hostPageSize)
	if err != nil {
		t.Fatal(err)
	}
	h := NewHoleFinder(f, mapFile(t, f, pages))
	list, err := h.Holes(0, pages)
	if err != nil {
		t.Fatal(err)
	}
	got, want := holeSet(t, list, pages), holeSet(t, full, pages)
	for i := range uint64(pages) {
		if got.Test(i) != want.Test(i) {
			t.Fatalf("page %d: hole %v, Holes says %v", i, got.Test(i), want.Test(i))
		}
	}
	for _, i := range []uint64{5, 6, 40} {
		if got.Test(i) {
			t.Errorf("data page %d, not in memory, reported as a hole", i)
		}
	}
}

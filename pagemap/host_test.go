package pagemap

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"
)

func TestIsZero(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 64, hostPageSize, hostPageSize + 1, 3*hostPageSize + 5} {
		p := make([]byte, n)
		if !IsZero(p) {
			t.Errorf("%d zero bytes reported non-zero", n)
		}
		for _, i := range []int{0, 1, 7, 8, 63, 64, 2048, hostPageSize - 1, hostPageSize, n - 1} {
			if i < 0 || i >= n {
				continue
			}
			p[i] = 0x80
			if IsZero(p) {
				t.Errorf("%d bytes with byte %d set reported zero", n, i)
			}
			p[i] = 0
		}
	}
}

func TestPageRange(t *testing.T) {
	r := PageRange{Start: 0x10, Count: 0x20}
	if r.End() != 0x30 || r.String() != "[0x10, 0x30)" {
		t.Errorf("%v: End %#x", r, r.End())
	}
}

// ramImage returns n pages in which page i is zero if zero(i), else has one
// non-zero byte at a position that varies with i.
func ramImage(tb testing.TB, n int, zero func(i int) bool) []byte {
	tb.Helper()
	ram := make([]byte, n*hostPageSize)
	for i := range n {
		if !zero(i) {
			ram[i*hostPageSize+(i*37)%hostPageSize] = byte(i) | 1
		}
	}
	return ram
}

func TestZeroPages(t *testing.T) {
	const n = 3000 // not a multiple of 64 or of a chunk
	rng := rand.New(rand.NewPCG(3, 4))
	isZero := make([]bool, n)
	for i := range isZero {
		isZero[i] = rng.IntN(3) == 0
	}
	ram := ramImage(t, n+5, func(i int) bool { return i < n && isZero[i] })

	for _, tt := range []struct {
		name string
		cand func(i uint64) bool
	}{
		{"all", func(uint64) bool { return true }},
		{"none", func(uint64) bool { return false }},
		{"odd", func(i uint64) bool { return i%2 == 1 }},
		{"sparse runs", func(i uint64) bool { return i%700 < 90 }},
	} {
		for _, workers := range []int{0, 1, 2, 7, 100} {
			t.Run(fmt.Sprintf("%s/workers=%d", tt.name, workers), func(t *testing.T) {
				cand := NewBitmap(n)
				for i := range uint64(n) {
					if tt.cand(i) {
						cand.Set(i)
					}
				}
				got, err := ZeroPages(ram, cand, workers)
				if err != nil {
					t.Fatal(err)
				}
				if got.Len() != n {
					t.Fatalf("result Len = %d, want %d", got.Len(), n)
				}
				for i := range uint64(n) {
					if want := tt.cand(i) && isZero[i]; got.Test(i) != want {
						t.Fatalf("page %d: zero = %v, want %v", i, got.Test(i), want)
					}
				}
			})
		}
	}
}

func TestZeroPagesSize(t *testing.T) {
	ram := make([]byte, 10*hostPageSize+100)
	if _, err := ZeroPages(ram, NewBitmap(10), 1); err != nil {
		t.Errorf("10 pages in 10 pages and a bit: %v", err)
	}
	if _, err := ZeroPages(ram, NewBitmap(11), 1); !errors.Is(err, ErrRAMSize) {
		t.Errorf("11 pages in 10: error = %v, want ErrRAMSize", err)
	}
	if z, err := ZeroPages(nil, NewBitmap(0), 4); err != nil || z.Len() != 0 {
		t.Errorf("empty: %v, %v", z, err)
	}
}

// BenchmarkZeroPages scans 256 MiB of a shared memory file through a
// fresh mapping each time, as kvmckpt does with a guest's RAM file: the
// time includes mapping the pages in. "zero" is the worst case, a full
// read of every page; "used" pages differ in the first word; "late" pages
// differ only in the last word, the worst case for a page in use.
func BenchmarkZeroPages(b *testing.B) {
	const size = 256 << 20
	const n = size / hostPageSize
	fd, err := unix.MemfdCreate("zeropages", 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, size); err != nil {
		b.Fatal(err)
	}
	mapRAM := func(tb testing.TB) []byte {
		ram, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			tb.Fatal(err)
		}
		return ram
	}
	cand := NewBitmap(n)
	cand.SetRange(0, n)
	fill := func(at int) {
		ram := mapRAM(b)
		defer unix.Munmap(ram)
		clear(ram)
		if at >= 0 {
			for i := 0; i < size; i += hostPageSize {
				ram[i+at] = 1
			}
		}
	}
	for _, tt := range []struct {
		name string
		at   int // offset of the non-zero byte in each page; -1: none
	}{
		{"zero", -1},
		{"used", 0},
		{"late", hostPageSize - 1},
	} {
		fill(tt.at)
		for _, workers := range []int{1, 2} {
			b.Run(fmt.Sprintf("%s/workers=%d", tt.name, workers), func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					b.StopTimer()
					ram := mapRAM(b)
					b.StartTimer()
					if _, err := ZeroPages(ram, cand, workers); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					unix.Munmap(ram)
					b.StartTimer()
				}
			})
		}
	}
}

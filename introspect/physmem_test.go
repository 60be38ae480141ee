package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// patterned returns n bytes whose every 64-bit word holds tag plus its own
// offset, so a read of any word says where it came from.
func patterned(tb testing.TB, n int, tag uint64) []byte {
	tb.Helper()
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], tag+uint64(i))
	}
	return b
}

// twoSlotMem returns memory laid out like a QEMU x86 guest with RAM on both
// sides of the PCI hole, scaled down: backend 0 at [0, 0x3000) and backend 1
// at [0x3000, 0x5000) (contiguous with the first), then a hole, then backend
// 0 bytes 0x3000.. again at [0x10000, 0x12000).
func twoSlotMem(tb testing.TB) *PhysMem {
	tb.Helper()
	b0 := patterned(tb, 0x5000, 0xa0000000)
	b1 := patterned(tb, 0x2000, 0xb0000000)
	m, err := NewPhysMem([][]byte{b0, b1}, []Mapping{
		{GPA: 0x10000, Backend: 0, Offset: 0x3000, Size: 0x2000},
		{GPA: 0, Backend: 0, Offset: 0, Size: 0x3000},
		{GPA: 0x3000, Backend: 1, Offset: 0, Size: 0x2000},
	})
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

func TestNewPhysMemInvalid(t *testing.T) {
	back := [][]byte{make([]byte, 0x4000)}
	for _, tt := range []struct {
		name string
		maps []Mapping
	}{
		{"no backend", []Mapping{{GPA: 0, Backend: 1, Size: 0x1000}}},
		{"negative backend", []Mapping{{GPA: 0, Backend: -1, Size: 0x1000}}},
		{"empty", []Mapping{{GPA: 0, Size: 0}}},
		{"unaligned GPA", []Mapping{{GPA: 0x800, Size: 0x1000}}},
		{"unaligned offset", []Mapping{{GPA: 0, Offset: 0x10, Size: 0x1000}}},
		{"unaligned size", []Mapping{{GPA: 0, Size: 0x1800}}},
		{"GPA overflow", []Mapping{{GPA: 0xfffffffffffff000, Size: 0x2000}}},
		{"beyond backend", []Mapping{{GPA: 0, Offset: 0x2000, Size: 0x3000}}},
		{"offset beyond backend", []Mapping{{GPA: 0, Offset: 0x5000, Size: 0x1000}}},
		{"offset+size wraps", []Mapping{{GPA: 0, Offset: 0x1000, Size: 0xfffffffffffff000}}},
		{"overlap", []Mapping{{GPA: 0x1000, Size: 0x2000}, {GPA: 0, Size: 0x2000}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewPhysMem(back, tt.maps)
			if !errors.Is(err, ErrBadMapping) {
				t.Fatalf("NewPhysMem(%v) = %v, want error wrapping ErrBadMapping", tt.maps, err)
			}
		})
	}
}

func TestPhysMemLayout(t *testing.T) {
	m := twoSlotMem(t)
	maps := m.Mappings()
	for i := 1; i < len(maps); i++ {
		if maps[i-1].GPA >= maps[i].GPA {
			t.Fatalf("Mappings not sorted: %v", maps)
		}
	}
	if got, want := m.Size(), uint64(0x7000); got != want {
		t.Errorf("Size = %#x, want %#x", got, want)
	}
	for _, tt := range []struct {
		pa   PAddr
		want bool
	}{
		{0, true}, {0x4fff, true}, {0x5000, false}, {0xffff, false},
		{0x10000, true}, {0x11fff, true}, {0x12000, false}, {^PAddr(0), false},
	} {
		if got := m.Contains(tt.pa); got != tt.want {
			t.Errorf("Contains(%v) = %v, want %v", tt.pa, got, tt.want)
		}
	}
}

func TestPhysMemReadAt(t *testing.T) {
	m := twoSlotMem(t)
	for _, tt := range []struct {
		name    string
		pa      PAddr
		n       int
		want    []uint64 // words expected, from the start
		wantN   int
		wantBad PAddr // first unmapped address, if wantN < n
	}{
		{"inside", 0x1000, 16, []uint64{0xa0001000, 0xa0001008}, 16, 0},
		{"across contiguous slots", 0x2ff8, 16, []uint64{0xa0002ff8, 0xb0000000}, 16, 0},
		{"second alias of backend 0", 0x10008, 8, []uint64{0xa0003008}, 8, 0},
		{"into hole", 0x4ff8, 16, []uint64{0xb0001ff8}, 8, 0x5000},
		{"in hole", 0x8000, 8, nil, 0, 0x8000},
		{"past end", 0x12000, 1, nil, 0, 0x12000},
		{"wraps", 0xfffffffffffffff8, 16, nil, 0, 0xfffffffffffffff8},
		{"empty", 0x8000, 0, nil, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := make([]byte, tt.n)
			n, err := m.ReadAt(p, tt.pa)
			if n != tt.wantN {
				t.Errorf("ReadAt(%v, %d) n = %d, want %d", tt.pa, tt.n, n, tt.wantN)
			}
			for i, w := range tt.want {
				if got := binary.LittleEndian.Uint64(p[8*i:]); got != w {
					t.Errorf("word %d = %#x, want %#x", i, got, w)
				}
			}
			if tt.wantN == tt.n {
				if err != nil {
					t.Fatalf("ReadAt: %v", err)
				}
				return
			}
			var re *ReadError
			if !errors.As(err, &re) || !errors.Is(err, ErrNotMapped) {
				t.Fatalf("ReadAt error = %v, want *ReadError wrapping ErrNotMapped", err)
			}
			if re.Addr != tt.wantBad {
				t.Errorf("ReadError.Addr = %v, want %v", re.Addr, tt.wantBad)
			}
		})
	}
}

func TestPhysMemUint(t *testing.T) {
	m := twoSlotMem(t)
	if v, err := m.Uint64(0x1008); err != nil || v != 0xa0001008 {
		t.Errorf("Uint64(0x1008) = %#x, %v", v, err)
	}
	// Straddles the boundary between the two contiguous slots.
	want := uint64(0xa0002ff8)>>32 | uint64(0xb0000000)<<32
	if v, err := m.Uint64(0x2ffc); err != nil || v != want {
		t.Errorf("Uint64(0x2ffc) = %#x, %v; want %#x", v, err, want)
	}
	if v, err := m.Uint32(0x100c); err != nil || v != 0 {
		t.Errorf("Uint32(0x100c) = %#x, %v; want 0 (high half of a word)", v, err)
	}
	if v, err := m.Uint32(0x1008); err != nil || v != 0xa0001008 {
		t.Errorf("Uint32(0x1008) = %#x, %v", v, err)
	}
	for _, pa := range []PAddr{0x4ffc, 0x8000, 0xfffffffffffffffc} {
		if _, err := m.Uint64(pa); !errors.Is(err, ErrNotMapped) {
			t.Errorf("Uint64(%v) error = %v, want ErrNotMapped", pa, err)
		}
		if _, err := m.Uint32(pa + 2); !errors.Is(err, ErrNotMapped) {
			t.Errorf("Uint32(%v) error = %v, want ErrNotMapped", pa+2, err)
		}
	}
}

func TestPhysMemSlice(t *testing.T) {
	m := twoSlotMem(t)
	b, ok := m.Slice(0x2000, 0x1000)
	if !ok || len(b) != 0x1000 || cap(b) != 0x1000 || binary.LittleEndian.Uint64(b) != 0xa0002000 {
		t.Fatalf("Slice(0x2000, 0x1000) = len %d cap %d, %v", len(b), cap(b), ok)
	}
	for _, tt := range []struct {
		pa PAddr
		n  uint64
	}{
		{0x2ff8, 16},              // crosses into another mapping
		{0x5000, 1},               // hole
		{0x11000, 0x1001},         // past the end
		{0x0, 0xffffffffffffffff}, // huge
		{^PAddr(0), 1},            // top of the address space
	} {
		if _, ok := m.Slice(tt.pa, tt.n); ok {
			t.Errorf("Slice(%v, %#x) succeeded, want failure", tt.pa, tt.n)
		}
	}
}

func TestMapFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ram")
	want := patterned(t, 3*PageSize, 0x1234)
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	data, unmap, err := MapFile(path, int64(len(want)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, want) {
		t.Error("mapped bytes differ from file")
	}
	if err := unmap(); err != nil {
		t.Errorf("unmap: %v", err)
	}
	if err := unmap(); err != nil {
		t.Errorf("second unmap: %v", err)
	}

	for _, size := range []int64{0, -1, int64(len(want)) + 1} {
		if _, _, err := MapFile(path, size); !errors.Is(err, ErrFileSize) {
			t.Errorf("MapFile(size %d) error = %v, want ErrFileSize", size, err)
		}
	}
	if _, _, err := MapFile(filepath.Join(dir, "missing"), PageSize); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("MapFile(missing) error = %v, want fs.ErrNotExist", err)
	}
}

// TestPhysMemManySlots covers the binary search used with many mappings,
// against a linear reference.
func TestPhysMemManySlots(t *testing.T) {
	back := patterned(t, 16*PageSize, 0xc0000000)
	var maps []Mapping
	for i := range 10 {
		// Slot i at GPA i*3 pages (a one-page gap after each), in reverse.
		j := 9 - i
		maps = append(maps, Mapping{GPA: PAddr(j * 3 * PageSize), Offset: uint64(j) * PageSize, Size: 2 * PageSize})
	}
	m, err := NewPhysMem([][]byte{back}, maps)
	if err != nil {
		t.Fatal(err)
	}
	for pa := PAddr(0); pa < 32*PageSize; pa += PageSize / 2 {
		slot := uint64(pa) / (3 * PageSize)
		inSlot := uint64(pa)%(3*PageSize) < 2*PageSize && slot < 10
		if got := m.Contains(pa); got != inSlot {
			t.Fatalf("Contains(%v) = %v, want %v", pa, got, inSlot)
		}
		v, err := m.Uint64(pa)
		if !inSlot {
			if !errors.Is(err, ErrNotMapped) {
				t.Fatalf("Uint64(%v) = %v, want ErrNotMapped", pa, err)
			}
			continue
		}
		want := 0xc0000000 + slot*PageSize + uint64(pa)%(3*PageSize)
		if err != nil || v != want {
			t.Fatalf("Uint64(%v) = %#x, %v; want %#x", pa, v, err, want)
		}
	}
}

package introspect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pageTables builds x86-64 page tables inside a synthetic guest RAM image.
// Tables come from a bump allocator over [tablesAt, len(ram)).
type pageTables struct {
	tb   testing.TB
	ram  []byte
	next PAddr
	root PAddr
	la57 bool
}

func newPageTables(tb testing.TB, ramSize int, tablesAt PAddr, la57 bool) *pageTables {
	tb.Helper()
	pt := &pageTables{tb: tb, ram: make([]byte, ramSize), next: tablesAt, la57: la57}
	pt.root = pt.alloc()
	return pt
}

func (pt *pageTables) top() Level {
	if pt.la57 {
		return LevelPML5
	}
	return LevelPML4
}

// alloc returns a zeroed page for a new table.
func (pt *pageTables) alloc() PAddr {
	pt.tb.Helper()
	if uint64(pt.next)+PageSize > uint64(len(pt.ram)) {
		pt.tb.Fatalf("test guest RAM of %#x bytes out of table pages", len(pt.ram))
	}
	p := pt.next
	pt.next += PageSize
	return p
}

func (pt *pageTables) get(table PAddr, idx uint64) PTE {
	return PTE(binary.LittleEndian.Uint64(pt.ram[uint64(table)+idx*8:]))
}

func (pt *pageTables) set(table PAddr, idx uint64, e PTE) {
	binary.LittleEndian.PutUint64(pt.ram[uint64(table)+idx*8:], uint64(e))
}

// tableFor returns the level-l table that holds va's entry, creating the
// tables above it as needed.
func (pt *pageTables) tableFor(va VAddr, l Level) PAddr {
	pt.tb.Helper()
	tab := pt.root
	for lv := pt.top(); lv > l; lv-- {
		i := lv.index(uint64(va))
		e := pt.get(tab, i)
		switch {
		case !e.Present():
			e = PTE(pt.alloc()) | PTEPresent | PTERW | PTEUser
			pt.set(tab, i, e)
		case e.Leaf(lv):
			pt.tb.Fatalf("map %v: covered by a %v", va, lv)
		}
		tab = e.Address()
	}
	return tab
}

// mapPage maps the level-l page at va (4 KiB, 2 MiB or 1 GiB) to pa.
func (pt *pageTables) mapPage(va VAddr, pa PAddr, l Level, flags PTE) {
	pt.tb.Helper()
	if uint64(va)%l.PageSize() != 0 || uint64(pa)%l.PageSize() != 0 {
		pt.tb.Fatalf("map %v -> %v: not aligned to %#x", va, pa, l.PageSize())
	}
	e := PTE(pa) | PTEPresent | flags
	if l > LevelPT {
		e |= PTEPS
	}
	pt.set(pt.tableFor(va, l), l.index(uint64(va)), e)
}

// mem returns the RAM image as guest-physical memory at address 0.
func (pt *pageTables) mem() *PhysMem {
	pt.tb.Helper()
	m, err := NewPhysMem([][]byte{pt.ram}, []Mapping{{GPA: 0, Size: uint64(len(pt.ram))}})
	if err != nil {
		pt.tb.Fatal(err)
	}
	return m
}

func (pt *pageTables) translator() *Translator {
	return &Translator{Mem: pt.mem(), Root: pt.root, LA57: pt.la57}
}

const (
	testRAM      = 4 << 20 // 4 MiB of guest RAM
	testTablesAt = 2 << 20 // tables in the upper half, data in the lower
)

// testTables maps, in either paging mode:
//
//	0x400000           4K -> 0x5000
//	0x401000           4K -> 0x3000  (not contiguous with the first)
//	0x7f0000200000     2M -> 0x0
//	0xffff888000000000 1G -> 0x0     (like Linux's direct map)
//	0xffffffff81000000 2M -> 0x200000, with the PAT bit set
//
// and the lower half of RAM holds [patterned] data.
func testTables(tb testing.TB, la57 bool) *pageTables {
	tb.Helper()
	pt := newPageTables(tb, testRAM, testTablesAt, la57)
	copy(pt.ram, patterned(tb, testTablesAt, 0x5a00000000))
	pt.mapPage(0x400000, 0x5000, LevelPT, PTERW|PTEUser)
	pt.mapPage(0x401000, 0x3000, LevelPT, PTERW|PTEUser|PTENX)
	pt.mapPage(0x7f0000200000, 0, LevelPD, PTEUser)
	pt.mapPage(0xffff888000000000, 0, LevelPDPT, PTERW|PTEGlobal|PTENX)
	pt.mapPage(0xffffffff81000000, 0x200000, LevelPD, PTEGlobal|PTEPATLarge)
	return pt
}

func forBothModes(t *testing.T, f func(t *testing.T, la57 bool)) {
	for _, la57 := range []bool{false, true} {
		t.Run(fmt.Sprintf("la57=%v", la57), func(t *testing.T) { f(t, la57) })
	}
}

func TestTranslate(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		tr := testTables(t, la57).translator()
		for _, tt := range []struct {
			va VAddr
			pa PAddr
		}{
			{0x400000, 0x5000},
			{0x400abc, 0x5abc},
			{0x401fff, 0x3fff},
			{0x7f0000200000, 0},
			{0x7f00003fffff, 0x1fffff},
			{0xffff888000000000, 0},
			{0xffff888012345678, 0x12345678},
			{0xffff88803fffffff, 0x3fffffff},
			{0xffffffff81000000, 0x200000}, // PAT bit 12 is not address
			{0xffffffff811fffff, 0x3fffff},
		} {
			pa, err := tr.Translate(tt.va)
			if err != nil || pa != tt.pa {
				t.Errorf("Translate(%v) = %v, %v; want %v", tt.va, pa, err, tt.pa)
			}
		}
	})
}

func TestTranslateErrors(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		pt := testTables(t, la57)
		// PS in a PML4E is reserved.
		pt.set(pt.tableFor(0x200000000000, LevelPML4), LevelPML4.index(0x200000000000),
			PTE(pt.alloc())|PTEPresent|PTEPS)
		// Bit 13 of a 2 MiB PDE is reserved.
		pt.set(pt.tableFor(0x800000, LevelPD), LevelPD.index(0x800000),
			PTE(0x200000)|PTEPresent|PTEPS|1<<13)
		// Bits 13..29 of a 1 GiB PDPTE are reserved.
		pt.set(pt.tableFor(0xffff888040000000, LevelPDPT), LevelPDPT.index(0xffff888040000000),
			PTE(0x40000000)|PTEPresent|PTEPS|1<<29)
		// A PDE pointing outside guest RAM.
		pt.set(pt.tableFor(0xa00000, LevelPD), LevelPD.index(0xa00000),
			PTE(0x40000000)|PTEPresent)

		tr := pt.translator()
		nonCanonical := VAddr(0x0000800000000000)
		if la57 {
			nonCanonical = 0x0100000000000000
		}
		for _, tt := range []struct {
			name  string
			va    VAddr
			err   error
			level Level
		}{
			{"PTE not present", 0x402000, ErrNotPresent, LevelPT},
			{"PDE not present", 0x600000, ErrNotPresent, LevelPD},
			{"PDPTE not present", 0x40000000, ErrNotPresent, LevelPDPT},
			{"PML4E not present", 0x100000000000, ErrNotPresent, LevelPML4},
			{"PML4E PS", 0x200000000000, ErrReservedBit, LevelPML4},
			{"2M PDE reserved", 0x800000, ErrReservedBit, LevelPD},
			{"1G PDPTE reserved", 0xffff888040000000, ErrReservedBit, LevelPDPT},
			{"non-canonical", nonCanonical, ErrNonCanonical, 0},
			{"non-canonical high", 0x8000000000000000, ErrNonCanonical, 0},
			{"table outside RAM", 0xa00000, ErrNotMapped, LevelPT},
		} {
			t.Run(tt.name, func(t *testing.T) {
				pa, err := tr.Translate(tt.va)
				var te *TranslateError
				if !errors.As(err, &te) || !errors.Is(err, tt.err) {
					t.Fatalf("Translate(%v) = %v, %v; want *TranslateError wrapping %v", tt.va, pa, err, tt.err)
				}
				if te.Level != tt.level || te.Addr != tt.va {
					t.Errorf("TranslateError = %+v, want Level %v Addr %v", te, tt.level, tt.va)
				}
				if tt.err == ErrNotMapped {
					var re *ReadError
					if !errors.As(err, &re) || re.Addr != 0x40000000+PAddr(LevelPT.index(0xa00000)*8) {
						t.Errorf("error %v: want *ReadError at the PTE's address", err)
					}
				}
			})
		}
		if la57 {
			// Canonical with 57 bits, though not with 48.
			if _, err := tr.Translate(0x0000800000000000); !errors.Is(err, ErrNotPresent) {
				t.Errorf("Translate(0x800000000000) with LA57 = %v, want ErrNotPresent", err)
			}
		}
	})
}

func TestTranslateRootOutsideRAM(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		tr := testTables(t, la57).translator()
		tr.Root = 0x7fff000
		_, err := tr.Translate(0x400000)
		var te *TranslateError
		if !errors.As(err, &te) || !errors.Is(err, ErrNotMapped) || te.Level != tr.top() {
			t.Fatalf("Translate with root outside RAM = %v, want ErrNotMapped at %v", err, tr.top())
		}
	})
}

func TestRootFromCR3(t *testing.T) {
	for _, tt := range []struct {
		cr3  uint64
		want PAddr
	}{
		{0x1234000, 0x1234000},
		{0x1234018, 0x1234000},                   // PWT|PCD
		{0x8000000001234abc, 0x1234000},          // no-flush bit and PCID
		{0x000ffffffffff000, 0x000ffffffffff000}, // all address bits
		{0xfff0000000000fff, 0},
	} {
		if got := RootFromCR3(tt.cr3); got != tt.want {
			t.Errorf("RootFromCR3(%#x) = %v, want %v", tt.cr3, got, tt.want)
		}
	}
}

func TestPTE(t *testing.T) {
	e := PTE(0x80000000_12345fe7) // NX, address 0x12345000, G PS D A U RW P
	if !e.Present() || !e.Writable() || !e.User() || !e.Large() || !e.NX() {
		t.Errorf("%v: flag accessors wrong", e)
	}
	if got := e.Address(); got != 0x12345000 {
		t.Errorf("Address = %v", got)
	}
	if got := e.PageAddress(LevelPD); got != 0x12200000 {
		t.Errorf("PageAddress(PD) = %v", got)
	}
	if got := e.PageAddress(LevelPDPT); got != 0 {
		t.Errorf("PageAddress(PDPT) = %v", got)
	}
	if got := PTE(0xfff0_0000_0000_1001).Address(); got != 0x1000 {
		t.Errorf("Address ignores bits 52..63: got %v", got)
	}
	if got, want := PTE(0x1063).String(), "0x1063[P RW A D]"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	for _, tt := range []struct {
		e     PTE
		l     Level
		leaf  bool
		resvd bool
	}{
		{0x1083, LevelPT, true, false}, // bit 7 is PAT in a PTE
		{0x1083, LevelPD, true, false},
		{0x3083, LevelPD, true, true},
		{0x200083, LevelPD, true, false},
		{0x1083, LevelPDPT, true, false},
		{0x20001083, LevelPDPT, true, true},
		{0x40000083, LevelPDPT, true, false},
		{0x1083, LevelPML4, false, true},
		{0x1083, LevelPML5, false, true},
		{0x3003, LevelPD, false, false},
		{0x3003, LevelPML4, false, false},
	} {
		if got := tt.e.Leaf(tt.l); got != tt.leaf {
			t.Errorf("%v.Leaf(%v) = %v, want %v", tt.e, tt.l, got, tt.leaf)
		}
		if got := tt.e.Reserved(tt.l); got != tt.resvd {
			t.Errorf("%v.Reserved(%v) = %v, want %v", tt.e, tt.l, got, tt.resvd)
		}
	}
}

func TestReadVirt(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		tr := testTables(t, la57).translator()
		word := func(pa uint64) uint64 { return 0x5a00000000 + pa }

		// Across two 4K pages that are not physically contiguous.
		p := make([]byte, 16)
		if n, err := tr.ReadVirt(p, 0x400ff8); err != nil || n != 16 {
			t.Fatalf("ReadVirt(0x400ff8) = %d, %v", n, err)
		}
		if a, b := binary.LittleEndian.Uint64(p), binary.LittleEndian.Uint64(p[8:]); a != word(0x5ff8) || b != word(0x3000) {
			t.Errorf("ReadVirt(0x400ff8) = %#x %#x, want %#x %#x", a, b, word(0x5ff8), word(0x3000))
		}
		if v, err := tr.Uint64Virt(0x400ffc); err != nil || v != word(0x5ff8)>>32|word(0x3000)<<32 {
			t.Errorf("Uint64Virt(0x400ffc) = %#x, %v", v, err)
		}
		if v, err := tr.Uint64Virt(0xffff888000001008); err != nil || v != word(0x1008) {
			t.Errorf("Uint64Virt(direct map) = %#x, %v", v, err)
		}

		// Into a non-present page: partial read.
		n, err := tr.ReadVirt(p, 0x401ff8)
		var te *TranslateError
		if n != 8 || !errors.As(err, &te) || !errors.Is(err, ErrNotPresent) || te.Addr != 0x402000 {
			t.Errorf("ReadVirt(0x401ff8) = %d, %v; want 8, not present at 0x402000", n, err)
		}
		if _, err := tr.Uint64Virt(0x402000); !errors.Is(err, ErrNotPresent) {
			t.Errorf("Uint64Virt(0x402000) = %v, want ErrNotPresent", err)
		}

		// Mapped, but to a physical address outside RAM.
		n, err = tr.ReadVirt(p, 0xffff888000000000+testRAM-8)
		var re *ReadError
		if n != 8 || !errors.As(err, &re) || !errors.Is(err, ErrNotMapped) || re.Addr != testRAM {
			t.Errorf("ReadVirt past RAM = %d, %v; want 8, *ReadError at %#x", n, err, testRAM)
		}
		if _, err := tr.Uint64Virt(0xffff888000000000 + testRAM); !errors.Is(err, ErrNotMapped) {
			t.Errorf("Uint64Virt past RAM = %v, want ErrNotMapped", err)
		}

		// Wrapping past the top of the address space.
		if n, err := tr.ReadVirt(p, 0xfffffffffffffff8); n != 0 || err == nil {
			t.Errorf("ReadVirt(top) = %d, %v; want failure", n, err)
		}

		// A whole 2 MiB page in one read.
		big := make([]byte, 2<<20)
		if n, err := tr.ReadVirt(big, 0x7f0000200000); err != nil || n != len(big) {
			t.Fatalf("ReadVirt(2M page) = %d, %v", n, err)
		}
		if got := binary.LittleEndian.Uint64(big[0x1ffff8:]); got != word(0x1ffff8) {
			t.Errorf("2M page last word = %#x", got)
		}
	})
}

type walked struct {
	VA   VAddr
	PA   PAddr
	Size uint64
}

func collect(t *testing.T, tr *Translator, start, end VAddr) []walked {
	t.Helper()
	var got []walked
	if err := tr.Walk(start, end, func(va VAddr, pa PAddr, size uint64) bool {
		got = append(got, walked{va, pa, size})
		return true
	}); err != nil {
		t.Fatalf("Walk(%v, %v): %v", start, end, err)
	}
	return got
}

func TestWalk(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		pt := testTables(t, la57)
		// Contiguous with 0x401000 -> 0x3000 in both spaces: merged.
		pt.mapPage(0x402000, 0x4000, LevelPT, PTERW)
		// Virtually contiguous, physically not: separate.
		pt.mapPage(0x403000, 0x9000, LevelPT, PTERW)
		// A 4K page just before the 2M page at 0x7f0000200000, physically
		// not adjacent to it: separate.
		pt.mapPage(0x7f00001ff000, 0x1ff000, LevelPT, PTERW)
		// A non-present entry with junk in it is skipped.
		pt.set(pt.tableFor(0x404000, LevelPT), LevelPT.index(0x404000), 0x7ffffffffffff000)
		// So are a PDE pointing outside RAM and one with reserved bits.
		pt.set(pt.tableFor(0xa00000, LevelPD), LevelPD.index(0xa00000), PTE(0x40000000)|PTEPresent)
		pt.set(pt.tableFor(0xc00000, LevelPD), LevelPD.index(0xc00000), PTE(0x200000)|PTEPresent|PTEPS|1<<14)
		tr := pt.translator()

		top := VAddr(0xfffffffffffff000)
		for _, tt := range []struct {
			name       string
			start, end VAddr
			want       []walked
		}{
			{"everything", 0, top, []walked{
				{0x400000, 0x5000, 0x1000},
				{0x401000, 0x3000, 0x2000},
				{0x403000, 0x9000, 0x1000},
				{0x7f00001ff000, 0x1ff000, 0x1000},
				{0x7f0000200000, 0, 2 << 20},
				{0xffff888000000000, 0, 1 << 30},
				{0xffffffff81000000, 0x200000, 2 << 20},
			}},
			{"clipped inside a 4K page", 0x400800, 0x401800, []walked{
				{0x400800, 0x5800, 0x800},
				{0x401000, 0x3000, 0x800},
			}},
			{"clipped inside a 1G page", 0xffff888000123000, 0xffff888000124000, []walked{
				{0xffff888000123000, 0x123000, 0x1000},
			}},
			{"lower half only", 0x7f0000000000, 0xffff800000000000, []walked{
				{0x7f00001ff000, 0x1ff000, 0x1000},
				{0x7f0000200000, 0, 2 << 20},
			}},
			{"hole only", 0x0000800000000000, 0xff00000000000000, nil},
			{"empty", 0x400000, 0x400000, nil},
			{"inverted", 0x401000, 0x400000, nil},
			{"kernel image", KernelMapStart, KernelMapEnd, []walked{
				{0xffffffff81000000, 0x200000, 2 << 20},
			}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				got := collect(t, tr, tt.start, tt.end)
				if !slices.Equal(got, tt.want) {
					t.Errorf("Walk(%v, %v) =\n%x\nwant\n%x", tt.start, tt.end, got, tt.want)
				}
				// Every range must agree with Translate at both ends.
				for _, w := range got {
					for _, va := range []VAddr{w.VA, w.VA + VAddr(w.Size) - 1} {
						pa, err := tr.Translate(va)
						if want := w.PA + PAddr(va-w.VA); err != nil || pa != want {
							t.Errorf("Translate(%v) = %v, %v; Walk said %v", va, pa, err, want)
						}
					}
				}
			})
		}
	})
}

func TestWalkStop(t *testing.T) {
	tr := testTables(t, false).translator()
	calls := 0
	err := tr.Walk(0, 0xfffffffffffff000, func(VAddr, PAddr, uint64) bool {
		calls++
		return calls < 2
	})
	if err != nil || calls != 2 {
		t.Errorf("Walk stopping after 2 = %d calls, %v", calls, err)
	}
}

// TestWalkLimit points every PML4E at the PML4 table itself. A strict walk
// then sees a 512-ary tree of 512^4 leaves built from one page.
func TestWalkLimit(t *testing.T) {
	pt := newPageTables(t, 2*PageSize, 0, false)
	for i := range uint64(ptEntries) {
		pt.set(pt.root, i, PTE(pt.root)|PTEPresent|PTERW)
	}
	tr := pt.translator()
	tr.WalkLimit = 100000
	calls := 0
	err := tr.Walk(0, 0xfffffffffffff000, func(va VAddr, pa PAddr, size uint64) bool {
		calls++
		return true
	})
	if !errors.Is(err, ErrWalkLimit) {
		t.Fatalf("Walk over self-referencing tables = %v, want ErrWalkLimit", err)
	}
	if calls == 0 {
		t.Error("Walk reported nothing before hitting the limit")
	}
	// Translate is bounded by the level count regardless.
	if pa, err := tr.Translate(0x7fffffffffff); err != nil || pa != pt.root+0xfff {
		t.Errorf("Translate = %v, %v", pa, err)
	}
}

func TestFindKernelText(t *testing.T) {
	const (
		slide    = 0x2a00000
		textVA   = VAddr(0xffffffff81000000 + slide)
		textPA   = PAddr(0x5e00000)
		pageSize = 2 << 20
	)
	forBothModes(t, func(t *testing.T, la57 bool) {
		t.Run("2M pages", func(t *testing.T) {
			pt := newPageTables(t, 1<<20, 0, la57)
			for i := range 8 {
				pt.mapPage(textVA+VAddr(i*pageSize), textPA+PAddr(i*pageSize), LevelPD, PTEGlobal)
			}
			// Modules and fixmap lie above the kernel image region.
			pt.mapPage(0xffffffffc0000000, 0x1000, LevelPT, PTERW)
			pt.mapPage(0xffffffffff5fc000, 0x2000, LevelPT, PTERW)
			// The direct map lies below it.
			pt.mapPage(0xffff888000000000, 0, LevelPDPT, PTERW)
			va, pa, err := FindKernelText(pt.translator())
			if err != nil || va != textVA || pa != textPA {
				t.Fatalf("FindKernelText = %v, %v, %v; want %v, %v", va, pa, err, textVA, textPA)
			}
		})
		t.Run("split into 4K pages", func(t *testing.T) {
			pt := newPageTables(t, 1<<20, 0, la57)
			for i := range 4 {
				pt.mapPage(textVA+VAddr(i*PageSize), textPA+PAddr(i*PageSize), LevelPT, PTEGlobal)
			}
			va, pa, err := FindKernelText(pt.translator())
			if err != nil || va != textVA || pa != textPA {
				t.Fatalf("FindKernelText = %v, %v, %v; want %v, %v", va, pa, err, textVA, textPA)
			}
		})
		for _, tt := range []struct {
			name string
			va   VAddr
			pa   PAddr
		}{
			{"nothing mapped", 0, 0},
			{"only modules", 0xffffffffc0000000, 0x200000},
			{"unaligned VA", textVA + PageSize, textPA},
			{"unaligned PA", textVA, textPA + PageSize},
		} {
			t.Run(tt.name, func(t *testing.T) {
				pt := newPageTables(t, 1<<20, 0, la57)
				if tt.va != 0 {
					pt.mapPage(tt.va, tt.pa, LevelPT, PTERW)
				}
				va, pa, err := FindKernelText(pt.translator())
				if !errors.Is(err, ErrNoKernelText) {
					t.Errorf("FindKernelText = %v, %v, %v; want ErrNoKernelText", va, pa, err)
				}
			})
		}
	})
}

// TestGarbageTables translates random addresses through random memory.
// Nothing may panic, and Walk must agree with Translate.
func TestGarbageTables(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 20 {
		ram := make([]byte, 64*PageSize)
		for i := range ram {
			ram[i] = byte(rng.Uint32())
		}
		// Bias entries towards present pointers into RAM, so walks go deep.
		for i := 0; i < len(ram); i += 8 {
			if rng.IntN(2) == 0 {
				e := PTE(rng.IntN(len(ram)/PageSize))<<PageShift | PTE(rng.Uint64()&0xfff) | PTEPresent
				binary.LittleEndian.PutUint64(ram[i:], uint64(e))
			}
		}
		m, err := NewPhysMem([][]byte{ram}, []Mapping{{GPA: 0, Size: uint64(len(ram))}})
		if err != nil {
			t.Fatal(err)
		}
		tr := &Translator{Mem: m, Root: PAddr(rng.IntN(len(ram))), LA57: round%2 == 1, WalkLimit: 50000}
		checkTranslator(t, tr, rng.Uint64(), rng)
	}
}

// checkTranslator exercises every Translator method on tr and checks that
// they agree; it must not panic whatever tr's memory holds.
func checkTranslator(t testing.TB, tr *Translator, va0 uint64, rng *rand.Rand) {
	t.Helper()
	buf := make([]byte, 3*PageSize)
	for i := range 200 {
		va := VAddr(va0)
		if i > 0 {
			va = VAddr(rng.Uint64())
		}
		if i%2 == 0 { // make half of them canonical
			s := 64 - tr.vaBits()
			va = VAddr(int64(va) << s >> s)
		}
		pa, err := tr.Translate(va)
		if err == nil && pa.PageOffset() != va.PageOffset() {
			t.Fatalf("Translate(%v) = %v: page offset changed", va, pa)
		}
		var te *TranslateError
		if err != nil && !errors.As(err, &te) {
			t.Fatalf("Translate(%v) error %v is not a *TranslateError", va, err)
		}
		want := rng.IntN(len(buf))
		n, err := tr.ReadVirt(buf[:want], va)
		if n > want || (err == nil && n != want) || (err != nil && n == want && want > 0) {
			t.Fatalf("ReadVirt(%d bytes at %v) = %d, %v", want, va, n, err)
		}
		v, err := tr.Uint64Virt(va)
		if err == nil && want >= 8 && n >= 8 && v != binary.LittleEndian.Uint64(buf) {
			t.Fatalf("Uint64Virt(%v) = %#x, ReadVirt read %#x", va, v, binary.LittleEndian.Uint64(buf))
		}
	}
	seen := 0
	err := tr.Walk(0, 0xfffffffffffff000, func(va VAddr, pa PAddr, size uint64) bool {
		if size == 0 {
			t.Fatalf("Walk reported an empty range at %v", va)
		}
		if got, err := tr.Translate(va); err != nil || got != pa {
			t.Fatalf("Walk says %v -> %v, Translate says %v, %v", va, pa, got, err)
		}
		seen++
		return seen < 1000
	})
	if err != nil && !errors.Is(err, ErrWalkLimit) {
		t.Fatalf("Walk: %v", err)
	}
}

func FuzzTranslate(f *testing.F) {
	// Seeds: small well-formed page tables in a 16-page RAM, each with a
	// root and an address that translates.
	for _, la57 := range []bool{false, true} {
		pt := newPageTables(f, 16*PageSize, 4*PageSize, la57)
		pt.mapPage(0x400000, 0x1000, LevelPT, PTERW)
		pt.mapPage(0x7f0000200000, 0, LevelPD, PTERW)
		pt.mapPage(0xffff888000000000, 0, LevelPDPT, PTERW)
		pt.mapPage(0xffffffff81000000, 0x200000, LevelPD, PTEGlobal)
		for _, va := range []uint64{0x400123, 0x7f0000200008, 0xffff888000001000, 0xffffffff81000000} {
			f.Add(pt.ram, uint64(pt.root), va, la57)
		}
	}
	f.Fuzz(func(t *testing.T, ram []byte, root, va uint64, la57 bool) {
		n := min(len(ram)&^PageMask, 64*PageSize)
		if n == 0 {
			return
		}
		m, err := NewPhysMem([][]byte{ram[:n]}, []Mapping{{GPA: 0, Size: uint64(n)}})
		if err != nil {
			t.Fatal(err)
		}
		tr := &Translator{Mem: m, Root: PAddr(root), LA57: la57, WalkLimit: 20000}
		checkTranslator(t, tr, va, rand.New(rand.NewPCG(root, va)))
	})
}

func BenchmarkTranslate(b *testing.B) {
	for _, la57 := range []bool{false, true} {
		for _, tt := range []struct {
			name string
			va   VAddr
		}{
			{"4K", 0x400abc},
			{"2M", 0x7f0000212345},
			{"1G", 0xffff888012345678},
		} {
			b.Run(fmt.Sprintf("la57=%v/%s", la57, tt.name), func(b *testing.B) {
				tr := testTables(b, la57).translator()
				for b.Loop() {
					if _, err := tr.Translate(tt.va); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkReadVirt reads 256 virtually contiguous 4 KiB pages scattered
// over physical memory, one page per call, as dumping a process would.
func BenchmarkReadVirt(b *testing.B) {
	pt := newPageTables(b, testRAM, testTablesAt, false)
	const base = VAddr(0x7f1234000000)
	for i := range 256 {
		pt.mapPage(base+VAddr(i*PageSize), PAddr((i*7919)%256*PageSize), LevelPT, PTERW)
	}
	tr := pt.translator()
	buf := make([]byte, PageSize)
	b.SetBytes(PageSize)
	i := 0
	for b.Loop() {
		if _, err := tr.ReadVirt(buf, base+VAddr(i%256*PageSize)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkWalk walks 64 MiB mapped with 4 KiB pages, as scanning a
// process's address space would, and reports entries read per second.
func BenchmarkWalk(b *testing.B) {
	pt := newPageTables(b, testRAM, testTablesAt, false)
	const base, pages = VAddr(0x7f0000000000), 16384
	for i := range pages {
		// Alternate two frames so that nothing merges: one call per page.
		pt.mapPage(base+VAddr(i*PageSize), PAddr(i%2*2*PageSize), LevelPT, PTERW)
	}
	tr := pt.translator()
	for b.Loop() {
		calls := 0
		if err := tr.Walk(0, 0x800000000000, func(VAddr, PAddr, uint64) bool {
			calls++
			return true
		}); err != nil || calls != pages {
			b.Fatalf("Walk = %d calls, %v", calls, err)
		}
	}
	b.ReportMetric(float64(pages)*float64(b.N)/b.Elapsed().Seconds(), "pages/s")
}

// TestProtNone: a leaf entry with the present bit clear and _PAGE_PROTNONE
// set (PROT_NONE, or NUMA balancing's hinting) maps a page in memory for a
// translator of a process's tables, and nothing for one of the kernel's;
// an upper-level entry so marked, or a swap-like entry, maps nothing.
func TestProtNone(t *testing.T) {
	for _, la57 := range []bool{false, true} {
		pt := newPageTables(t, testRAM, testTablesAt, la57)
		pt.mapPage(0x400000, 0x5000, LevelPT, 0)
		pt.mapPage(0x600000, 0x200000, LevelPD, 0)
		pt.mapPage(0x800000, 0x7000, LevelPT, 0)
		// Clear P, set PROTNONE: the first two as NUMA balancing does;
		// the third as a swap entry (no PROTNONE).
		for _, c := range []struct {
			va      VAddr
			l       Level
			protnon bool
		}{{0x400000, LevelPT, true}, {0x600000, LevelPD, true}, {0x800000, LevelPT, false}} {
			tab := pt.tableFor(c.va, c.l)
			i := c.l.index(uint64(c.va))
			e := PTE(binary.LittleEndian.Uint64(pt.ram[uint64(tab)+8*i:])) &^ PTEPresent
			// Linux stores the frame of an entry without P inverted.
			e ^= pteAddrMask &^ PTE(c.l.PageSize()-1)
			if c.protnon {
				e |= PTEGlobal
			}
			pt.set(tab, i, e)
		}
		user := pt.translator()
		user.ProtNone = true
		pa, err := user.Translate(0x400123)
		require.NoError(t, err)
		assert.Equal(t, PAddr(0x5123), pa)
		pa, err = user.Translate(0x612345)
		require.NoError(t, err)
		assert.Equal(t, PAddr(0x212345), pa)
		_, err = user.Translate(0x800000)
		assert.ErrorIs(t, err, ErrNotPresent, "a swap entry")
		_, err = pt.translator().Translate(0x400123)
		assert.ErrorIs(t, err, ErrNotPresent, "the kernel's view")
		// Walk sees the same pages.
		var got []VAddrRange
		require.NoError(t, user.Walk(0x400000, 0xa00000, func(va VAddr, pa PAddr, size uint64) bool {
			got = append(got, VAddrRange{va, va + VAddr(size)})
			if va == 0x400000 {
				assert.Equal(t, PAddr(0x5000), pa)
			}
			if va == 0x600000 {
				assert.Equal(t, PAddr(0x200000), pa)
			}
			return true
		}))
		assert.Equal(t, []VAddrRange{{0x400000, 0x401000}, {0x600000, 0x800000}}, got)
	}
}

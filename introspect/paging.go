package introspect

import (
	"encoding/binary"
	"fmt"
)

// DefaultWalkLimit is the number of paging-structure entries
// [Translator.Walk] reads before it gives up, when [Translator.WalkLimit] is
// zero. Guest page tables are untrusted: a strict 4- or 5-level walk cannot
// loop, but entries that all point at one table make a 512-ary tree of
// 512^4 entries out of 4 KiB. 1<<26 entries is about 128K page tables,
// enough for 256 GiB mapped with 4 KiB pages, and takes well under a second.
const DefaultWalkLimit = 1 << 26

// Translator translates guest-virtual addresses through the guest's own
// x86-64 page tables, read from guest-physical memory (SDM Vol. 3A 4.5).
//
// It follows the hardware walk and nothing else: no TLB, no Linux
// conventions such as PROT_NONE pages (present bit clear, _PAGE_PROTNONE
// set), which it reports as not present. Page tables are untrusted guest
// memory: every table address is checked to lie inside guest RAM, and a bad
// entry gives an error, never a panic.
//
// A Translator is not modified by its methods and is safe for concurrent
// use if its fields are not changed.
type Translator struct {
	// Mem is guest-physical memory holding the page tables.
	Mem *PhysMem
	// Root is the physical address of the top-level table, the PML4 table
	// or, with LA57, the PML5 table: CR3 bits 12..51 (see [RootFromCR3]).
	// Bits 0..11 are ignored.
	Root PAddr
	// LA57 selects 5-level paging (CR4.LA57, [CR4LA57]).
	LA57 bool
	// WalkLimit bounds the entries one Walk call reads; zero or less
	// means [DefaultWalkLimit].
	WalkLimit int
	// ProtNone reads a process's page tables as Linux does
	// (pte_present, pmd_present): a leaf entry without the present bit
	// but with _PAGE_PROTNONE (bit 8, the global bit of a present entry)
	// maps a page that is in memory: PROT_NONE, or marked by NUMA
	// balancing to sample the next access. Swap entries never have the
	// bit. Such an entry's frame number is stored inverted (the L1TF
	// mitigation, arch/x86/include/asm/pgtable-invert.h: every non-zero
	// entry without the present bit), and is read back inverted. Only for
	// user address spaces: Translate sees it in TLB terms otherwise.
	ProtNone bool
}

// TranslateError reports why a virtual address has no translation.
type TranslateError struct {
	Addr  VAddr // the address being translated
	Level Level // level of the entry that ended the walk; 0 if none was read
	Table PAddr // physical address of the table holding that entry
	Entry PTE   // the entry, if it was read
	Err   error // [ErrNotPresent], [ErrReservedBit], [ErrNonCanonical], or a *[ReadError]
}

func (e *TranslateError) Error() string {
	if e.Level == 0 {
		return fmt.Sprintf("translate %v: %v", e.Addr, e.Err)
	}
	return fmt.Sprintf("translate %v: %v %v in table %v: %v", e.Addr, e.Level, e.Entry, e.Table, e.Err)
}

func (e *TranslateError) Unwrap() error { return e.Err }

func (t *Translator) top() Level {
	if t.LA57 {
		return LevelPML5
	}
	return LevelPML4
}

// vaBits returns the linear-address width: 48 bits, or 57 with LA57.
func (t *Translator) vaBits() uint {
	return t.top().Shift() + ptIndexBits
}

// Canonical reports whether va is sign-extended from bit 47 (bit 56 with
// LA57). The CPU raises #GP on any other address (SDM Vol. 1 3.3.7.1).
func (t *Translator) Canonical(va VAddr) bool {
	s := 64 - t.vaBits()
	return VAddr(int64(va)<<s>>s) == va
}

// entry reads the entry for va in the level-l table at table.
func (t *Translator) entry(table PAddr, l Level, va VAddr) (PTE, error) {
	pa := table + PAddr(l.index(uint64(va))*pteSize)
	b, ok := t.Mem.Slice(pa, pteSize)
	if !ok {
		return 0, &ReadError{Addr: pa, Op: "read page table", Err: ErrNotMapped}
	}
	return PTE(binary.LittleEndian.Uint64(b)), nil
}

// Translate returns the guest-physical address va maps to. Failure is a
// [*TranslateError] wrapping [ErrNonCanonical], [ErrNotPresent],
// [ErrReservedBit], or a [*ReadError] (wrapping [ErrNotMapped]) if a table
// lies outside guest RAM. The returned address itself is not checked: it may
// be MMIO or outside RAM, which a later read reports.
func (t *Translator) Translate(va VAddr) (PAddr, error) {
	pa, _, err := t.translate(va)
	return pa, err
}

// translate returns the physical address of va and the size of the page
// that maps it.
func (t *Translator) translate(va VAddr) (PAddr, uint64, error) {
	if !t.Canonical(va) {
		return 0, 0, &TranslateError{Addr: va, Err: ErrNonCanonical}
	}
	table := RootFromCR3(uint64(t.Root))
	for l := t.top(); l >= LevelPT; l-- {
		e, err := t.entry(table, l, va)
		if err != nil {
			return 0, 0, &TranslateError{Addr: va, Level: l, Table: table, Err: err}
		}
		if !e.Present() {
			if !t.protNone(e, l) {
				return 0, 0, &TranslateError{Addr: va, Level: l, Table: table, Entry: e, Err: ErrNotPresent}
			}
			e = uninvert(e, l)
		}
		if e.Reserved(l) {
			return 0, 0, &TranslateError{Addr: va, Level: l, Table: table, Entry: e, Err: ErrReservedBit}
		}
		if e.Leaf(l) {
			size := l.PageSize()
			return e.PageAddress(l) + PAddr(uint64(va)&(size-1)), size, nil
		}
		table = e.Address()
	}
	panic("unreachable: a PTE is always a leaf")
}

// protNone reports whether a non-present entry maps a PROT_NONE page (see
// [Translator.ProtNone]): a PTE, or a PMD mapping a huge page.
func (t *Translator) protNone(e PTE, l Level) bool {
	return t.ProtNone && e&PTEGlobal != 0 && (l == LevelPT || (l == LevelPD && e.Large()))
}

// uninvert returns a PROT_NONE leaf entry at level l with its frame
// number as Linux reads it (pte_pfn, pmd_pfn): the bits of the page's
// address, and only those, are stored inverted.
func uninvert(e PTE, l Level) PTE {
	return e ^ (pteAddrMask &^ PTE(l.PageSize()-1))
}

// ReadVirt copies guest-virtual memory starting at va into p, translating
// each page it crosses. It returns the number of bytes copied; if that is
// less than len(p), the error is a [*TranslateError] or wraps a
// [*ReadError] for the physical page that could not be read.
func (t *Translator) ReadVirt(p []byte, va VAddr) (int, error) {
	n := 0
	for n < len(p) {
		cur, ok := va.AddLength(uint64(n))
		if !ok {
			return n, &TranslateError{Addr: cur, Err: ErrNonCanonical}
		}
		pa, size, err := t.translate(cur)
		if err != nil {
			return n, err
		}
		chunk := min(size-uint64(cur)&(size-1), uint64(len(p)-n))
		m, err := t.Mem.readAt(p[n:n+int(chunk)], pa, "read")
		n += m
		if err != nil {
			return n, fmt.Errorf("read guest-virtual %v: %w", cur, err)
		}
	}
	return n, nil
}

// Uint64Virt reads the little-endian 64-bit value at va.
func (t *Translator) Uint64Virt(va VAddr) (uint64, error) {
	if va.PageOffset() <= PageSize-8 {
		pa, _, err := t.translate(va)
		if err != nil {
			return 0, err
		}
		v, err := t.Mem.Uint64(pa)
		if err != nil {
			return 0, fmt.Errorf("read guest-virtual %v: %w", va, err)
		}
		return v, nil
	}
	var buf [8]byte
	if _, err := t.ReadVirt(buf[:], va); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(buf[:]), nil
}

// Walk calls fn for the mapped parts of [start, end), in ascending order.
// Each call covers a range [va, va+size) mapped to [pa, pa+size); adjacent
// pages that are contiguous in both spaces are merged into one call, and
// ranges are clipped to [start, end). Walk stops when fn returns false.
//
// Walk reads only the entries the range needs, so a non-present PML4E skips
// 512 GiB in one read. Entries the processor would fault on (not present,
// reserved bits set) and entries whose table lies outside guest RAM count as
// unmapped. The non-canonical hole between the lower and upper halves is
// skipped. Because the range is half-open, the last page of the address
// space cannot be visited; Linux never maps it.
//
// Walk reads at most [Translator.WalkLimit] entries; beyond that it stops
// and returns an error wrapping [ErrWalkLimit], having already reported the
// ranges it found.
func (t *Translator) Walk(start, end VAddr, fn func(va VAddr, pa PAddr, size uint64) bool) error {
	if start >= end {
		return nil
	}
	w := walker{t: t, fn: fn, limit: t.WalkLimit}
	if w.limit <= 0 {
		w.limit = DefaultWalkLimit
	}
	half := VAddr(1) << (t.vaBits() - 1)
	lowEnd, highStart := half, -half // [0, lowEnd) and [highStart, 2^64)
	root := RootFromCR3(uint64(t.Root))
	ok := true
	if start < lowEnd {
		ok = w.table(root, t.top(), start, min(end, lowEnd))
	}
	if ok && end > highStart {
		w.table(root, t.top(), max(start, highStart), end)
	}
	w.flush()
	if w.err != nil {
		return fmt.Errorf("walk %v: %w", VAddrRange{start, end}, w.err)
	}
	return nil
}

// walker is the state of one Walk call.
type walker struct {
	t       *Translator
	fn      func(VAddr, PAddr, uint64) bool
	limit   int
	reads   int
	err     error
	stopped bool // fn returned false

	// The pending range, reported when the next one does not extend it.
	pending bool
	va      VAddr
	pa      PAddr
	size    uint64
}

// table visits [lo, hi) in the level-l table at tab, where [lo, hi) lies
// within the span of that table. It returns false to stop the walk.
func (w *walker) table(tab PAddr, l Level, lo, hi VAddr) bool {
	// Table addresses are page-aligned (bits 12..51), so a table lies
	// inside one mapping or outside RAM altogether.
	entries, ok := w.t.Mem.Slice(tab, PageSize)
	if !ok {
		// Unmapped, like a non-present entry; counted as one read.
		return w.count(lo)
	}
	span := l.PageSize()
	for va := lo; va < hi; {
		next := va&^VAddr(span-1) + VAddr(span) // wraps to 0 past the top
		segEnd := hi
		if next > va && next < hi {
			segEnd = next
		}
		if !w.count(va) {
			return false
		}
		e := PTE(binary.LittleEndian.Uint64(entries[l.index(uint64(va))*pteSize:]))
		present := e.Present()
		if !present && w.t.protNone(e, l) {
			e, present = uninvert(e, l), true
		}
		if present && !e.Reserved(l) {
			if e.Leaf(l) {
				pa := e.PageAddress(l) + PAddr(uint64(va)&(span-1))
				if !w.emit(va, pa, uint64(segEnd-va)) {
					return false
				}
			} else if !w.table(e.Address(), l-1, va, segEnd) {
				return false
			}
		}
		va = segEnd
	}
	return true
}

// count accounts for reading one entry, for the entry at va. It returns
// false, with w.err set, once the walk has read more than its limit.
func (w *walker) count(va VAddr) bool {
	if w.reads++; w.reads > w.limit {
		w.err = fmt.Errorf("%d entries read, at %v: %w", w.limit, va, ErrWalkLimit)
		return false
	}
	return true
}

// emit records a mapped range, merging it with the pending one if
// contiguous, else reporting the pending one first.
func (w *walker) emit(va VAddr, pa PAddr, size uint64) bool {
	if w.pending && w.va+VAddr(w.size) == va && w.pa+PAddr(w.size) == pa {
		w.size += size
		return true
	}
	if w.pending && !w.fn(w.va, w.pa, w.size) {
		w.stopped = true
		return false
	}
	w.pending, w.va, w.pa, w.size = true, va, pa, size
	return true
}

// flush reports the pending range.
func (w *walker) flush() {
	if w.pending && !w.stopped {
		w.pending = false
		w.stopped = !w.fn(w.va, w.pa, w.size)
	}
}

// The kernel image region of x86-64 Linux, Documentation/arch/x86/x86_64/mm.rst:
// __START_KERNEL_map plus KERNEL_IMAGE_SIZE, which is 1 GiB with
// CONFIG_RANDOMIZE_BASE (512 MiB without, followed by modules).
const (
	KernelMapStart VAddr = 0xffffffff80000000
	KernelMapEnd   VAddr = 0xffffffffc0000000
)

// kernelAlign is the alignment of _text: CONFIG_PHYSICAL_ALIGN must be a
// multiple of 2 MiB on x86-64 (arch/x86/Kconfig), and KASLR picks both the
// physical and the virtual offset in multiples of it
// (arch/x86/boot/compressed/kaslr.c).
const kernelAlign = 2 << 20

// FindKernelText returns the virtual and physical address of the guest
// kernel's _text, from which the caller derives the KASLR slides (virtual:
// va minus the profile's _text; physical: pa minus the link-time physical
// load address).
//
// It relies on how Linux builds its high kernel mapping. head_64.S maps
// KERNEL_IMAGE_SIZE of level2_kernel_pgt with 2 MiB pages at
// __START_KERNEL_map, and early boot (arch/x86/mm/init_64.c,
// cleanup_highmap) clears every PMD below _text and above _brk_end rounded
// up to 2 MiB. So the first mapped address in [KernelMapStart, KernelMapEnd)
// is _text, aligned to 2 MiB in both spaces; FindKernelText walks the region
// and takes exactly that. A first mapping that is not so aligned, or none at
// all, gives an error wrapping [ErrNoKernelText].
//
// tr must use the kernel's page tables. Under page-table isolation the user
// PGD maps only the entry trampoline of the kernel image, which is 2 MiB
// aligned too; FindKernelText cannot tell it from _text (see [RootFromCR3]).
func FindKernelText(tr *Translator) (VAddr, PAddr, error) {
	var (
		va    VAddr
		pa    PAddr
		found bool
	)
	err := tr.Walk(KernelMapStart, KernelMapEnd, func(v VAddr, p PAddr, _ uint64) bool {
		va, pa, found = v, p, true
		return false
	})
	if err != nil {
		return 0, 0, fmt.Errorf("find kernel text: %w", err)
	}
	if !found {
		return 0, 0, fmt.Errorf("find kernel text in %v: %w",
			VAddrRange{KernelMapStart, KernelMapEnd}, ErrNoKernelText)
	}
	if va%kernelAlign != 0 || pa%kernelAlign != 0 {
		return 0, 0, fmt.Errorf("find kernel text: first mapping %v -> %v not 2 MiB aligned: %w",
			va, pa, ErrNoKernelText)
	}
	return va, pa, nil
}

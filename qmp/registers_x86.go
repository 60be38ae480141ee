package qmp

// Control register and EFER bits, from the Intel SDM Vol. 3A section 2.5
// "Control Registers" and section 2.2.1 "Extended Feature Enable Register".
// The file has no build constraint: these describe the guest, not the host.
const (
	CR0PE = 1 << 0  // protected mode
	CR0WP = 1 << 16 // supervisor writes honour read-only pages
	CR0PG = 1 << 31 // paging

	CR4PSE  = 1 << 4  // 4 MiB pages in 32-bit paging
	CR4PAE  = 1 << 5  // physical address extension
	CR4PGE  = 1 << 7  // global pages
	CR4LA57 = 1 << 12 // 5-level paging (57-bit linear addresses)

	EFERSCE = 1 << 0  // SYSCALL
	EFERLME = 1 << 8  // long mode enable
	EFERLMA = 1 << 10 // long mode active
	EFERNXE = 1 << 11 // execute-disable bit in page tables
)

// Paging reports whether the vCPU has paging on (CR0.PG).
func (r Registers) Paging() bool { return r.CR0&CR0PG != 0 }

// LongMode reports whether the vCPU is in IA-32e mode (EFER.LMA).
func (r Registers) LongMode() bool { return r.EFER&EFERLMA != 0 }

// LA57 reports whether 5-level paging is on (CR4.LA57).
func (r Registers) LA57() bool { return r.CR4&CR4LA57 != 0 }

// PagingLevels returns the number of page-table levels the vCPU walks: 0
// with paging off, 2 for 32-bit paging, 3 for PAE, 4 or 5 in long mode
// (SDM Vol. 3A section 4.1.1, table 4-1).
func (r Registers) PagingLevels() int {
	switch {
	case !r.Paging():
		return 0
	case r.LongMode() && r.LA57():
		return 5
	case r.LongMode():
		return 4
	case r.CR4&CR4PAE != 0:
		return 3
	}
	return 2
}

package introspect

import (
	"fmt"
	"strings"
)

// This file holds the x86-64 page-table formats, from the Intel SDM Vol. 3A
// chapter 4.5 "4-Level Paging and 5-Level Paging", tables 4-15 to 4-20. KVM
// guests have the host's architecture, but the formats are data, not host
// code, so the file carries no build constraint: kvmckpt can inspect an
// x86-64 guest image on any host.

// PTE is an x86-64 paging-structure entry at any level.
type PTE uint64

// Bits of a paging-structure entry.
const (
	PTEPresent  PTE = 1 << 0  // P: the entry maps something
	PTERW       PTE = 1 << 1  // R/W: writes allowed
	PTEUser     PTE = 1 << 2  // U/S: user-mode accesses allowed
	PTEPWT      PTE = 1 << 3  // page-level write-through
	PTEPCD      PTE = 1 << 4  // page-level cache disable
	PTEAccessed PTE = 1 << 5  // A: set by the CPU on use
	PTEDirty    PTE = 1 << 6  // D: set by the CPU on write (leaf entries)
	PTEPS       PTE = 1 << 7  // PS: maps a 2 MiB/1 GiB page (PDE/PDPTE); PAT in a 4 KiB PTE
	PTEGlobal   PTE = 1 << 8  // G: survives CR3 reloads (leaf entries)
	PTEPATLarge PTE = 1 << 12 // PAT bit of a 2 MiB or 1 GiB page
	PTENX       PTE = 1 << 63 // XD: instruction fetches not allowed (EFER.NXE=1)
)

// maxPhysAddrBits is the MAXPHYADDR the walker assumes: the architectural
// maximum. A guest's real MAXPHYADDR (CPUID 0x80000008) is usually smaller,
// and the bits between it and 51 are reserved, but any address they produce
// lies outside guest RAM and fails the bounds check instead.
const maxPhysAddrBits = 52

// pteAddrMask selects bits 12..51, the frame address of a table or 4 KiB page.
const pteAddrMask PTE = (1<<maxPhysAddrBits - 1) &^ PageMask

// Present reports whether the P bit is set. A non-present entry's other bits
// belong to the OS (Linux keeps swap entries there, with the PFN inverted as
// an L1TF mitigation, arch/x86/include/asm/pgtable-invert.h), so nothing
// else in it is meaningful to the walker.
func (e PTE) Present() bool { return e&PTEPresent != 0 }

// Large reports whether the PS bit is set. It means "maps a large page" only
// in a PDE or PDPTE; see [PTE.Leaf].
func (e PTE) Large() bool { return e&PTEPS != 0 }

// Writable reports whether the R/W bit is set.
func (e PTE) Writable() bool { return e&PTERW != 0 }

// User reports whether the U/S bit is set.
func (e PTE) User() bool { return e&PTEUser != 0 }

// NX reports whether the execute-disable bit is set.
func (e PTE) NX() bool { return e&PTENX != 0 }

// Address returns bits 12..51: the next table's address, or the frame of a
// 4 KiB page.
func (e PTE) Address() PAddr { return PAddr(e & pteAddrMask) }

// PageAddress returns the frame address of the page e maps as a leaf at
// level l, aligned to l's page size: bits 21..51 of a 2 MiB PDE, 30..51 of a
// 1 GiB PDPTE. Bit 12 of a large-page entry is PAT, not address.
func (e PTE) PageAddress(l Level) PAddr {
	return PAddr(e&pteAddrMask) &^ PAddr(l.PageSize()-1)
}

// Leaf reports whether e, at level l, maps a page rather than pointing at a
// table. It does not look at the present bit.
func (e PTE) Leaf(l Level) bool {
	return l == LevelPT || ((l == LevelPD || l == LevelPDPT) && e.Large())
}

// Reserved reports whether e, present at level l, has a bit set that makes
// the processor raise a reserved-bit page fault (SDM Vol. 3A 4.5.4): PS in a
// PML4E or PML5E, or an address bit below the page size in a large-page
// entry (bits 13..20 of a 2 MiB PDE, 13..29 of a 1 GiB PDPTE).
// It assumes EFER.NXE=1, which Linux sets on every CPU that has NX.
func (e PTE) Reserved(l Level) bool {
	switch l {
	case LevelPML4, LevelPML5:
		return e.Large()
	case LevelPD, LevelPDPT:
		if !e.Large() {
			return false
		}
		low := PTE(l.PageSize()-1) &^ (PTEPATLarge | PageMask)
		return e&low != 0
	}
	return false
}

// String formats e as its hex value followed by its set flags.
func (e PTE) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%#x", uint64(e))
	flags := []struct {
		bit  PTE
		name string
	}{
		{PTEPresent, "P"}, {PTERW, "RW"}, {PTEUser, "U"}, {PTEPWT, "PWT"},
		{PTEPCD, "PCD"}, {PTEAccessed, "A"}, {PTEDirty, "D"}, {PTEPS, "PS"},
		{PTEGlobal, "G"}, {PTENX, "NX"},
	}
	sep := "["
	for _, f := range flags {
		if e&f.bit != 0 {
			b.WriteString(sep)
			b.WriteString(f.name)
			sep = " "
		}
	}
	if sep != "[" {
		b.WriteString("]")
	}
	return b.String()
}

// Level is a paging-structure level, numbered as in the SDM: 1 for the page
// table whose entries map 4 KiB pages, up to 5 for the PML5 table.
type Level int

// Paging-structure levels.
const (
	LevelPT   Level = 1 // page table; entries map 4 KiB
	LevelPD   Level = 2 // page directory; entries map 2 MiB or point to a PT
	LevelPDPT Level = 3 // page-directory-pointer table; 1 GiB or a PD
	LevelPML4 Level = 4 // PML4 table; each entry spans 512 GiB
	LevelPML5 Level = 5 // PML5 table (LA57); each entry spans 256 TiB
)

// Entries per paging structure and the index width.
const (
	ptEntries   = 512
	ptIndexBits = 9
	pteSize     = 8
)

// Shift returns log2 of the span of one entry at level l.
func (l Level) Shift() uint { return PageShift + ptIndexBits*uint(l-1) }

// PageSize returns the span of one entry at level l: 4 KiB at LevelPT,
// 2 MiB at LevelPD, 1 GiB at LevelPDPT.
func (l Level) PageSize() uint64 { return 1 << l.Shift() }

// index returns the entry index of va at level l.
func (l Level) index(va uint64) uint64 { return (va >> l.Shift()) & (ptEntries - 1) }

// String returns the SDM's name for an entry at level l.
func (l Level) String() string {
	switch l {
	case LevelPT:
		return "PTE"
	case LevelPD:
		return "PDE"
	case LevelPDPT:
		return "PDPTE"
	case LevelPML4:
		return "PML4E"
	case LevelPML5:
		return "PML5E"
	}
	return fmt.Sprintf("level %d", int(l))
}

// Control-register bits the caller needs to set up a [Translator].
const (
	// CR4LA57 is CR4 bit 12: 5-level paging (57-bit linear addresses).
	CR4LA57 = 1 << 12
	// CR4PCIDE is CR4 bit 17: CR3 bits 0..11 hold a PCID, not flags.
	CR4PCIDE = 1 << 17
)

// RootFromCR3 returns the physical address of the top-level paging
// structure named by cr3: bits 12..51. Bits 0..11 are PWT/PCD or a PCID,
// and bit 63 is the no-flush hint of a CR3 load with PCIDs; none is part of
// the address (SDM Vol. 3A 4.5.2, table 4-12 and 4-13).
//
// With page-table isolation (CONFIG_MITIGATION_PAGE_TABLE_ISOLATION) a vCPU
// stopped in user mode has CR3 pointing at the user half of Linux's 8 KiB
// PGD pair, bit 12 set, which maps almost none of the kernel
// (arch/x86/mm/pti.c). RootFromCR3 keeps bit 12, since without PTI it is an
// ordinary address bit; prefer a CR3 sampled at CPL 0.
func RootFromCR3(cr3 uint64) PAddr { return PAddr(PTE(cr3) & pteAddrMask) }

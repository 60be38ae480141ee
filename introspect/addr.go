package introspect

import "fmt"

// Page geometry of the x86-64 guest. The guest's base page is 4 KiB
// regardless of how the host backs it.
const (
	PageShift = 12
	PageSize  = 1 << PageShift
	PageMask  = PageSize - 1
)

// PAddr is a guest-physical address: an offset into the guest's RAM as the
// guest CPU sees it after paging, before the host translates it into the
// backing file. It is a distinct type from [VAddr] so that the compiler
// catches a virtual address handed to [PhysMem].
type PAddr uint64

// PageOffset returns the offset of a into its page.
func (a PAddr) PageOffset() uint64 { return uint64(a) & PageMask }

// IsPageAligned reports whether a is the first byte of a page.
func (a PAddr) IsPageAligned() bool { return a.PageOffset() == 0 }

// RoundDown returns a rounded down to a page boundary.
func (a PAddr) RoundDown() PAddr { return a &^ PageMask }

// RoundUp returns a rounded up to a page boundary. ok is false if the result
// does not fit in 64 bits.
func (a PAddr) RoundUp() (PAddr, bool) {
	r := (a + PageMask).RoundDown()
	return r, r >= a
}

// AddLength returns a+n. ok is false if the sum overflows.
func (a PAddr) AddLength(n uint64) (PAddr, bool) {
	end := a + PAddr(n)
	return end, end >= a
}

// ToRange returns [a, a+n). ok is false if a+n overflows.
func (a PAddr) ToRange(n uint64) (PAddrRange, bool) {
	end, ok := a.AddLength(n)
	return PAddrRange{a, end}, ok
}

// String formats a as %#x.
func (a PAddr) String() string { return fmt.Sprintf("%#x", uint64(a)) }

// PAddrRange is the half-open guest-physical range [Start, End).
type PAddrRange struct {
	Start PAddr
	End   PAddr
}

// Length returns End-Start. It is zero for an empty or inverted range.
func (r PAddrRange) Length() uint64 {
	if r.End <= r.Start {
		return 0
	}
	return uint64(r.End - r.Start)
}

// Contains reports whether a is in r.
func (r PAddrRange) Contains(a PAddr) bool { return r.Start <= a && a < r.End }

// Overlaps reports whether r and o share at least one address.
func (r PAddrRange) Overlaps(o PAddrRange) bool {
	return r.Start < o.End && o.Start < r.End && r.Start < r.End && o.Start < o.End
}

// String formats r as [%#x, %#x).
func (r PAddrRange) String() string {
	return fmt.Sprintf("[%#x, %#x)", uint64(r.Start), uint64(r.End))
}

// VAddr is a guest-virtual (linear) address, translated by the guest's page
// tables; see [Translator].
type VAddr uint64

// PageOffset returns the offset of v into its 4 KiB page.
func (v VAddr) PageOffset() uint64 { return uint64(v) & PageMask }

// IsPageAligned reports whether v is the first byte of a 4 KiB page.
func (v VAddr) IsPageAligned() bool { return v.PageOffset() == 0 }

// RoundDown returns v rounded down to a 4 KiB page boundary.
func (v VAddr) RoundDown() VAddr { return v &^ PageMask }

// RoundUp returns v rounded up to a 4 KiB page boundary. ok is false if the
// result does not fit in 64 bits.
func (v VAddr) RoundUp() (VAddr, bool) {
	r := (v + PageMask).RoundDown()
	return r, r >= v
}

// AddLength returns v+n. ok is false if the sum overflows.
func (v VAddr) AddLength(n uint64) (VAddr, bool) {
	end := v + VAddr(n)
	return end, end >= v
}

// ToRange returns [v, v+n). ok is false if v+n overflows.
func (v VAddr) ToRange(n uint64) (VAddrRange, bool) {
	end, ok := v.AddLength(n)
	return VAddrRange{v, end}, ok
}

// String formats v as %#x.
func (v VAddr) String() string { return fmt.Sprintf("%#x", uint64(v)) }

// VAddrRange is the half-open guest-virtual range [Start, End).
type VAddrRange struct {
	Start VAddr
	End   VAddr
}

// Length returns End-Start. It is zero for an empty or inverted range.
func (r VAddrRange) Length() uint64 {
	if r.End <= r.Start {
		return 0
	}
	return uint64(r.End - r.Start)
}

// Contains reports whether v is in r.
func (r VAddrRange) Contains(v VAddr) bool { return r.Start <= v && v < r.End }

// String formats r as [%#x, %#x).
func (r VAddrRange) String() string {
	return fmt.Sprintf("[%#x, %#x)", uint64(r.Start), uint64(r.End))
}

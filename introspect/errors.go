package introspect

import "errors"

// Sentinel errors of the package. Returned errors wrap them; test with
// errors.Is.
var (
	// ErrNotMapped means a guest-physical address is not backed by any
	// [Mapping]: a hole in the guest's physical address space, MMIO, or a
	// garbage pointer read from guest memory.
	ErrNotMapped = errors.New("guest-physical address not mapped")
	// ErrBadMapping means the mapping list given to [NewPhysMem] is
	// inconsistent.
	ErrBadMapping = errors.New("invalid guest memory mapping")
	// ErrFileSize means [MapFile] was asked for a size the file cannot back.
	ErrFileSize = errors.New("mapping size does not fit the file")
	// ErrNotPresent means a page-table entry on the way to a virtual address
	// has its present bit clear.
	ErrNotPresent = errors.New("page not present")
	// ErrReservedBit means a page-table entry sets a bit the processor would
	// fault on (SDM Vol. 3A 4.5.4, reserved-bit violation).
	ErrReservedBit = errors.New("reserved bit set in page-table entry")
	// ErrNonCanonical means a virtual address is not sign-extended from the
	// top bit of the paging mode's linear address width.
	ErrNonCanonical = errors.New("non-canonical virtual address")
	// ErrWalkLimit means [Translator.Walk] read more entries than its bound.
	ErrWalkLimit = errors.New("page-table walk limit exceeded")
	// ErrNoKernelText means [FindKernelText] found no mapping in the kernel
	// image region.
	ErrNoKernelText = errors.New("kernel text mapping not found")
	// ErrKernel means the guest kernel's memory does not look like what
	// the profile describes.
	ErrKernel = errors.New("guest kernel not understood")
	// ErrProfile means a profile lacks something the walk needs, or holds
	// a value the walk cannot use.
	ErrProfile = errors.New("profile unusable")
	// ErrScanTimeout means the free-list walk ran past its time bound.
	ErrScanTimeout = errors.New("scan took too long")
)

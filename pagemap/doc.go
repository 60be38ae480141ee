// Package pagemap holds page bitmaps and the host-side view of a guest's
// RAM file: which pages are holes in the file and which read as zero.
//
// A [Bitmap] has a bit per 4 KiB page, of guest page frames ([PFN]) or of
// RAM file pages, depending on its user. kvmckpt builds one bitmap of the
// pages to save from the guest kernel's free lists (package introspect),
// then takes out what the host can tell without the guest: [Holes] asks the
// file system for unallocated ranges (lseek SEEK_DATA/SEEK_HOLE, exact on
// tmpfs and memfd), and [ZeroPages] reads the remaining candidates. Holes
// come first: on tmpfs, reading a hole through a shared mapping allocates a
// page for it (mm/shmem.c, shmem_fault).
//
// Bitmaps decoded from files are untrusted: [Bitmap.UnmarshalBinary]
// checks the page count against the data's length before allocating, and
// rejects bits past the end. Methods given an index out of range panic, as
// slice indexing does.
package pagemap

import "errors"

// Sentinel errors of the package. Returned errors wrap them; test with
// errors.Is.
var (
	// ErrBitmapEncoding is returned, wrapped, by [Bitmap.UnmarshalBinary]
	// for a malformed encoding.
	ErrBitmapEncoding = errors.New("malformed bitmap encoding")
	// ErrRAMSize means a size or bitmap length given to the host scans
	// does not fit the RAM file or its mapping.
	ErrRAMSize = errors.New("size does not fit the RAM file")
)

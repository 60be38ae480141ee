package profiles

// FormatVersion is the version of the profile JSON format this package
// writes. Readers refuse profiles with a newer version.
const FormatVersion = 1

// Profile is everything introspection needs about one kernel build, and
// nothing more. Addresses are unrelocated: as linked, before KASLR moves
// the kernel. Build one with [BuildFromImage], [BuildFromKernelMemory] or
// [FromISF], or read one with [Decode]; check one with [Profile.Validate].
// Nothing in this package modifies a Profile it has returned, so
// concurrent reads are safe.
type Profile struct {
	// Version is the profile format version, [FormatVersion].
	Version int `json:"version"`
	// Name identifies the profile in listings and caches, for example
	// "6.1.0-47-amd64-3f2a9c1d" (release plus a short banner hash).
	Name string `json:"name"`
	// Banner is the kernel's linux_banner string, without its trailing
	// newline. It is the identity a guest is matched against.
	Banner string `json:"banner"`
	// Release is the kernel release (uname -r), for example "6.1.0-47-amd64".
	Release string `json:"release"`
	// BuildID is the GNU build ID of vmlinux in hex, where known.
	BuildID string `json:"build_id,omitempty"`
	// Source says where the profile came from: "image", "guest-memory", "isf".
	Source string `json:"source"`

	// Symbols maps symbol names to unrelocated virtual addresses.
	Symbols map[string]uint64 `json:"symbols"`
	// Structs maps struct names (without the "struct " keyword) to layouts.
	Structs map[string]Struct `json:"structs"`
	// Constants holds values derived from the kernel's types and data, for
	// example "MAX_ORDER" (page orders in free_area), "MIGRATE_TYPES",
	// "MIGRATE_PCPTYPES", "NR_PCP_LISTS", "NR_FREE_PAGES" (index into
	// zone.vm_stat), "MAX_NR_ZONES", "MAX_NUMNODES", "PAGE_BUDDY_MAPCOUNT_VALUE".
	// See the package documentation for the full list and their sources.
	Constants map[string]int64 `json:"constants"`
	// Defaults lists what was assumed rather than read from the kernel:
	// constant names (for example "PAGE_BUDDY_MAPCOUNT_VALUE" when no
	// vmcoreinfo was given), or "_text" when the link-time address of
	// _text, and so the KASLR offset of every symbol, was assumed.
	Defaults []string `json:"defaults,omitempty"`
}

// Struct is the layout of one kernel struct. Fields maps member names to
// their layout: members of anonymous structs and unions appear under their
// own names at their offset in this struct, and members of named struct
// or union members as dotted paths ("lock.rlock.raw_lock"). Bitfields
// are left out.
type Struct struct {
	Size   uint64           `json:"size"`
	Fields map[string]Field `json:"fields"`
}

// Field is one member of a struct. Offset is in bytes from the start of
// the struct. Size is the size in bytes of the member's type; for arrays
// it is the whole array and Count is the element count.
type Field struct {
	Offset uint64 `json:"offset"`
	Size   uint64 `json:"size"`
	Count  uint64 `json:"count,omitempty"`
}

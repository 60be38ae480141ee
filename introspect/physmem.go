package introspect

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"slices"
)

// ReadError reports a failed access to guest-physical memory at Addr.
type ReadError struct {
	Addr PAddr  // first byte that could not be read
	Op   string // what was being read, e.g. "read", "read uint64"
	Err  error  // the cause, usually [ErrNotMapped]
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("%s guest-physical %v: %v", e.Op, e.Addr, e.Err)
}

func (e *ReadError) Unwrap() error { return e.Err }

// Mapping places Size bytes of a backend, starting at Offset, at
// guest-physical address GPA. This mirrors a KVM memory slot: QEMU's
// RAMBlock for "pc.ram" is typically split into a part below the 32-bit PCI
// hole and a part above 4 GiB, both backed by the same file.
type Mapping struct {
	GPA     PAddr  // first guest-physical address
	Backend int    // index into the backends given to NewPhysMem
	Offset  uint64 // byte offset into the backend
	Size    uint64 // length in bytes
}

// Range returns the guest-physical range m covers.
func (m Mapping) Range() PAddrRange {
	return PAddrRange{m.GPA, m.GPA + PAddr(m.Size)}
}

func (m Mapping) String() string {
	return fmt.Sprintf("%v -> backend %d offset %#x", m.Range(), m.Backend, m.Offset)
}

// Backend is one block of guest RAM as the host holds it: a mapped file,
// another process's memory, a checkpoint. Introspection reads guest memory
// only through it, so the walks never learn where the bytes came from.
type Backend interface {
	// Size is the backend's length in bytes.
	Size() uint64
	// Bytes returns the n bytes at off, which lie within Size. The slice
	// aliases memory that stays valid and unchanged as long as the
	// backend is open (the guest is paused): do not write to it. ok is
	// false if the bytes cannot be had, for example because the source
	// could not be read.
	Bytes(off, n uint64) (b []byte, ok bool)
}

// Bytes is a [Backend] held in memory: normally a read-only mmap of a RAM
// file from [MapFile].
type Bytes []byte

// Size returns len(b).
func (b Bytes) Size() uint64 { return uint64(len(b)) }

// Bytes returns b[off:off+n].
func (b Bytes) Bytes(off, n uint64) ([]byte, bool) {
	if off > uint64(len(b)) || n > uint64(len(b))-off {
		return nil, false
	}
	return b[off : off+n : off+n], true
}

// PhysMem is the guest's physical memory, backed by [Backend]s.
//
// The contents are untrusted: PhysMem only bounds-checks, it never
// interprets. A PhysMem is immutable after [NewPhysMem] and safe for
// concurrent use, provided nothing writes the backends concurrently (the
// guest is paused while kvmckpt reads it).
type PhysMem struct {
	backends []Backend
	maps     []Mapping // sorted by GPA, non-overlapping, page-aligned
}

// NewPhysMem returns guest-physical memory laid out by maps over backends
// held in memory: [NewPhysMemOf] with each slice a [Bytes].
func NewPhysMem(backends [][]byte, maps []Mapping) (*PhysMem, error) {
	bs := make([]Backend, len(backends))
	for i, b := range backends {
		bs[i] = Bytes(b)
	}
	return NewPhysMemOf(bs, maps)
}

// NewPhysMemOf returns guest-physical memory laid out by maps over
// backends. Every mapping must be non-empty, page-aligned (GPA, Offset and
// Size, as KVM requires of memory slots), lie within its backend, and not
// overlap another mapping in guest-physical space. Mappings may appear in
// any order; two mappings may share backend bytes. An inconsistent list
// gives an error wrapping [ErrBadMapping].
func NewPhysMemOf(backends []Backend, maps []Mapping) (*PhysMem, error) {
	ms := slices.Clone(maps)
	for _, m := range ms {
		if m.Backend < 0 || m.Backend >= len(backends) {
			return nil, fmt.Errorf("mapping %v: no backend %d: %w", m.GPA, m.Backend, ErrBadMapping)
		}
		if m.Size == 0 {
			return nil, fmt.Errorf("mapping %v: empty: %w", m.GPA, ErrBadMapping)
		}
		if !m.GPA.IsPageAligned() || m.Offset&PageMask != 0 || m.Size&PageMask != 0 {
			return nil, fmt.Errorf("mapping %v: not page-aligned: %w", m, ErrBadMapping)
		}
		if _, ok := m.GPA.AddLength(m.Size); !ok {
			return nil, fmt.Errorf("mapping %v size %#x: overflows: %w", m.GPA, m.Size, ErrBadMapping)
		}
		blen := backends[m.Backend].Size()
		if m.Offset > blen || m.Size > blen-m.Offset {
			return nil, fmt.Errorf("mapping %v size %#x: beyond backend %d of %#x bytes: %w",
				m, m.Size, m.Backend, blen, ErrBadMapping)
		}
	}
	slices.SortFunc(ms, func(a, b Mapping) int { return cmp.Compare(a.GPA, b.GPA) })
	for i := 1; i < len(ms); i++ {
		if ms[i-1].Range().Overlaps(ms[i].Range()) {
			return nil, fmt.Errorf("mappings %v and %v overlap: %w",
				ms[i-1].Range(), ms[i].Range(), ErrBadMapping)
		}
	}
	return &PhysMem{backends: slices.Clone(backends), maps: ms}, nil
}

// Mappings returns the mappings sorted by guest-physical address.
func (m *PhysMem) Mappings() []Mapping { return slices.Clone(m.maps) }

// Size returns the total number of mapped bytes.
func (m *PhysMem) Size() uint64 {
	var n uint64
	for _, mp := range m.maps {
		n += mp.Size
	}
	return n
}

// find returns the index of the mapping containing pa, or -1.
func (m *PhysMem) find(pa PAddr) int {
	// A typical guest has one or two slots (below and above the PCI
	// hole): scan them. Binary search keeps many slots (memory hotplug,
	// NUMA) cheap.
	if len(m.maps) <= 4 {
		for i := range m.maps {
			if mp := &m.maps[i]; pa >= mp.GPA && uint64(pa-mp.GPA) < mp.Size {
				return i
			}
		}
		return -1
	}
	// First mapping that ends after pa.
	i, _ := slices.BinarySearchFunc(m.maps, pa, func(mp Mapping, pa PAddr) int {
		if mp.GPA+PAddr(mp.Size) <= pa {
			return -1
		}
		return 1
	})
	if i < len(m.maps) && m.maps[i].GPA <= pa {
		return i
	}
	return -1
}

// host returns the backend bytes from pa on, at most n of them and at
// most to the end of pa's mapping.
func (m *PhysMem) host(pa PAddr, n uint64) ([]byte, bool) {
	i := m.find(pa)
	if i < 0 {
		return nil, false
	}
	mp := m.maps[i]
	in := uint64(pa - mp.GPA)
	return m.backends[mp.Backend].Bytes(mp.Offset+in, min(n, mp.Size-in))
}

// Contains reports whether pa is backed by guest RAM.
func (m *PhysMem) Contains(pa PAddr) bool { return m.find(pa) >= 0 }

// Slice returns the n bytes at pa without copying, if they lie inside one
// mapping. The slice aliases guest memory: do not write to it (the backend
// is normally a read-only mmap) and do not keep it past the backend's
// lifetime.
func (m *PhysMem) Slice(pa PAddr, n uint64) ([]byte, bool) {
	b, ok := m.host(pa, n)
	if !ok || n > uint64(len(b)) {
		return nil, false
	}
	return b, true
}

// ReadAt copies guest-physical memory starting at pa into p, crossing
// mapping boundaries where mappings are contiguous. It returns the number of
// bytes copied; if that is less than len(p), the error is a [*ReadError]
// naming the first unmapped address and wrapping [ErrNotMapped].
func (m *PhysMem) ReadAt(p []byte, pa PAddr) (int, error) {
	return m.readAt(p, pa, "read")
}

func (m *PhysMem) readAt(p []byte, pa PAddr, op string) (int, error) {
	if _, ok := pa.AddLength(uint64(len(p))); !ok {
		return 0, &ReadError{Addr: pa, Op: op, Err: ErrNotMapped}
	}
	n := 0
	for n < len(p) {
		cur := pa + PAddr(n)
		b, ok := m.host(cur, uint64(len(p)-n))
		if !ok {
			return n, &ReadError{Addr: cur, Op: op, Err: ErrNotMapped}
		}
		n += copy(p[n:], b)
	}
	return n, nil
}

// Uint64 reads the little-endian 64-bit value at pa.
func (m *PhysMem) Uint64(pa PAddr) (uint64, error) {
	if b, ok := m.Slice(pa, 8); ok {
		return binary.LittleEndian.Uint64(b), nil
	}
	var buf [8]byte
	if _, err := m.readAt(buf[:], pa, "read uint64"); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(buf[:]), nil
}

// Uint32 reads the little-endian 32-bit value at pa.
func (m *PhysMem) Uint32(pa PAddr) (uint32, error) {
	if b, ok := m.Slice(pa, 4); ok {
		return binary.LittleEndian.Uint32(b), nil
	}
	var buf [4]byte
	if _, err := m.readAt(buf[:], pa, "read uint32"); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(buf[:]), nil
}

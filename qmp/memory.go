package qmp

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Backend is a host memory backend object (-object memory-backend-*).
type Backend struct {
	// ID is the object's id, for example "mem0".
	ID string
	// Type is the QOM type: "memory-backend-file", "memory-backend-ram",
	// "memory-backend-memfd", ...
	Type string
	// Size is the backend's size in bytes.
	Size uint64
	// MemPath is the file or directory given with mem-path; empty for
	// types without one.
	MemPath string
	// Share reports share=on: the guest's writes go to MemPath (or the
	// memfd) rather than to private copies. x-ignore-shared migration
	// leaves only shared backends out of the stream.
	Share bool
	// FileOffset is where the backend starts in MemPath (the "offset"
	// property, which QEMU 7.2 does not have; zero then).
	FileOffset uint64

	// region is the name of the backend's memory region in the memory
	// map: the id, or the canonical path /objects/ID under machine types
	// that set x-use-canonical-path-for-ramblock-id (backends/hostmem.c,
	// host_memory_backend_get_name).
	region string
}

// RAMBackends lists the host memory backends (query-memdev), with their
// types, paths and offsets from QOM.
func (s *Session) RAMBackends(ctx context.Context) ([]Backend, error) {
	var memdevs []struct {
		ID    string `json:"id"`
		Size  uint64 `json:"size"`
		Share bool   `json:"share"`
	}
	if err := s.Run(ctx, "query-memdev", nil, &memdevs); err != nil {
		return nil, fmt.Errorf("query memory backends: %w", err)
	}
	objects, err := s.qomList(ctx, "/objects")
	if err != nil {
		return nil, err
	}
	backends := make([]Backend, 0, len(memdevs))
	for _, m := range memdevs {
		if m.ID == "" {
			return nil, fmt.Errorf("query memory backends: %w: backend without an id", ErrMalformed)
		}
		typ, ok := objects[m.ID]
		if !ok {
			return nil, fmt.Errorf("query memory backends: %w: backend %q not under /objects", ErrMalformed, m.ID)
		}
		b := Backend{
			ID:     m.ID,
			Type:   strings.TrimSuffix(strings.TrimPrefix(typ, "child<"), ">"),
			Size:   m.Size,
			Share:  m.Share,
			region: m.ID,
		}
		path := "/objects/" + m.ID
		props, err := s.qomList(ctx, path)
		if err != nil {
			return nil, err
		}
		if _, ok := props["mem-path"]; ok {
			if err := s.qomGet(ctx, path, "mem-path", &b.MemPath); err != nil {
				return nil, err
			}
		}
		if _, ok := props["offset"]; ok {
			if err := s.qomGet(ctx, path, "offset", &b.FileOffset); err != nil {
				return nil, err
			}
		}
		if _, ok := props["x-use-canonical-path-for-ramblock-id"]; ok {
			var canonical bool
			if err := s.qomGet(ctx, path, "x-use-canonical-path-for-ramblock-id", &canonical); err != nil {
				return nil, err
			}
			if canonical {
				b.region = path
			}
		}
		backends = append(backends, b)
	}
	return backends, nil
}

// RegionName is the name of the backend's memory region and RAM block:
// its id, or /objects/ID (see the region field).
func (b Backend) RegionName() string { return b.region }

// qomList returns the properties of the QOM object at path, name to type.
func (s *Session) qomList(ctx context.Context, path string) (map[string]string, error) {
	var props []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := s.Run(ctx, "qom-list", map[string]string{"path": path}, &props); err != nil {
		return nil, fmt.Errorf("list properties of %s: %w", path, err)
	}
	m := make(map[string]string, len(props))
	for _, p := range props {
		m[p.Name] = p.Type
	}
	return m, nil
}

// qomGet decodes property prop of the QOM object at path into v.
func (s *Session) qomGet(ctx context.Context, path, prop string, v any) error {
	if err := s.Run(ctx, "qom-get", map[string]string{"path": path, "property": prop}, v); err != nil {
		return fmt.Errorf("get %s of %s: %w", prop, path, err)
	}
	return nil
}

// Mapping is a range of guest-physical memory backed by a RAM backend:
// guest-physical [GPA, GPA+Size) is bytes [Offset, Offset+Size) of the
// backend's file.
type Mapping struct {
	// Backend is the [Backend.ID].
	Backend string
	// GPA is the first guest-physical address of the range.
	GPA uint64
	// Offset is the range's offset in the backend's file (MemPath); it
	// includes [Backend.FileOffset].
	Offset uint64
	// Size is the length of the range in bytes.
	Size uint64
}

// End returns the first guest-physical address after m.
func (m Mapping) End() uint64 { return m.GPA + m.Size }

// FileOffset returns the offset in the backend's file of guest-physical
// address gpa; ok is false if m does not contain gpa.
func (m Mapping) FileOffset(gpa uint64) (off uint64, ok bool) {
	if gpa < m.GPA || gpa-m.GPA >= m.Size {
		return 0, false
	}
	return m.Offset + (gpa - m.GPA), true
}

// String formats m as "mem0 [0x100000, 0x80000000) @0x100000".
func (m Mapping) String() string {
	return fmt.Sprintf("%s [%#x, %#x) @%#x", m.Backend, m.GPA, m.End(), m.Offset)
}

// systemAddressSpace is the name of the address space the guest's CPUs
// and DMA see (address_space_memory, softmmu/physmem.c).
const systemAddressSpace = "memory"

// RAMLayout returns where the RAM backends appear in the guest's physical
// address space, sorted by address, adjacent pieces merged. It is read from
// QEMU's own flattened memory map ("info mtree -f"), so it reflects the
// machine's actual layout (the split below and above 4 GiB, holes for
// legacy VGA and firmware, ranges the chipset has made read-only) rather
// than a rule reimplemented here. It returns an error wrapping [ErrNoRAM] if
// no backend is mapped.
func (s *Session) RAMLayout(ctx context.Context) ([]Mapping, error) {
	backends, err := s.RAMBackends(ctx)
	if err != nil {
		return nil, err
	}
	out, err := s.HumanMonitorCommand(ctx, "info mtree -f", -1)
	if err != nil {
		return nil, fmt.Errorf("read memory map: %w", err)
	}
	views, err := parseMtree(strings.NewReader(out))
	if err != nil {
		return nil, err
	}
	return layout(views, backends)
}

// layout picks the system address space's flat view out of views and
// returns the ranges of it that map a backend.
func layout(views []flatView, backends []Backend) ([]Mapping, error) {
	var view *flatView
	for i := range views {
		if views[i].hasSpace(systemAddressSpace) {
			view = &views[i]
			break
		}
	}
	if view == nil {
		return nil, fmt.Errorf("read memory map: %w: no flat view of address space %q", ErrMalformed, systemAddressSpace)
	}
	var maps []Mapping
	for _, r := range view.ranges {
		if !isRAMKind(r.kind) {
			continue
		}
		i := slices.IndexFunc(backends, func(b Backend) bool { return r.regionIs(b.region) })
		if i < 0 {
			continue
		}
		b := &backends[i]
		if r.last == math.MaxUint64 {
			return nil, fmt.Errorf("read memory map: %w: backend %s mapped at the top of the address space", ErrMalformed, b.ID)
		}
		size := r.last - r.start + 1
		if r.offset > b.Size || size > b.Size-r.offset {
			return nil, fmt.Errorf("read memory map: %w: range [%#x, %#x] at offset %#x exceeds backend %s of %#x bytes",
				ErrMalformed, r.start, r.last, r.offset, b.ID, b.Size)
		}
		off := b.FileOffset + r.offset
		if off < b.FileOffset {
			return nil, fmt.Errorf("read memory map: %w: file offset of backend %s overflows", ErrMalformed, b.ID)
		}
		maps = append(maps, Mapping{Backend: b.ID, GPA: r.start, Offset: off, Size: size})
	}
	if len(maps) == 0 {
		return nil, fmt.Errorf("read memory map: %w in address space %q", ErrNoRAM, systemAddressSpace)
	}
	slices.SortFunc(maps, func(a, b Mapping) int { return cmp.Compare(a.GPA, b.GPA) })
	merged := maps[:1]
	for _, m := range maps[1:] {
		p := &merged[len(merged)-1]
		if m.GPA < p.End() {
			return nil, fmt.Errorf("read memory map: %w: %v overlaps %v", ErrMalformed, m, *p)
		}
		if m.Backend == p.Backend && m.GPA == p.End() && m.Offset == p.Offset+p.Size {
			p.Size += m.Size
			continue
		}
		merged = append(merged, m)
	}
	return merged, nil
}

// isRAMKind reports whether a range of this type can be a RAM backend: RAM,
// or RAM the chipset maps read-only (PAM registers over the BIOS area),
// volatile or not.
func isRAMKind(kind string) bool {
	switch strings.TrimPrefix(kind, "nv-") {
	case "ram", "rom":
		return true
	}
	return false
}

// HostAddress returns the address in QEMU's own memory of guest-physical
// address gpa, from HMP gpa2hva (monitor/hmp-cmds-target.c): "Host
// virtual address for 0x1000 (pc.ram) is 0x7f1c2fe01000". The address is
// QEMU's to interpret: check it against /proc/PID/maps before use.
func (s *Session) HostAddress(ctx context.Context, gpa uint64) (uint64, error) {
	out, err := s.HumanMonitorCommand(ctx, fmt.Sprintf("gpa2hva %#x", gpa), -1)
	if err != nil {
		return 0, fmt.Errorf("host address of guest-physical %#x: %w", gpa, err)
	}
	return parseGPA2HVA(out, gpa)
}

func parseGPA2HVA(out string, gpa uint64) (uint64, error) {
	line := strings.TrimSpace(out)
	rest, ok := strings.CutPrefix(line, "Host virtual address for ")
	if ok {
		var addr string
		if i := strings.LastIndex(rest, " is "); i >= 0 {
			addr = rest[i+len(" is "):]
		}
		if v, err := strconv.ParseUint(strings.TrimPrefix(addr, "0x"), 16, 64); err == nil && strings.HasPrefix(addr, "0x") {
			return v, nil
		}
	}
	if len(line) > 200 {
		line = line[:200] + "..."
	}
	return 0, fmt.Errorf("host address of guest-physical %#x: %w: QEMU answered %q", gpa, ErrMalformed, line)
}

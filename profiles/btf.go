package profiles

import (
	"bytes"
	"fmt"

	"github.com/cilium/ebpf/btf"
)

const (
	// maxBTFSize bounds the BTF blob; Debian 6.1 vmlinux BTF is ~5 MiB.
	maxBTFSize = 64 << 20
	// maxFieldDepth bounds how deep named struct members are expanded
	// into dotted paths ("lock.rlock.raw_lock").
	maxFieldDepth = 4
	// maxFields bounds the fields recorded per struct.
	maxFields = 1024
)

// loadBTF parses a raw BTF blob (the .BTF section, or
// [__start_BTF, __stop_BTF) in memory).
func loadBTF(blob []byte) (*btf.Spec, error) {
	if len(blob) == 0 {
		return nil, ErrNoBTF
	}
	if len(blob) > maxBTFSize {
		return nil, fmt.Errorf("BTF of %d bytes: %w", len(blob), ErrTooLarge)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(blob))
	if err != nil {
		return nil, &FormatError{What: "BTF", Off: -1, Msg: "parse", Err: err}
	}
	return spec, nil
}

// btfTypes answers the type questions a profile asks, from BTF.
type btfTypes struct{ spec *btf.Spec }

// composite finds a struct or union called name, through typedefs, and
// skips forward declarations.
func (b btfTypes) composite(name string) (btf.Type, bool) {
	types, err := b.spec.AnyTypesByName(name)
	if err != nil {
		return nil, false
	}
	var found btf.Type
	for _, t := range types {
		switch u := btf.UnderlyingType(t).(type) {
		case *btf.Struct:
			if u.Size > 0 || len(u.Members) > 0 {
				if _, direct := t.(*btf.Struct); direct || found == nil {
					found = u
				}
			}
		case *btf.Union:
			if found == nil {
				found = u
			}
		}
	}
	return found, found != nil
}

// structLayout flattens a struct's members: members of anonymous structs
// and unions appear at their absolute offsets under their own names, and
// members of named struct or union members appear as "member.sub".
// Bitfields are left out.
func structLayout(t btf.Type, maxDepth int) (Struct, error) {
	var members []btf.Member
	var size uint32
	switch c := t.(type) {
	case *btf.Struct:
		members, size = c.Members, c.Size
	case *btf.Union:
		members, size = c.Members, c.Size
	default:
		return Struct{}, fmt.Errorf("%s is not a struct or union", t)
	}
	s := Struct{Size: uint64(size), Fields: make(map[string]Field)}
	flattenMembers(members, 0, "", 0, maxDepth, s.Fields)
	return s, nil
}

func flattenMembers(members []btf.Member, base btf.Bits, prefix string, depth, maxDepth int, out map[string]Field) {
	for _, m := range members {
		if len(out) >= maxFields {
			return
		}
		off := base + m.Offset
		if m.BitfieldSize != 0 || off%8 != 0 {
			continue
		}
		under := btf.UnderlyingType(m.Type)
		var inner []btf.Member
		switch c := under.(type) {
		case *btf.Struct:
			inner = c.Members
		case *btf.Union:
			inner = c.Members
		}
		if m.Name == "" {
			flattenMembers(inner, off, prefix, depth, maxDepth, out)
			continue
		}
		name := prefix + m.Name
		if _, dup := out[name]; dup {
			continue
		}
		size, err := btf.Sizeof(m.Type)
		if err != nil || size < 0 {
			size = 0
		}
		f := Field{Offset: uint64(off / 8), Size: uint64(size)}
		if a, ok := under.(*btf.Array); ok {
			f.Count = uint64(a.Nelems)
		}
		out[name] = f
		if inner != nil && depth < maxDepth {
			flattenMembers(inner, off, name+".", depth+1, maxDepth, out)
		}
	}
}

// enumValue returns the value of enumerator value in enum enumName.
func (b btfTypes) enumValue(enumName, value string) (int64, bool) {
	types, err := b.spec.AnyTypesByName(enumName)
	if err != nil {
		return 0, false
	}
	for _, t := range types {
		e, ok := btf.UnderlyingType(t).(*btf.Enum)
		if !ok {
			continue
		}
		for _, v := range e.Values {
			if v.Name == value {
				if e.Signed {
					return int64(v.Value), true
				}
				return int64(v.Value), v.Value <= 1<<63-1
			}
		}
	}
	return 0, false
}

// arrayVarLen returns the element count of a global array variable. pahole
// encodes only per-CPU variables by default, so this often fails.
func (b btfTypes) arrayVarLen(name string) (int64, bool) {
	types, err := b.spec.AnyTypesByName(name)
	if err != nil {
		return 0, false
	}
	for _, t := range types {
		if v, ok := t.(*btf.Var); ok {
			if a, ok := btf.UnderlyingType(v.Type).(*btf.Array); ok && a.Nelems > 0 {
				return int64(a.Nelems), true
			}
		}
	}
	return 0, false
}

// typeSize returns the size of a named type (through typedefs).
func (b btfTypes) typeSize(name string) (int64, bool) {
	types, err := b.spec.AnyTypesByName(name)
	if err != nil || len(types) == 0 {
		return 0, false
	}
	n, err := btf.Sizeof(types[0])
	return int64(n), err == nil
}

// structsFromBTF extracts every struct in [wantStructs].
func structsFromBTF(b btfTypes) (map[string]Struct, error) {
	out := make(map[string]Struct, len(wantStructs))
	for _, w := range wantStructs {
		t, ok := b.composite(w.name)
		for _, a := range w.aliases {
			if ok {
				break
			}
			t, ok = b.composite(a)
		}
		if !ok {
			if w.optional {
				continue
			}
			return nil, &MissingError{Kind: "struct", Name: w.name}
		}
		s, err := structLayout(t, w.maxDepth())
		if err != nil {
			return nil, fmt.Errorf("lay out struct %s: %w", w.name, err)
		}
		out[w.name] = s
	}
	return out, checkRequiredFields(out)
}

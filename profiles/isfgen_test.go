package profiles

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/stretchr/testify/require"
)

// isfFromBTF writes a Volatility 3 ISF with dwarf2json's conventions
// (typedefs resolved, anonymous members named "unnamed_field_<offset>"
// with "anonymous": true, anonymous types named "unnamed_<id>", pointer
// targets referenced by name only) from BTF instead of DWARF, for the
// structs a profile needs and everything they contain by value.
func isfFromBTF(tb testing.TB, spec *btf.Spec, syms map[string]uint64, banner string, numNodes int) []byte {
	tb.Helper()
	g := &isfGen{
		names:     map[btf.Type]string{},
		baseTypes: map[string]any{"pointer": map[string]any{"size": 8, "signed": false, "kind": "int", "endian": "little"}},
		userTypes: map[string]any{},
		enums:     map[string]any{},
	}
	bt := btfTypes{spec: spec}
	for _, w := range wantStructs {
		if t, ok := bt.composite(w.name); ok {
			g.ref(t, true)
		}
	}
	for _, e := range []string{"migratetype", "zone_stat_item", "zone_type", "node_states"} {
		types, err := spec.AnyTypesByName(e)
		require.NoError(tb, err)
		g.ref(types[0], true)
	}
	for len(g.queue) > 0 {
		t := g.queue[0]
		g.queue = g.queue[1:]
		g.define(t)
	}
	symbols := map[string]any{}
	for name, a := range syms {
		symbols[name] = map[string]any{"address": a}
	}
	symbols["linux_banner"] = map[string]any{"address": syms["linux_banner"], "constant_data": []byte(banner + "\n\x00")}
	symbols["node_data"] = map[string]any{"address": syms["node_data"], "type": map[string]any{
		"kind": "array", "count": numNodes, "subtype": map[string]any{"kind": "pointer", "subtype": map[string]any{"kind": "struct", "name": "pglist_data"}}}}
	b, err := json.Marshal(map[string]any{
		"metadata":   map[string]any{"format": "6.2.0", "producer": map[string]string{"name": "kvmckpt-test-isfFromBTF", "version": "0"}},
		"base_types": g.baseTypes,
		"user_types": g.userTypes,
		"enums":      g.enums,
		"symbols":    symbols,
	})
	require.NoError(tb, err)
	return b
}

type isfGen struct {
	names                       map[btf.Type]string
	queue                       []btf.Type
	baseTypes, userTypes, enums map[string]any
}

func (g *isfGen) name(t btf.Type, named string) string {
	if n, ok := g.names[t]; ok {
		return n
	}
	n := named
	if n == "" {
		n = fmt.Sprintf("unnamed_%08x", len(g.names))
	}
	g.names[t] = n
	return n
}

// ref returns the ISF type reference for t; byValue queues the definition.
func (g *isfGen) ref(t btf.Type, byValue bool) map[string]any {
	switch v := t.(type) {
	case *btf.Typedef:
		return g.ref(v.Type, byValue)
	case *btf.Const:
		return g.ref(v.Type, byValue)
	case *btf.Volatile:
		return g.ref(v.Type, byValue)
	case *btf.Restrict:
		return g.ref(v.Type, byValue)
	case *btf.TypeTag:
		return g.ref(v.Type, byValue)
	case *btf.Int:
		kind := "int"
		if v.Encoding == btf.Bool {
			kind = "bool"
		}
		g.baseTypes[v.Name] = map[string]any{"size": v.Size, "signed": v.Encoding == btf.Signed, "kind": kind, "endian": "little"}
		return map[string]any{"kind": "base", "name": v.Name}
	case *btf.Pointer:
		return map[string]any{"kind": "pointer", "subtype": g.ref(v.Target, false)}
	case *btf.Array:
		return map[string]any{"kind": "array", "count": v.Nelems, "subtype": g.ref(v.Type, byValue)}
	case *btf.Struct, *btf.Union:
		kind := "struct"
		if _, ok := v.(*btf.Union); ok {
			kind = "union"
		}
		_, seen := g.names[t]
		n := g.name(t, t.TypeName())
		if byValue && !seen {
			g.queue = append(g.queue, t)
		} else if byValue {
			if _, defined := g.userTypes[n]; !defined && !g.queued(t) {
				g.queue = append(g.queue, t)
			}
		}
		return map[string]any{"kind": kind, "name": n}
	case *btf.Fwd:
		return map[string]any{"kind": "struct", "name": v.Name}
	case *btf.Enum:
		n := g.name(t, v.Name)
		consts := map[string]int64{}
		for _, e := range v.Values {
			consts[e.Name] = int64(e.Value)
		}
		g.enums[n] = map[string]any{"size": v.Size, "base": "unsigned int", "constants": consts}
		return map[string]any{"kind": "enum", "name": n}
	case *btf.FuncProto, *btf.Func:
		return map[string]any{"kind": "function"}
	}
	g.baseTypes["void"] = map[string]any{"size": 0, "signed": false, "kind": "void", "endian": "little"}
	return map[string]any{"kind": "base", "name": "void"}
}

func (g *isfGen) queued(t btf.Type) bool {
	for _, q := range g.queue {
		if q == t {
			return true
		}
	}
	return false
}

func (g *isfGen) define(t btf.Type) {
	var members []btf.Member
	var size uint32
	kind := "struct"
	switch v := t.(type) {
	case *btf.Struct:
		members, size = v.Members, v.Size
	case *btf.Union:
		members, size, kind = v.Members, v.Size, "union"
	}
	n := g.names[t]
	if _, done := g.userTypes[n]; done {
		return
	}
	fields := map[string]any{}
	g.userTypes[n] = map[string]any{"size": size, "kind": kind, "fields": fields}
	for _, m := range members {
		f := map[string]any{"offset": m.Offset / 8}
		name := m.Name
		if name == "" {
			// dwarf2json names them by offset, which collides for several
			// anonymous members of one union; keep them apart.
			name = fmt.Sprintf("unnamed_field_%x", m.Offset/8)
			for i := 1; fields[name] != nil; i++ {
				name = fmt.Sprintf("unnamed_field_%x_%d", m.Offset/8, i)
			}
			f["anonymous"] = true
		}
		if m.BitfieldSize != 0 {
			f["type"] = map[string]any{"kind": "bitfield", "bit_position": m.Offset % 8, "bit_length": m.BitfieldSize, "type": g.ref(m.Type, true)}
		} else {
			f["type"] = g.ref(m.Type, true)
		}
		fields[name] = f
	}
}

package profiles

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

// MaxISFSize bounds the (decompressed) ISF JSON [FromISF] accepts. A
// dwarf2json ISF of a distribution kernel is 30-60 MiB.
const MaxISFSize = 256 << 20

// maxISFDepth bounds recursion through nested ISF types; it also stops
// cycles a malformed file could contain.
const maxISFDepth = 16

// isfDoc is the part of a Volatility 3 ISF ("intermediate symbol format",
// as volatilityfoundation/dwarf2json writes it) a profile needs.
type isfDoc struct {
	BaseTypes map[string]isfBaseType `json:"base_types"`
	UserTypes map[string]isfUserType `json:"user_types"`
	Enums     map[string]isfEnum     `json:"enums"`
	Symbols   map[string]isfSymbol   `json:"symbols"`
}

type isfBaseType struct {
	Size int64 `json:"size"`
}

type isfUserType struct {
	Size   int64               `json:"size"`
	Kind   string              `json:"kind"`
	Fields map[string]isfField `json:"fields"`
}

type isfField struct {
	Offset    int64   `json:"offset"`
	Type      isfType `json:"type"`
	Anonymous bool    `json:"anonymous"`
}

// isfType is a type reference: {"kind": "base"|"pointer"|"struct"|
// "union"|"class"|"enum"|"array"|"bitfield"|"function", "name": ...,
// "count": N, "subtype": {...}}.
type isfType struct {
	Kind    string   `json:"kind"`
	Name    string   `json:"name"`
	Count   int64    `json:"count"`
	Subtype *isfType `json:"subtype"`
}

type isfEnum struct {
	Size      int64            `json:"size"`
	Constants map[string]int64 `json:"constants"`
}

type isfSymbol struct {
	Address      uint64   `json:"address"`
	Type         *isfType `json:"type"`
	ConstantData []byte   `json:"constant_data"` // base64 in JSON
}

// kallsymsTableNames are the kallsyms tables a profile records when a
// symbol source knows them.
var kallsymsTableNames = []string{
	"kallsyms_offsets", "kallsyms_addresses", "kallsyms_relative_base",
	"kallsyms_num_syms", "kallsyms_names", "kallsyms_markers",
	"kallsyms_seqs_of_names", "kallsyms_token_table", "kallsyms_token_index",
}

// isfFallbacks give typedef'd anonymous structs, which dwarf2json names
// "unnamed_<hash>", through a field known to have that type.
var isfFallbacks = map[string][2]string{
	"atomic_t":      {"page", "_refcount"},
	"atomic_long_t": {"zone", "managed_pages"},
}

// FromISF builds a profile from a Volatility 3 ISF JSON file, such as
// dwarf2json produces from a vmlinux with debug info and its System.map.
// The input may be plain JSON or xz- or gzip-compressed (.json.xz is how
// Volatility distributes them). The banner comes from the linux_banner
// symbol's constant_data. The profile has the same shape as one built
// from an image, except that it has no build ID and
// PAGE_BUDDY_MAPCOUNT_VALUE is a default.
//
// The ISF is untrusted: sizes and nesting are bounded and errors wrap
// [ErrMalformed], [ErrTooLarge], [ErrMissingSymbol] or [ErrMissingType].
func FromISF(r io.Reader) (*Profile, error) {
	return fromISF(r, MaxISFSize)
}

func fromISF(r io.Reader, limit int) (*Profile, error) {
	b, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return nil, fmt.Errorf("read ISF: %w", err)
	}
	if len(b) > limit {
		return nil, fmt.Errorf("read ISF: more than %d bytes: %w", limit, ErrTooLarge)
	}
	switch {
	case bytes.HasPrefix(b, xzMagic):
		if b, err = decodeXZ(b, 0, limit); err != nil {
			return nil, fmt.Errorf("decompress ISF: %w", err)
		}
	case bytes.HasPrefix(b, []byte{0x1f, 0x8b}):
		if b, err = decodeGzip(b, 0, limit); err != nil {
			return nil, fmt.Errorf("decompress ISF: %w", err)
		}
	}
	var d isfDoc
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, jsonErr("ISF", b, err)
	}
	p, err := profileFromISF(&d)
	if err != nil {
		return nil, fmt.Errorf("build profile from ISF: %w", err)
	}
	return p, nil
}

func profileFromISF(d *isfDoc) (*Profile, error) {
	p := &Profile{
		Version:   FormatVersion,
		Source:    "isf",
		Symbols:   make(map[string]uint64),
		Structs:   make(map[string]Struct),
		Constants: make(map[string]int64),
	}
	banner, ok := d.Symbols["linux_banner"]
	if !ok {
		return nil, &MissingError{Kind: "symbol", Name: "linux_banner"}
	}
	if len(banner.ConstantData) == 0 {
		return nil, formatErr("ISF", -1, "linux_banner has no constant_data")
	}
	s := string(banner.ConstantData)
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	if err := p.setIdentity(s); err != nil {
		return nil, err
	}
	for _, list := range [][]string{requiredSymbols, optionalSymbols, kallsymsTableNames} {
		for _, name := range list {
			if sym, ok := d.Symbols[name]; ok && sym.Address != 0 {
				p.Symbols[name] = sym.Address
			}
		}
	}
	for _, name := range requiredSymbols {
		if _, ok := p.Symbols[name]; !ok {
			return nil, &MissingError{Kind: "symbol", Name: name}
		}
	}

	for _, w := range wantStructs {
		st, ok := d.layout(w.name, w.maxDepth())
		for _, a := range w.aliases {
			if ok {
				break
			}
			st, ok = d.layout(a, w.maxDepth())
		}
		if !ok {
			if fb, has := isfFallbacks[w.name]; has {
				if owner, ok2 := d.UserTypes[fb[0]]; ok2 {
					if f, ok3 := owner.Fields[fb[1]]; ok3 && isComposite(f.Type.Kind) {
						st, ok = d.layout(f.Type.Name, w.maxDepth())
					}
				}
			}
		}
		if !ok {
			if w.optional {
				continue
			}
			return nil, &MissingError{Kind: "struct", Name: w.name}
		}
		p.Structs[w.name] = st
	}

	if err := checkRequiredFields(p.Structs); err != nil {
		return nil, err
	}
	enums := func(enum, value string) (int64, bool) {
		v, ok := d.Enums[enum].Constants[value]
		return v, ok
	}
	var nodes nodeCount
	if nd, ok := d.Symbols["node_data"]; ok && nd.Type != nil && nd.Type.Kind == "array" && nd.Type.Count > 0 {
		nodes = nodeCount{n: nd.Type.Count, exact: true}
	}
	if err := deriveConstants(p, enums, nodes, nil); err != nil {
		return nil, fmt.Errorf("derive constants: %w", err)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

func isComposite(kind string) bool { return kind == "struct" || kind == "union" || kind == "class" }

// layout flattens an ISF user type like [structLayout] does BTF: members
// of anonymous members (dwarf2json names them "unnamed_field_<offset>")
// at their absolute offsets, named composite members as "member.sub".
func (d *isfDoc) layout(name string, maxDepth int) (Struct, bool) {
	ut, ok := d.UserTypes[name]
	if !ok || ut.Size <= 0 || ut.Size > maxStructSize {
		return Struct{}, false
	}
	s := Struct{Size: uint64(ut.Size), Fields: make(map[string]Field)}
	d.flatten(ut, 0, "", 0, 0, maxDepth, s.Fields)
	return s, true
}

func (d *isfDoc) flatten(ut isfUserType, base int64, prefix string, depth, nest, maxDepth int, out map[string]Field) {
	if nest > maxISFDepth {
		return
	}
	// Deterministic order: by offset, then name (JSON objects have none).
	names := make([]string, 0, len(ut.Fields))
	for n := range ut.Fields {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int {
		if oa, ob := ut.Fields[a].Offset, ut.Fields[b].Offset; oa != ob {
			return int(min(max(oa-ob, -1), 1))
		}
		return strings.Compare(a, b)
	})
	for _, n := range names {
		if len(out) >= maxFields {
			return
		}
		f := ut.Fields[n]
		if f.Type.Kind == "bitfield" || f.Offset < 0 || f.Offset > maxStructSize {
			continue
		}
		off := base + f.Offset
		inner, composite := ut, false
		if isComposite(f.Type.Kind) {
			inner, composite = d.UserTypes[f.Type.Name]
		}
		if f.Anonymous || strings.HasPrefix(n, "unnamed_field_") {
			if composite {
				d.flatten(inner, off, prefix, depth, nest+1, maxDepth, out)
			}
			continue
		}
		name := prefix + n
		if _, dup := out[name]; dup {
			continue
		}
		size, ok := d.sizeOf(&f.Type, 0)
		if !ok {
			size = 0
		}
		fl := Field{Offset: uint64(off), Size: uint64(size)}
		if f.Type.Kind == "array" && f.Type.Count > 0 {
			fl.Count = uint64(f.Type.Count)
		}
		out[name] = fl
		if composite && depth < maxDepth {
			d.flatten(inner, off, name+".", depth+1, nest+1, maxDepth, out)
		}
	}
}

// sizeOf returns the size of an ISF type reference.
func (d *isfDoc) sizeOf(t *isfType, depth int) (int64, bool) {
	if t == nil || depth > maxISFDepth {
		return 0, false
	}
	switch t.Kind {
	case "base":
		b, ok := d.BaseTypes[t.Name]
		return b.Size, ok && b.Size >= 0
	case "pointer":
		if b, ok := d.BaseTypes["pointer"]; ok && b.Size > 0 {
			return b.Size, true
		}
		return 8, true
	case "struct", "union", "class":
		u, ok := d.UserTypes[t.Name]
		return u.Size, ok && u.Size >= 0
	case "enum":
		e, ok := d.Enums[t.Name]
		return e.Size, ok && e.Size >= 0
	case "array":
		if t.Count < 0 {
			return 0, false
		}
		n, ok := d.sizeOf(t.Subtype, depth+1)
		if !ok || (n > 0 && t.Count > math.MaxInt32/n) {
			return 0, false
		}
		return n * t.Count, true
	}
	return 0, false
}

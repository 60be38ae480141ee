package qmp

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// This file parses the output of the human monitor's "info mtree -f": the
// flattened memory map of every address space, as printed by
// mtree_print_flatview in softmmu/memory.c (QEMU 3.1 and later; 7.2 is the
// reference). Address spaces that render to the same flat view are printed
// once, under a list of their names:
//
//	FlatView #2
//	 AS "memory", root: system
//	 AS "cpu-memory-0", root: system
//	 Root memory region: system
//	  0000000000000000-000000000009ffff (prio 0, ram): mem0
//	  00000000000c0000-00000000000c3fff (prio 0, rom): mem0 @00000000000c0000
//	  0000000000100000-000000007fffffff (prio 0, ram): mem0 @0000000000100000 KVM
//	  00000000c1062400-00000000c106241f (prio 0, i/o): vga ioports remapped
//
// A range line is START-LAST (LAST inclusive), the priority of its region,
// its type ("ram", "rom" for any read-only range, "i/o", "romd", "ramd",
// with an "nv-" prefix for non-volatile ranges), the region's name, the
// offset of the range into that region when it is not zero, and, under
// accelerators that track memory (KVM), the accelerator's name once for
// every address space of the view it maps the range in. Region names may
// contain spaces.

// mtreeMaxLine bounds one line of the memory map. Real lines are under 200
// bytes; region names are short.
const mtreeMaxLine = 4096

// flatView is one flat view of the memory map.
type flatView struct {
	// spaces are the names of the address spaces that render to it.
	spaces []string
	// root is the name of its root memory region, "(none)" for none.
	root   string
	ranges []flatRange
}

// flatRange is one range of a flat view: guest addresses [start, last]
// map region name at offset into it.
type flatRange struct {
	start, last uint64
	prio        int
	kind        string // "ram", "rom", "i/o", "romd", "ramd", maybe with "nv-"
	name        string // region name, possibly followed by accelerator names
	offset      uint64
}

// regionIs reports whether r belongs to the region called name, which must
// not contain spaces. The comparison ignores what follows the first space
// of r.name: an accelerator name such as " KVM" when r has no offset.
func (r flatRange) regionIs(name string) bool {
	first, _, _ := strings.Cut(r.name, " ")
	return first == name
}

// hasSpace reports whether the view renders address space name.
func (v *flatView) hasSpace(name string) bool {
	for _, s := range v.spaces {
		if s == name {
			return true
		}
	}
	return false
}

// parseMtree parses the output of "info mtree -f". Lines it does not
// recognise (such as a dispatch tree from -d) are skipped; a line that
// looks like a range but does not parse is an error wrapping
// [ErrMalformed], as is output without any flat view.
func parseMtree(r io.Reader) ([]flatView, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 512), mtreeMaxLine)
	var views []flatView
	var cur *flatView
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "":
		case strings.HasPrefix(line, "FlatView #"):
			views = append(views, flatView{})
			cur = &views[len(views)-1]
		case strings.HasPrefix(line, "address-space (flat view): "):
			// QEMU 3.0 and earlier: one flat view per address space.
			views = append(views, flatView{spaces: []string{strings.TrimPrefix(line, "address-space (flat view): ")}})
			cur = &views[len(views)-1]
		case strings.HasPrefix(line, ` AS "`):
			if cur == nil {
				return nil, fmt.Errorf("parse memory map line %d: %w: address space outside a flat view", lineNo, ErrMalformed)
			}
			name, _, ok := strings.Cut(strings.TrimPrefix(line, ` AS "`), `", root: `)
			if !ok {
				return nil, fmt.Errorf("parse memory map line %d: %w: %q", lineNo, ErrMalformed, line)
			}
			cur.spaces = append(cur.spaces, name)
		case strings.HasPrefix(line, " Root memory region: "):
			if cur == nil {
				return nil, fmt.Errorf("parse memory map line %d: %w: root region outside a flat view", lineNo, ErrMalformed)
			}
			cur.root = strings.TrimPrefix(line, " Root memory region: ")
		case looksLikeRange(trimmed):
			if cur == nil {
				return nil, fmt.Errorf("parse memory map line %d: %w: range outside a flat view", lineNo, ErrMalformed)
			}
			fr, err := parseRange(trimmed)
			if err != nil {
				return nil, fmt.Errorf("parse memory map line %d: %w", lineNo, err)
			}
			cur.ranges = append(cur.ranges, fr)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse memory map: %w: %v", ErrMalformed, err)
	}
	if len(views) == 0 {
		return nil, fmt.Errorf("parse memory map: %w: no flat view (is this \"info mtree -f\" output?)", ErrMalformed)
	}
	return views, nil
}

// looksLikeRange reports whether s starts like a range line: hex digits
// and a dash.
func looksLikeRange(s string) bool {
	i := 0
	for i < len(s) && isHex(s[i]) {
		i++
	}
	return i > 0 && i < len(s) && s[i] == '-'
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseRange parses "START-LAST (prio P, TYPE): NAME[ @OFFSET][ ...]".
func parseRange(s string) (flatRange, error) {
	bad := func(why string) (flatRange, error) {
		return flatRange{}, fmt.Errorf("%w: %s in range %q", ErrMalformed, why, s)
	}
	var fr flatRange
	span, rest, ok := strings.Cut(s, " (prio ")
	if !ok {
		return bad("no priority")
	}
	startS, lastS, ok := strings.Cut(span, "-")
	if !ok {
		return bad("no dash")
	}
	var err error
	if fr.start, err = parseHex(startS); err != nil {
		return bad("bad start address")
	}
	if fr.last, err = parseHex(lastS); err != nil {
		return bad("bad end address")
	}
	if fr.last < fr.start {
		return bad("end before start")
	}
	prioS, rest, ok := strings.Cut(rest, ", ")
	if !ok {
		return bad("no type")
	}
	prio, err := strconv.ParseInt(prioS, 10, 32)
	if err != nil {
		return bad("bad priority")
	}
	fr.prio = int(prio)
	fr.kind, rest, ok = strings.Cut(rest, "): ")
	if !ok || fr.kind == "" {
		return bad("no region name")
	}
	fr.name = rest
	// The offset is " @" and hex digits, followed by the end or a space.
	// Region names do not contain " @", but tolerate one that does by
	// taking the last occurrence that parses.
	for i := strings.LastIndex(rest, " @"); i >= 0; i = strings.LastIndex(rest[:i], " @") {
		hex, tail, _ := strings.Cut(rest[i+2:], " ")
		off, err := parseHex(hex)
		if err != nil {
			continue
		}
		fr.name, fr.offset = rest[:i], off
		if tail != "" {
			fr.name += " " + tail
		}
		break
	}
	if fr.name == "" {
		return bad("empty region name")
	}
	return fr, nil
}

// parseHex parses 1 to 16 hex digits, without prefix.
func parseHex(s string) (uint64, error) {
	if len(s) == 0 || len(s) > 16 {
		return 0, strconv.ErrSyntax
	}
	for i := 0; i < len(s); i++ {
		if !isHex(s[i]) {
			return 0, strconv.ErrSyntax
		}
	}
	return strconv.ParseUint(s, 16, 64)
}

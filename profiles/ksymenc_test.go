package profiles

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// This file encodes kallsyms tables the way scripts/kallsyms.c lays them
// out, so the decoder can be tested without a real kernel.

type testSym struct {
	name string
	typ  byte
	addr uint64
	abs  bool // per-CPU, stored as an absolute value
}

type ksymLayout int

const (
	layout61  ksymLayout = iota // offsets relbase num names markers tokens index
	layout62                    // ... markers seqs(3 bytes) tokens index
	layout64                    // num names markers tokens index offsets relbase seqs
	layoutAbs                   // addresses num names markers tokens index
)

func (l ksymLayout) String() string {
	return [...]string{"6.1", "6.2", "6.4", "absolute"}[l]
}

// imgBuilder appends data to an image mapped at base.
type imgBuilder struct {
	base uint64
	b    []byte
}

func (w *imgBuilder) pos() uint64 { return w.base + uint64(len(w.b)) }

func (w *imgBuilder) align(n int) {
	for (w.base+uint64(len(w.b)))%uint64(n) != 0 {
		w.b = append(w.b, 0)
	}
}
func (w *imgBuilder) u16(v uint16) { w.b = binary.LittleEndian.AppendUint16(w.b, v) }
func (w *imgBuilder) u32(v uint32) { w.b = binary.LittleEndian.AppendUint32(w.b, v) }
func (w *imgBuilder) u64(v uint64) { w.b = binary.LittleEndian.AppendUint64(w.b, v) }

// putAt overwrites bytes at a virtual address already in the image.
func (w *imgBuilder) putAt(addr uint64, b []byte) { copy(w.b[addr-w.base:], b) }

// testTokens is a token table: printable characters stand for
// themselves, a few codes for common pairs, the rest are unused (empty).
func testTokens() [256]string {
	var t [256]string
	for c := 0x21; c <= 0x7e; c++ {
		t[c] = string(rune(c))
	}
	for i, pair := range []string{"_s", "et", "in", "it", "er", "ta", "re", "on", "ma", "ge", "st", "de", "__", "ke", "rn", "pa"} {
		t[0x80+i] = pair
	}
	t[0xff] = "Tn" // tokens can span the type letter
	return t
}

func encodeName(tb testing.TB, toks *[256]string, s string) []byte {
	tb.Helper()
	var out []byte
	for i := 0; i < len(s); {
		best := -1
		for c := 0x80; c < 256; c++ {
			if toks[c] != "" && strings.HasPrefix(s[i:], toks[c]) && (best < 0 || len(toks[c]) > len(toks[best])) {
				best = c
			}
		}
		if best < 0 {
			require.True(tb, s[i] > 0x20 && s[i] < 0x7f, "unencodable %q", s)
			best = int(s[i])
		}
		out = append(out, byte(best))
		i += len(toks[best])
	}
	return out
}

// appendKallsyms appends kallsyms tables for syms (sorted by address) and
// returns where each table went.
func appendKallsyms(tb testing.TB, w *imgBuilder, syms []testSym, layout ksymLayout, absPercpu bool) map[string]uint64 {
	tb.Helper()
	toks := testTokens()
	at := map[string]uint64{}
	num := len(syms)
	relBase := uint64(0)
	for _, s := range syms {
		if !s.abs {
			relBase = s.addr
			break
		}
	}
	offsets := func() {
		w.align(8)
		if layout == layoutAbs {
			at["kallsyms_addresses"] = w.pos()
			for _, s := range syms {
				w.u64(s.addr)
			}
			return
		}
		at["kallsyms_offsets"] = w.pos()
		for _, s := range syms {
			switch {
			case !absPercpu:
				w.u32(uint32(s.addr - relBase))
			case s.abs:
				w.u32(uint32(s.addr))
			default:
				w.u32(uint32(int32(int64(relBase) - int64(s.addr) - 1)))
			}
		}
		w.align(8)
		at["kallsyms_relative_base"] = w.pos()
		w.u64(relBase)
	}
	seqs := func() {
		idx := make([]int, num)
		for i := range idx {
			idx[i] = i
		}
		slices.SortStableFunc(idx, func(a, b int) int { return strings.Compare(syms[a].name, syms[b].name) })
		w.align(8)
		at["kallsyms_seqs_of_names"] = w.pos()
		for _, i := range idx {
			w.b = append(w.b, byte(i>>16), byte(i>>8), byte(i))
		}
	}
	if layout != layout64 {
		offsets()
	}
	w.align(8)
	at["kallsyms_num_syms"] = w.pos()
	w.u32(uint32(num))
	w.align(8)
	at["kallsyms_names"] = w.pos()
	names := w.pos()
	var markers []uint32
	for i, s := range syms {
		if i%256 == 0 {
			markers = append(markers, uint32(w.pos()-names))
		}
		enc := encodeName(tb, &toks, string(s.typ)+s.name)
		if len(enc) > 0x7f {
			w.b = append(w.b, byte(len(enc)&0x7f|0x80), byte(len(enc)>>7))
		} else {
			w.b = append(w.b, byte(len(enc)))
		}
		w.b = append(w.b, enc...)
	}
	w.align(8)
	at["kallsyms_markers"] = w.pos()
	for _, m := range markers {
		w.u32(m)
	}
	if layout == layout62 {
		seqs()
	}
	w.align(8)
	at["kallsyms_token_table"] = w.pos()
	var index [256]uint16
	off := 0
	for i, tok := range toks {
		index[i] = uint16(off)
		w.b = append(w.b, tok...)
		w.b = append(w.b, 0)
		off += len(tok) + 1
	}
	w.align(8)
	at["kallsyms_token_index"] = w.pos()
	for _, v := range index {
		w.u16(v)
	}
	if layout == layout64 {
		offsets()
		seqs()
	}
	return at
}

// testSymbols returns n sorted symbols: a few per-CPU ones at small
// offsets, then kernel symbols from base, with one long name (a two-byte
// length since 6.1) and some aliases.
func testSymbols(base uint64, n int, absPercpu bool) []testSym {
	var syms []testSym
	if absPercpu {
		syms = append(syms,
			testSym{"fixed_percpu_data", 'A', 0, true},
			testSym{"current_task", 'A', 0x1c40, true},
			testSym{"cpu_number", 'A', 0x2a0c8, true})
	}
	syms = append(syms, testSym{"_text", 'T', base, false}, testSym{"startup_64", 'T', base, false})
	r := rand.New(rand.NewPCG(1, 2))
	a := base + 0x40
	for i := 0; len(syms) < n; i++ {
		name := "func_" + strings.Repeat("x", i%7) + "_" + string(rune('a'+i%26)) + "set_" + itoa(i)
		typ := byte("TtDdBbRrW"[i%9])
		if i == 100 {
			name = "very_long_" + strings.Repeat("name_", 40) // > 127 encoded bytes
		}
		syms = append(syms, testSym{name, typ, a, false})
		if r.IntN(10) != 0 {
			a += uint64(r.IntN(400) + 1)
		}
	}
	return syms
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

// randomBytes returns deterministic filler that is not zero.
func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32()) | 1
	}
	return b
}

package profiles

import (
	"fmt"
	"math"
	"strings"
)

// The kallsyms tables are emitted by the kernel's scripts/kallsyms.c as
// assembler data in .rodata; kernel/kallsyms.c reads them. Every table
// label is preceded by ALGN, which is ".balign 8" on 64-bit kernels, and
// padding is zero. The tables, in the order Linux 6.1 emits them:
//
//	kallsyms_offsets        s32[num]  (CONFIG_KALLSYMS_BASE_RELATIVE), or
//	kallsyms_addresses      u64[num]  (without it)
//	kallsyms_relative_base  u64       (base-relative only)
//	kallsyms_num_syms       u32
//	kallsyms_names          num entries: ULEB128 length (1 or 2 bytes,
//	                        2 since 6.1), then that many token codes
//	kallsyms_markers        u32[(num+255)/256]: offset in names of every
//	                        256th entry
//	kallsyms_token_table    256 NUL-terminated token strings
//	kallsyms_token_index    u16[256]: offset of each token in token_table
//
// Linux 6.2 and 6.3 put kallsyms_seqs_of_names (3 bytes per symbol, big
// endian) between markers and token_table. Linux 6.4 (commit "scripts/
// kallsyms: change the output order") moved offsets, relative_base and
// seqs_of_names after token_index. The decoder below finds the tables by
// their structure, so it handles all three orders:
//
//  1. token_index: 256 ascending u16 starting at 0, preceded by the token
//     strings it indexes.
//  2. markers: ascending u32 starting at 0 that end just before
//     token_table (or before seqs_of_names).
//  3. names: preceded by num_syms; decoding every entry must land on each
//     marker and end just before markers.
//  4. offsets or addresses: before num_syms or after token_index; the
//     decoded addresses must be sorted (kallsyms.c sorts by address).
//
// Names are "type letter + symbol name" after token expansion. With
// CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86_64 SMP) per-CPU symbols are stored
// as non-negative absolute values and all others as
// relative_base - 1 - offset (negative); kernel/kallsyms.c
// kallsyms_sym_address() decodes the same way.

const (
	ksymAlign      = 8       // ALGN on 64-bit
	ksymMaxSyms    = 1 << 22 // far above any real kernel (~150k for Debian)
	ksymMaxName    = 1024    // decoded "type+name"; KSYM_NAME_LEN is 512 in 6.1
	ksymMaxToken   = 256     // a token is a few characters in practice
	ksymMaxEntry   = 2 + ksymMaxName
	ksymMaxDecoded = 128 << 20 // all decoded names together
	ksymMaxTries   = 64        // token_index candidates examined
)

// KallsymsSymbol is one decoded kallsyms entry.
type KallsymsSymbol struct {
	Name string
	// Type is the nm(1) type letter: 'T' global text, 'd' local data, ...
	Type byte
	// Addr is the address as the image stores it: relocated for a running
	// kernel, link-time for a vmlinux file.
	Addr uint64
	// Absolute is set for per-CPU symbols stored as absolute values
	// (CONFIG_KALLSYMS_ABSOLUTE_PERCPU): Addr is then an offset into the
	// per-CPU area and KASLR does not move it.
	Absolute bool
}

// Kallsyms is the symbol table decoded from a kernel image's kallsyms
// tables. Not safe for concurrent use (Lookup builds an index lazily).
type Kallsyms struct {
	// Symbols are in table order, sorted by address.
	Symbols []KallsymsSymbol
	// Tables maps the names of the kallsyms tables ("kallsyms_names",
	// "kallsyms_token_table", ...) to their addresses in the image.
	Tables map[string]uint64
	// BaseRelative is set for CONFIG_KALLSYMS_BASE_RELATIVE tables.
	BaseRelative bool
	// AbsolutePercpu is set for CONFIG_KALLSYMS_ABSOLUTE_PERCPU tables.
	AbsolutePercpu bool

	index map[string]int
}

// Lookup returns the symbol called name. Static symbols can share a name;
// Lookup prefers a global one (upper-case type), then the first.
func (k *Kallsyms) Lookup(name string) (KallsymsSymbol, bool) {
	if k.index == nil {
		k.index = make(map[string]int, len(k.Symbols))
		for i, s := range k.Symbols {
			j, dup := k.index[s.Name]
			if !dup || (!isUpper(k.Symbols[j].Type) && isUpper(s.Type)) {
				k.index[s.Name] = i
			}
		}
	}
	i, ok := k.index[name]
	if !ok {
		return KallsymsSymbol{}, false
	}
	return k.Symbols[i], true
}

func isUpper(c byte) bool { return c >= 'A' && c <= 'Z' }

// DecodeKallsyms finds and decodes the kallsyms tables in img, a 64-bit
// kernel image mapped at virtual address base (see [BuildFromKernelMemory]).
// It returns an error wrapping [ErrNoKallsyms] if no consistent set of
// tables is found. img is untrusted: every count and offset is checked
// before use, and work is bounded by len(img).
func DecodeKallsyms(img []byte, base uint64) (*Kallsyms, error) {
	return decodeKallsyms(kernelImage{data: img, base: base})
}

// ksymDec is one decoding attempt over an image. steps is a work budget:
// crafted input can make candidate tables plentiful, and every search
// loop spends from it, so decoding garbage stays linear in its size.
type ksymDec struct {
	kernelImage
	steps int
}

// spend takes n steps from the budget and reports whether any were left.
func (m *ksymDec) spend(n int) bool {
	m.steps -= n
	return m.steps >= 0
}

func decodeKallsyms(img kernelImage) (*Kallsyms, error) {
	m := &ksymDec{kernelImage: img, steps: 32*len(img.data) + 1<<24}
	d := m.data
	tries := 0
	var lastErr error
	for x := alignUp(m, 0); x >= 0 && x+512 <= len(d); x += ksymAlign {
		if d[x] != 0 || d[x+1] != 0 || !m.spend(8) || !plausibleTokenIndex(d, x) {
			continue
		}
		if tries++; tries > ksymMaxTries || m.steps < 0 {
			break
		}
		k, err := decodeKallsymsAt(m, x)
		if err == nil {
			return k, nil
		}
		lastErr = err
	}
	if lastErr != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoKallsyms, lastErr)
	}
	return nil, ErrNoKallsyms
}

// alignUp returns the smallest offset >= off whose virtual address is
// ksymAlign-aligned.
func alignUp(m *ksymDec, off int) int {
	r := int((m.base + uint64(off)) % ksymAlign)
	if r == 0 {
		return off
	}
	return off + ksymAlign - r
}

// alignDown returns the largest offset <= off whose virtual address is
// ksymAlign-aligned.
func alignDown(m *ksymDec, off int) int {
	return off - int((m.base+uint64(off))%ksymAlign)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// plausibleTokenIndex checks the 256 u16 at x: 0, then strictly ascending
// by at most a token's length.
func plausibleTokenIndex(d []byte, x int) bool {
	prev := 0
	for i := 1; i < 256; i++ {
		v := int(le16(d, x+2*i))
		if v <= prev || v-prev > ksymMaxToken+1 {
			return false
		}
		prev = v
	}
	return true
}

// ksymTables is what the decoder has located so far; offsets into the image.
type ksymTables struct {
	tokenIndex, tokenTable int
	tokens                 [256]string
	markers                int
	markerVals             []uint32
	seqs, seqSize          int // seqs_of_names before token_table (6.2, 6.3); -1 if none
	names, numSyms, num    int
}

func decodeKallsymsAt(m *ksymDec, x int) (*Kallsyms, error) {
	d := m.data
	t := ksymTables{tokenIndex: x, seqs: -1}
	var idx [256]int
	for i := range idx {
		idx[i] = int(le16(d, x+2*i))
	}
	if !findTokenTable(m, &t, &idx) {
		return nil, formatErr("kallsyms", int64(x), "no token table before candidate token index")
	}
	// Layout without seqs_of_names before token_table (<= 6.1, >= 6.4).
	for _, c := range markersBefore(m, t.tokenTable) {
		t.markers, t.markerVals = c.ms, c.vals
		n := len(c.vals)
		if k, ok := decodeWithMarkers(m, t, 256*(n-1)+1, 256*n); ok {
			return k, nil
		}
	}
	// Linux 6.2 and 6.3: seqs_of_names between markers and token_table.
	if k, ok := decodeWithSeqs(m, t); ok {
		return k, nil
	}
	return nil, formatErr("kallsyms", int64(x), "tables around token index are inconsistent")
}

// findTokenTable locates token_table before token_index x: ALGN-aligned,
// 256 NUL-terminated printable strings at the offsets idx gives, then
// zero padding up to x.
func findTokenTable(m *ksymDec, t *ksymTables, idx *[256]int) bool {
	d := m.data
	hi := t.tokenIndex - idx[255] - 1
	lo := max(hi-ksymMaxToken-ksymAlign, 0)
	for tt := alignDown(m, hi); tt >= lo; tt -= ksymAlign {
		if parseTokens(d, tt, t.tokenIndex, idx, &t.tokens) {
			t.tokenTable = tt
			return true
		}
	}
	return false
}

func parseTokens(d []byte, tt, x int, idx *[256]int, out *[256]string) bool {
	for i := 0; i < 256; i++ {
		s := tt + idx[i]
		var e int // offset of the NUL ending token i
		if i < 255 {
			e = tt + idx[i+1] - 1
		} else {
			e = -1
			for j := s; j < x && j <= s+ksymMaxToken; j++ {
				if d[j] == 0 {
					e = j
					break
				}
			}
			if e < 0 || x-(e+1) >= ksymAlign || !allZero(d[e+1:x]) {
				return false
			}
		}
		if e >= x || d[e] != 0 {
			return false
		}
		for _, c := range d[s:e] {
			if c < 0x21 || c > 0x7e {
				return false
			}
		}
	}
	for i := 0; i < 256; i++ {
		s := tt + idx[i]
		e := s
		for d[e] != 0 {
			e++
		}
		out[i] = string(d[s:e])
	}
	return true
}

type markersCand struct {
	ms   int
	vals []uint32
}

// markersBefore returns candidate marker arrays that end, after at most
// ksymAlign-1 bytes of zero padding, at end.
func markersBefore(m *ksymDec, end int) []markersCand {
	var out []markersCand
	for pad := 0; pad < ksymAlign && end-pad >= 4; pad++ {
		me := end - pad
		if !allZero(m.data[me:end]) {
			break
		}
		if (m.base+uint64(me))%4 != 0 {
			continue
		}
		if ms, vals, ok := markersEndingAt(m, me, 0); ok {
			out = append(out, markersCand{ms, vals})
		}
	}
	return out
}

// markersEndingAt walks back from me over strictly ascending u32 markers to
// the leading 0. Every marker but the last starts a full block of 256
// names of at least 2 bytes each, so consecutive markers differ by at
// least 512. want > 0 demands exactly want markers.
func markersEndingAt(m *ksymDec, me, want int) (int, []uint32, bool) {
	d := m.data
	maxN := ksymMaxSyms / 256
	if want > 0 {
		maxN = want
	}
	k, n := me-4, 1
	prev := uint64(math.MaxUint64)
	for ; k >= 0; k, n = k-4, n+1 {
		if n > maxN || !m.spend(1) {
			return 0, nil, false
		}
		v := uint64(le32(d, k))
		if v == 0 {
			break
		}
		if v >= prev || prev-v < 512 && prev != math.MaxUint64 || v < 512 {
			return 0, nil, false
		}
		prev = v
	}
	if k < 0 || (want > 0 && n != want) || (m.base+uint64(k))%ksymAlign != 0 {
		return 0, nil, false
	}
	vals := make([]uint32, n)
	for i := range vals {
		vals[i] = le32(d, k+4*i)
	}
	return k, vals, true
}

// decodeWithSeqs searches for the 6.2/6.3 order: markers, ALGN,
// seqs_of_names (3 bytes per symbol; 4 in development versions), ALGN,
// token_table. The symbol count fixes the seqs size, so every candidate
// end of markers implies at most a few counts to try.
func decodeWithSeqs(m *ksymDec, t ksymTables) (*Kallsyms, bool) {
	d := m.data
	for _, size := range []int{3, 4} {
		for me := t.tokenTable - 4; me >= 8; me -= 4 {
			if (t.tokenTable-me)/size > ksymMaxSyms+ksymAlign || !m.spend(1) {
				break
			}
			if (m.base+uint64(me))%4 != 0 {
				continue
			}
			s := alignUp(m, me)
			if s > t.tokenTable || !allZero(d[me:s]) {
				continue
			}
			span := t.tokenTable - s
			for num := max((span-ksymAlign)/size+1, 1); num <= span/size; num++ {
				if alignUp(m, s+size*num) != t.tokenTable {
					continue
				}
				mc := (num + 255) / 256
				if me-4*mc < 0 || le32(d, me-4*mc) != 0 {
					continue
				}
				ms, vals, ok := markersEndingAt(m, me, mc)
				if !ok || !plausibleSeqs(d[s:s+size*num], size, num) {
					continue
				}
				t.markers, t.markerVals, t.seqs, t.seqSize = ms, vals, s, size
				if k, ok := decodeWithMarkers(m, t, num, num); ok {
					return k, true
				}
			}
		}
	}
	return nil, false
}

// plausibleSeqs checks that the first entries of seqs_of_names are symbol
// indexes.
func plausibleSeqs(b []byte, size, num int) bool {
	for i := 0; i < min(num, 64); i++ {
		var v int
		if size == 3 { // big endian, see kernel/kallsyms.c get_symbol_seq()
			v = int(b[3*i])<<16 | int(b[3*i+1])<<8 | int(b[3*i+2])
		} else {
			v = int(le32(b, 4*i))
		}
		if v >= num {
			return false
		}
	}
	return true
}

// decodeWithMarkers finds names (and num_syms before them) for the markers
// in t, with a symbol count in [lo, hi], then decodes everything.
func decodeWithMarkers(m *ksymDec, t ksymTables, lo, hi int) (*Kallsyms, bool) {
	d := m.data
	n := len(t.markerVals)
	lastStart := int(t.markerVals[n-1])
	top := t.markers - lastStart - 2
	bottom := max(t.markers-lastStart-256*ksymMaxEntry, 8)
	for nm := alignDown(m, top); nm >= bottom; nm -= ksymAlign {
		if !m.spend(1) {
			return nil, false
		}
		num := int(le32(d, nm-8))
		if num < lo || num > hi || le32(d, nm-4) != 0 {
			continue
		}
		// Cheap test first: the last block must end right before markers.
		if !m.spend(num - 256*(n-1)) {
			return nil, false
		}
		e, ok := skipEntries(d, nm+lastStart, num-256*(n-1), t.markers)
		if !ok || alignUp(m, e) != t.markers || !allZero(d[e:t.markers]) {
			continue
		}
		t.names, t.numSyms, t.num = nm, nm-8, num
		if k, ok := decodeAll(m, t); ok {
			return k, true
		}
	}
	return nil, false
}

// nameLen decodes the ULEB128 length at p (one byte before 6.1, at most
// two since). It returns the length and the offset of the first token.
func nameLen(d []byte, p, limit int) (int, int, bool) {
	if p >= limit {
		return 0, 0, false
	}
	l := int(d[p])
	p++
	if l&0x80 != 0 {
		if p >= limit {
			return 0, 0, false
		}
		l = l&0x7f | int(d[p])<<7
		p++
	}
	if l == 0 || l > ksymMaxName || p+l > limit {
		return 0, 0, false
	}
	return l, p, true
}

func skipEntries(d []byte, p, count, limit int) (int, bool) {
	for range count {
		l, q, ok := nameLen(d, p, limit)
		if !ok {
			return 0, false
		}
		p = q + l
	}
	return p, true
}

// decodeAll decodes every name, checks them against the markers, then
// finds and decodes the addresses.
func decodeAll(m *ksymDec, t ksymTables) (*Kallsyms, bool) {
	d := m.data
	if !m.spend(t.num) {
		return nil, false
	}
	// A name of l token bytes expands to at least l characters, so the
	// names region bounds the output size: no allocation is sized by num.
	var buf strings.Builder
	buf.Grow(min(4*(t.markers-t.names), ksymMaxDecoded))
	ends := make([]int, 0, min(t.num, (t.markers-t.names)/2))
	types := make([]byte, 0, cap(ends))
	p := t.names
	for i := range t.num {
		if i%256 == 0 && uint32(p-t.names) != t.markerVals[i/256] {
			return nil, false
		}
		l, q, ok := nameLen(d, p, t.markers)
		if !ok {
			return nil, false
		}
		first := t.tokens[d[q]]
		if len(first) == 0 || !isLetter(first[0]) {
			return nil, false
		}
		types = append(types, first[0])
		n := len(first) - 1
		buf.WriteString(first[1:])
		for _, c := range d[q+1 : q+l] {
			n += len(t.tokens[c])
			buf.WriteString(t.tokens[c])
		}
		if n == 0 || n > ksymMaxName || buf.Len() > ksymMaxDecoded {
			return nil, false
		}
		ends = append(ends, buf.Len())
		p = q + l
	}
	if alignUp(m, p) != t.markers {
		return nil, false
	}
	addrs, k, ok := findAddresses(m, t)
	if !ok {
		return nil, false
	}
	all := buf.String()
	k.Symbols = make([]KallsymsSymbol, t.num)
	start := 0
	for i := range k.Symbols {
		k.Symbols[i] = KallsymsSymbol{Name: all[start:ends[i]], Type: types[i], Addr: addrs[i].addr, Absolute: addrs[i].abs}
		start = ends[i]
	}
	return k, true
}

func isLetter(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' }

type ksymAddr struct {
	addr uint64
	abs  bool
}

// findAddresses tries each place the address table can be: before
// num_syms (<= 6.3) or after token_index (>= 6.4), as base-relative
// offsets or as absolute addresses.
func findAddresses(m *ksymDec, t ksymTables) ([]ksymAddr, *Kallsyms, bool) {
	d := m.data
	num := t.num
	rel := (4*num + ksymAlign - 1) &^ (ksymAlign - 1)
	after := alignUp(m, t.tokenIndex+512)
	type cand struct {
		offsets, relBase int // relBase < 0: absolute addresses
	}
	cands := []cand{
		{t.numSyms - 8 - rel, t.numSyms - 8},
		{after, alignUp(m, after+4*num)},
		{t.numSyms - 8*num, -1},
		{after, -1},
	}
	for _, c := range cands {
		if !m.spend(2 * num) {
			return nil, nil, false
		}
		var addrs []ksymAddr
		var absPercpu bool
		if c.relBase >= 0 {
			if c.offsets < 0 || c.relBase < 0 || c.relBase+8 > len(d) || c.offsets+4*num > len(d) {
				continue
			}
			addrs, absPercpu = decodeOffsets(d[c.offsets:c.offsets+4*num], le64(d, c.relBase))
		} else {
			if c.offsets < 0 || num > (len(d)-c.offsets)/8 {
				continue
			}
			addrs = make([]ksymAddr, num)
			for i := range addrs {
				a := le64(d, c.offsets+8*i)
				addrs[i] = ksymAddr{addr: a, abs: a < kernelHalf}
			}
		}
		if !plausibleAddrs(addrs) {
			continue
		}
		k := &Kallsyms{
			BaseRelative:   c.relBase >= 0,
			AbsolutePercpu: absPercpu,
			Tables: map[string]uint64{
				"kallsyms_num_syms":    m.addr(t.numSyms),
				"kallsyms_names":       m.addr(t.names),
				"kallsyms_markers":     m.addr(t.markers),
				"kallsyms_token_table": m.addr(t.tokenTable),
				"kallsyms_token_index": m.addr(t.tokenIndex),
			},
		}
		if c.relBase >= 0 {
			k.Tables["kallsyms_offsets"] = m.addr(c.offsets)
			k.Tables["kallsyms_relative_base"] = m.addr(c.relBase)
		} else {
			k.Tables["kallsyms_addresses"] = m.addr(c.offsets)
		}
		switch {
		case t.seqs >= 0:
			k.Tables["kallsyms_seqs_of_names"] = m.addr(t.seqs)
		case c.offsets == after:
			// 6.4+: seqs_of_names follows the address table.
			end := c.offsets + 8*num
			if c.relBase >= 0 {
				end = c.relBase + 8
			}
			if s := alignUp(m, end); s+3*num <= len(d) {
				k.Tables["kallsyms_seqs_of_names"] = m.addr(s)
			}
		}
		return addrs, k, true
	}
	return nil, nil, false
}

// kernelHalf is the lowest x86_64 kernel-space (canonical upper half)
// address.
const kernelHalf = 0xffff800000000000

// decodeOffsets decodes base-relative offsets the way kernel/kallsyms.c
// kallsyms_sym_address() does. Negative offsets exist only with
// CONFIG_KALLSYMS_ABSOLUTE_PERCPU; without it every kernel symbol is a
// small non-negative offset from relBase.
func decodeOffsets(b []byte, relBase uint64) ([]ksymAddr, bool) {
	num := len(b) / 4
	absPercpu := false
	for i := range num {
		if int32(le32(b, 4*i)) < 0 {
			absPercpu = true
			break
		}
	}
	out := make([]ksymAddr, num)
	for i := range out {
		o := int32(le32(b, 4*i))
		switch {
		case !absPercpu:
			out[i] = ksymAddr{addr: relBase + uint64(uint32(o))}
		case o >= 0:
			out[i] = ksymAddr{addr: uint64(o), abs: true}
		default:
			out[i] = ksymAddr{addr: relBase - 1 - uint64(int64(o))}
		}
	}
	return out, absPercpu
}

// plausibleAddrs checks that addresses are sorted, mostly distinct, and
// that kernel addresses lie in the kernel half: scripts/kallsyms.c sorts
// symbols by address, and zeroes or unrelated data do not look like that.
func plausibleAddrs(a []ksymAddr) bool {
	distinct := 0
	for i := range a {
		if !a[i].abs && a[i].addr < kernelHalf {
			return false
		}
		if i > 0 {
			if a[i].addr < a[i-1].addr {
				return false
			}
			if a[i].addr != a[i-1].addr {
				distinct++
			}
		}
	}
	return len(a) < 4 || distinct >= len(a)/2
}

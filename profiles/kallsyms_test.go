package profiles

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

const testBase = 0xffffffff81000000

func TestDecodeKallsymsSynthetic(t *testing.T) {
	for _, layout := range []ksymLayout{layout61, layout62, layout64, layoutAbs} {
		for _, absPercpu := range []bool{false, true} {
			if layout == layoutAbs && absPercpu {
				continue
			}
			for _, n := range []int{5, 256, 700} {
				t.Run(fmt.Sprintf("%v/abs=%v/n=%d", layout, absPercpu, n), func(t *testing.T) {
					syms := testSymbols(testBase, n, absPercpu)
					w := &imgBuilder{base: testBase}
					w.b = append(w.b, randomBytes(1, 4099)...)
					at := appendKallsyms(t, w, syms, layout, absPercpu)
					w.b = append(w.b, randomBytes(2, 1000)...)

					k, err := DecodeKallsyms(w.b, w.base)
					require.NoError(t, err)
					require.Equal(t, at, k.Tables)
					require.Equal(t, layout != layoutAbs, k.BaseRelative)
					require.Equal(t, absPercpu, k.AbsolutePercpu)
					require.Len(t, k.Symbols, len(syms))
					for i, s := range syms {
						require.Equal(t, KallsymsSymbol{Name: s.name, Type: s.typ, Addr: s.addr, Absolute: s.abs}, k.Symbols[i], "symbol %d", i)
					}
					sym, ok := k.Lookup("_text")
					require.True(t, ok)
					require.Equal(t, uint64(testBase), sym.Addr)
				})
			}
		}
	}
}

// TestDecodeKallsymsRelocated checks that a relocated image decodes to
// relocated addresses: only kallsyms_relative_base is relocated in memory.
func TestDecodeKallsymsRelocated(t *testing.T) {
	const delta = 0x2e000000
	syms := testSymbols(testBase+delta, 300, true)
	w := &imgBuilder{base: testBase + delta}
	w.b = append(w.b, randomBytes(3, 512)...)
	appendKallsyms(t, w, syms, layout61, true)
	k, err := DecodeKallsyms(w.b, w.base)
	require.NoError(t, err)
	s, _ := k.Lookup("_text")
	require.Equal(t, uint64(testBase+delta), s.Addr)
	s, _ = k.Lookup("current_task")
	require.Equal(t, uint64(0x1c40), s.Addr)
	require.True(t, s.Absolute)
}

func TestDecodeKallsymsErrors(t *testing.T) {
	syms := testSymbols(testBase, 600, true)
	w := &imgBuilder{base: testBase}
	at := appendKallsyms(t, w, syms, layout61, true)
	good := w.b
	corrupt := func(name string, delta uint64, b byte) []byte {
		c := append([]byte(nil), good...)
		c[at[name]+delta-testBase] ^= b
		return c
	}
	for _, tc := range []struct {
		name string
		img  []byte
	}{
		{"empty", nil},
		{"zeros", make([]byte, 1<<16)},
		{"random", randomBytes(9, 1<<16)},
		{"marker", corrupt("kallsyms_markers", 4, 0x01)},
		{"num_syms", corrupt("kallsyms_num_syms", 0, 0x01)},
		{"name length", corrupt("kallsyms_names", 0, 0x10)},
		{"unsorted offsets", corrupt("kallsyms_offsets", 4*100+2, 0x40)},
		{"truncated", good[:at["kallsyms_token_index"]-testBase+100]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeKallsyms(tc.img, testBase)
			require.ErrorIs(t, err, ErrNoKallsyms)
		})
	}
}

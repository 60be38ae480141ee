package profiles

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestBzImagePayload(t *testing.T) {
	good := bzImage([]byte("0123456789abcdef"))
	payload, pref, err := bzImagePayload(good)
	require.NoError(t, err)
	require.Equal(t, []byte("0123456789abcdef"), payload)
	require.Equal(t, uint64(synthPref), pref)

	edit := func(f func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		f(b)
		return b
	}
	for _, tc := range []struct {
		name string
		img  []byte
		want error
	}{
		{"short", good[:0x100], ErrNotKernelImage},
		{"no boot flag", edit(func(b []byte) { b[hdrBootFlag] = 0 }), ErrNotKernelImage},
		{"no HdrS", edit(func(b []byte) { b[hdrMagic] = 'X' }), ErrNotKernelImage},
		{"protocol 2.06", edit(func(b []byte) { binary.LittleEndian.PutUint16(b[hdrVersion:], 0x0206) }), ErrMalformed},
		{"payload past end", edit(func(b []byte) { binary.LittleEndian.PutUint32(b[hdrPayloadLen:], 1<<30) }), ErrMalformed},
		{"payload offset past end", edit(func(b []byte) { binary.LittleEndian.PutUint32(b[hdrPayloadOff:], 0xffffffff) }), ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := bzImagePayload(tc.img)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

func TestParseVmcoreinfo(t *testing.T) {
	v, err := parseVmcoreinfo([]byte("OSRELEASE=6.1.0-47-amd64\nBUILD-ID=ABCD\nPAGESIZE=4096\nSYMBOL(node_data)=ffffffff8d6f3c20\n" +
		"SIZE(page)=64\nOFFSET(page.lru)=8\nLENGTH(zone.free_area)=11\nNUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129\n" +
		"KERNELOFFSET=c000000\nCONFIG_KALLSYMS=y\nno equals sign\n\x00garbage after NUL=1\n"))
	require.NoError(t, err)
	require.Equal(t, "6.1.0-47-amd64", v.osRelease)
	require.Equal(t, "abcd", v.buildID)
	require.Equal(t, int64(4096), v.pageSize)
	require.Equal(t, uint64(0xffffffff8d6f3c20), v.symbols["node_data"])
	require.Equal(t, uint64(64), v.sizes["page"])
	require.Equal(t, uint64(8), v.offsets["page.lru"])
	require.Equal(t, uint64(11), v.lengths["zone.free_area"])
	require.Equal(t, int64(-129), v.numbers["PAGE_BUDDY_MAPCOUNT_VALUE"])
	require.True(t, v.hasKernelOffset)
	require.Equal(t, uint64(0xc000000), v.kernelOffset)

	// 6.12 prints some numbers in hex (arch/x86/kernel/vmcore_info_64.c).
	v, err = parseVmcoreinfo([]byte("NUMBER(VMALLOC_START)=0xffffce2440000000\nNUMBER(KERNEL_IMAGE_SIZE)=0x40000000\n"))
	require.NoError(t, err)
	require.Equal(t, uint64(0xffffce2440000000), uint64(v.numbers["VMALLOC_START"]))
	require.Equal(t, int64(0x40000000), v.numbers["KERNEL_IMAGE_SIZE"])

	_, err = parseVmcoreinfo([]byte("SYMBOL(x)=zz\n"))
	var fe *FormatError
	require.ErrorAs(t, err, &fe)
	require.Equal(t, "vmcoreinfo", fe.What)
	require.ErrorIs(t, err, ErrMalformed)
}

func TestErrorTypes(t *testing.T) {
	require.ErrorIs(t, &MissingError{Kind: "symbol", Name: "x"}, ErrMissingSymbol)
	require.ErrorIs(t, &MissingError{Kind: "field", Name: "page.lru"}, ErrMissingType)
	require.ErrorIs(t, &MismatchError{What: "x"}, ErrMismatch)
	fe := &FormatError{What: "xz", Off: 4, Msg: "bad", Err: ErrUnsupportedCompression}
	require.ErrorIs(t, fe, ErrMalformed)
	require.ErrorIs(t, fe, ErrUnsupportedCompression)
	require.Equal(t, "xz at offset 0x4: bad: unsupported compression", fe.Error())
	require.Contains(t, ErrNoBTF.Error(), "ISF")
	require.Contains(t, ErrNoBTF.Error(), "CONFIG_DEBUG_INFO_BTF")
	require.False(t, errors.Is(ErrNoBTF, ErrMalformed))
}

func TestWantedELFSymbols(t *testing.T) {
	got := wantedELFSymbols([]elf.Symbol{
		{Name: "node_data", Info: elf.ST_INFO(elf.STB_LOCAL, elf.STT_OBJECT), Section: 1, Value: 1},
		{Name: "node_data", Info: elf.ST_INFO(elf.STB_GLOBAL, elf.STT_OBJECT), Section: 1, Value: 2},
		{Name: "node_data", Info: elf.ST_INFO(elf.STB_LOCAL, elf.STT_OBJECT), Section: 1, Value: 3},
		{Name: "_text", Info: elf.ST_INFO(elf.STB_GLOBAL, elf.STT_NOTYPE), Section: 1, Value: 0xffffffff81000000},
		{Name: "phys_base", Section: elf.SHN_UNDEF, Value: 9},
		{Name: "unrelated", Section: 1, Value: 4},
	})
	require.Equal(t, map[string]uint64{"node_data": 2, "_text": 0xffffffff81000000}, got)

	m, err := parseSystemMap(strings.NewReader("ffffffff81000000 T _text\nffffffff82000000 d node_data\nffffffff82000100 D node_data\nffffffff82000200 d node_data\n"))
	require.NoError(t, err)
	require.Equal(t, map[string]uint64{"_text": 0xffffffff81000000, "node_data": 0xffffffff82000100}, m)
}

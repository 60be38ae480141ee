package checkpoint

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLibvirtHeader checks the save image header against the layout of
// libvirt's virQEMUSaveHeader (qemu_saveimage.h): 16 bytes of magic, five
// host-order uint32s, 14 unused, 92 bytes in all, then the XML, its NUL
// and 64 KiB of room.
func TestLibvirtHeader(t *testing.T) {
	xml := []byte("<domain type='qemu'><name>vm</name></domain>")
	var b bytes.Buffer
	require.NoError(t, writeLibvirtHeader(&b, xml, true))
	out := b.Bytes()
	require.Len(t, out, 92+len(xml)+1+64<<10)
	assert.Equal(t, "LibvirtQemudSave", string(out[:16]))
	u32 := func(i int) uint32 { return binary.NativeEndian.Uint32(out[16+4*i:]) }
	assert.Equal(t, uint32(2), u32(0), "version")
	assert.Equal(t, uint32(len(xml)+1+64<<10), u32(1), "data_len")
	assert.Equal(t, uint32(1), u32(2), "was_running")
	assert.Equal(t, uint32(0), u32(3), "compressed: raw")
	assert.Equal(t, uint32(0), u32(4), "cookieOffset: none")
	assert.Equal(t, make([]byte, 56), out[36:92], "unused")
	assert.Equal(t, xml, out[92:92+len(xml)])
	assert.Equal(t, make([]byte, 1+64<<10), out[92+len(xml):])

	b.Reset()
	require.NoError(t, writeLibvirtHeader(&b, xml, false))
	assert.Equal(t, uint32(0), binary.NativeEndian.Uint32(b.Bytes()[24:]), "was_running off")
	assert.ErrorIs(t, writeLibvirtHeader(&b, []byte("a\x00b"), true), ErrExport)
}

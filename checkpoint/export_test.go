package checkpoint

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/migstream"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
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

// ramStream is a migration stream as QEMU writes one with x-ignore-shared
// off, filtered of mem0's pages: configuration, ram START listing mem0 and
// a small block of QEMU's, ram END with the small block's page, one
// device section, the end.
func ramStream(mem0Size uint64) []byte {
	var b []byte
	be32 := func(v uint32) { b = binary.BigEndian.AppendUint32(b, v) }
	be64 := func(v uint64) { b = binary.BigEndian.AppendUint64(b, v) }
	str := func(s string) { b = append(append(b, byte(len(s))), s...) }
	be32(0x5145564d)
	be32(3)
	b = append(b, 0x07)
	be32(4)
	b = append(b, "pc-x"...)
	b = append(b, 0x01)
	be32(2)
	str("ram")
	be32(0)
	be32(4)
	be64((mem0Size + 4096) | 0x04)
	str("mem0")
	be64(mem0Size)
	str("pc.bios")
	be64(4096)
	be64(0x10)
	b = append(b, 0x7e)
	be32(2)
	b = append(b, 0x03)
	be32(2)
	be64(0x08)
	str("pc.bios")
	b = append(b, bytes.Repeat([]byte{0xb1}, 4096)...)
	be64(0x10)
	b = append(b, 0x7e)
	be32(2)
	b = append(b, 0x04)
	be32(3)
	str("cpu")
	be32(0)
	be32(1)
	b = append(b, 1, 2, 3, 0x00)
	return b
}

// TestExportFill exports a checkpoint of a guest that poisons free pages
// (fill byte 0xaa): every saved page is a page record with its bytes,
// every other page of the backend a fill record of 0xaa, QEMU's own block
// and the device section as they were; a failed export leaves nothing.
func TestExportFill(t *testing.T) {
	const pages = 16
	dir := t.TempDir()
	in := filepath.Join(dir, "c.kvmckpt")
	h := writer.Header{FillByte: 0xaa, DeviceStateForm: writer.DeviceStateFiltered,
		Regions: []writer.Region{{ID: "mem0", Size: pages * writer.PageSize}}}
	w, err := writer.Create(in, h, writer.Options{ChunkPages: 4})
	require.NoError(t, err)
	ram := make([]byte, pages*writer.PageSize)
	for p := range pages {
		ram[p*writer.PageSize] = byte(p + 1)
	}
	used := pagemap.NewBitmap(pages)
	for _, p := range []uint64{0, 3, 4, 5, 11} {
		used.Set(p)
	}
	require.NoError(t, w.WritePages([][]byte{ram}, used, nil))
	_, err = w.WriteDeviceState(bytes.NewReader(ramStream(pages * writer.PageSize)))
	require.NoError(t, err)
	require.NoError(t, w.Commit())

	out := filepath.Join(dir, "c.qemu")
	res, err := Export(context.Background(), ExportOptions{Input: in, Output: out, Format: FormatQEMU})
	require.NoError(t, err)
	assert.Equal(t, uint64(5), res.PagesWritten)
	assert.Equal(t, uint64(pages-5), res.PagesFilled)

	// Read back: QEMU's own block kept, mem0's records as written.
	stream, err := os.ReadFile(out)
	require.NoError(t, err)
	got := map[uint64]bool{}
	_, err = migstream.Filter(bytes.NewReader(stream), io.Discard, migstream.Options{
		Drop: func(b migstream.Block) bool { return b.ID == "mem0" },
		Page: func(blk int, off uint64, zero bool) {
			assert.Equal(t, 0, blk)
			assert.Equal(t, !used.Test(off/writer.PageSize), zero, "page %d", off/writer.PageSize)
			got[off/writer.PageSize] = true
		},
	})
	require.NoError(t, err)
	assert.Len(t, got, pages, "every page of mem0 has a record")
	// The saved pages' bytes and the fill byte are in the stream.
	for _, p := range []uint64{0, 3, 4, 5, 11} {
		assert.True(t, bytes.Contains(stream, ram[p*writer.PageSize:(p+1)*writer.PageSize]), "page %d", p)
	}
	assert.True(t, bytes.HasSuffix(stream, []byte{0x04, 0, 0, 0, 3, 3, 'c', 'p', 'u', 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 0x00}),
		"the device section and the end, as saved")

	// A libvirt image needs a domain XML: refused, no file.
	bad := filepath.Join(dir, "c.libvirt")
	_, err = Export(context.Background(), ExportOptions{Input: in, Output: bad, Format: FormatLibvirt})
	require.ErrorIs(t, err, ErrExport)
	assert.Contains(t, err.Error(), "--xml")
	// Interrupted: no file, no temporary left.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = Export(ctx, ExportOptions{Input: in, Output: bad, Format: FormatLibvirt, DomainXML: []byte("<domain/>")})
	require.ErrorIs(t, err, context.Canceled)
	entries, _ := os.ReadDir(dir)
	names := []string{}
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"c.kvmckpt", "c.qemu"}, names)
}

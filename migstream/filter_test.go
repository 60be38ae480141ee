package migstream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// stream builds a migration stream the way QEMU writes one.
type stream struct{ b []byte }

func (s *stream) u8(v byte) *stream     { s.b = append(s.b, v); return s }
func (s *stream) be16(v uint16) *stream { s.b = binary.BigEndian.AppendUint16(s.b, v); return s }
func (s *stream) be32(v uint32) *stream { s.b = binary.BigEndian.AppendUint32(s.b, v); return s }
func (s *stream) be64(v uint64) *stream { s.b = binary.BigEndian.AppendUint64(s.b, v); return s }
func (s *stream) str(v string) *stream  { s.b = append(append(s.b, byte(len(v))), v...); return s }
func (s *stream) raw(v []byte) *stream  { s.b = append(s.b, v...); return s }

func (s *stream) header() *stream {
	return s.be32(fileMagic).be32(fileVersion).u8(vmConfiguration).be32(12).raw([]byte("pc-i440fx-7.2"[:12]))
}

func (s *stream) start(id uint32, blocks ...Block) *stream {
	s.u8(vmSectionStart).be32(id).str("ram").be32(0).be32(4)
	var total uint64
	for _, b := range blocks {
		total += b.Size
	}
	s.be64(total | flagMemSize)
	for _, b := range blocks {
		s.str(b.ID).be64(b.Size)
	}
	return s.be64(flagEOS).footer(id)
}

func (s *stream) footer(id uint32) *stream { return s.u8(vmSectionFooter).be32(id) }

// record writes a page record with its body; block "" continues the one
// before.
func (s *stream) record(block string, off, flags uint64, body []byte) *stream {
	if block == "" {
		flags |= flagContinue
	}
	s.be64(off | flags)
	if block != "" {
		s.str(block)
	}
	return s.raw(body)
}

func (s *stream) page(block string, off uint64, fill byte) *stream {
	return s.record(block, off, flagPage, bytes.Repeat([]byte{fill}, PageSize))
}

func (s *stream) zero(block string, off uint64) *stream {
	return s.record(block, off, flagZero, []byte{0})
}

var testBlocks = []Block{{"pc.ram", 16 * PageSize}, {"vga.vram", 4 * PageSize}, {"pc.bios", 2 * PageSize}}

const ramID = 2

// testStream is a stream of two passes and an end, with the device state
// after it.
func testStream() (*stream, []byte) {
	s := (&stream{}).header().start(ramID, testBlocks...)
	// Pass one: everything.
	s.u8(vmSectionPart).be32(ramID)
	s.page("pc.ram", 0, 1)
	for p := uint64(1); p < 16; p++ {
		if p%3 == 0 {
			s.zero("", p*PageSize)
		} else {
			s.page("", p*PageSize, byte(p))
		}
	}
	s.page("vga.vram", 0, 0x10).zero("", PageSize).page("", 2*PageSize, 0x12).zero("", 3*PageSize)
	s.page("pc.bios", 0, 0x20).page("", PageSize, 0x21)
	s.be64(flagEOS).footer(ramID)
	// A command between sections is passed on.
	s.u8(vmCommand).be16(7).be16(3).raw([]byte{1, 2, 3})
	// Pass two: pc.ram page 5 again, vga page 0 rewritten.
	s.u8(vmSectionPart).be32(ramID)
	s.page("pc.ram", 5*PageSize, 0x55).page("vga.vram", 0, 0x11)
	s.be64(flagEOS).footer(ramID)
	// The end: one more of each.
	s.u8(vmSectionEnd).be32(ramID)
	s.page("pc.ram", 7*PageSize, 0x77).zero("vga.vram", 2*PageSize)
	s.be64(flagEOS).footer(ramID)
	dev := []byte{vmSectionFull, 0, 0, 0, 3, 4, 't', 'i', 'm', 'r', 0, 0, 0, 0, 0, 0, 0, 1, 0xaa, vmSectionFooter, 0, 0, 0, 3, vmEOF}
	s.raw(dev)
	return s, dev
}

type pageRef struct {
	block int
	off   uint64
}

func TestFilter(t *testing.T) {
	s, dev := testStream()
	var out bytes.Buffer
	var pages []pageRef
	var blocks []Block
	done := false
	st, err := Filter(bytes.NewReader(s.b), &out, Options{
		Drop:   func(b Block) bool { return b.ID == "pc.ram" },
		Blocks: func(b []Block) error { blocks = b; return nil },
		Page: func(b int, off uint64, zero bool) {
			assert.False(t, done)
			assert.Equal(t, b == 0 && off%(3*PageSize) == 0 && off > 0 && off < 16*PageSize && len(pages) < 16, zero, "page %#x", off)
			pages = append(pages, pageRef{b, off})
		},
		RAMDone: func() { done = true },
	})
	require.NoError(t, err)
	assert.True(t, done)
	assert.Equal(t, testBlocks, blocks)
	require.Len(t, pages, 18, "16 pages in pass one, one in pass two and one at the end")
	assert.Equal(t, pageRef{0, 5 * PageSize}, pages[16])
	assert.Equal(t, pageRef{0, 7 * PageSize}, pages[17])
	assert.Equal(t, uint64(18), st.Dropped)
	assert.Equal(t, uint64(8), st.Kept)
	assert.Equal(t, uint64(6), st.KeptPages)

	// What QEMU would load: the header and start as they came, the
	// command, an end with the kept blocks' last pages, the device state.
	want := (&stream{}).header().start(ramID, testBlocks...)
	want.u8(vmCommand).be16(7).be16(3).raw([]byte{1, 2, 3})
	want.u8(vmSectionEnd).be32(ramID)
	want.page("vga.vram", 0, 0x11).zero("", PageSize).zero("", 2*PageSize).zero("", 3*PageSize)
	want.page("pc.bios", 0, 0x20).page("", PageSize, 0x21)
	want.be64(flagEOS).footer(ramID)
	want.raw(dev)
	assert.Equal(t, want.b, out.Bytes())

	// The output is a stream the filter reads again: nothing to drop
	// in it but the kept pages, and the same device state.
	var again bytes.Buffer
	_, err = Filter(bytes.NewReader(out.Bytes()), &again, Options{})
	require.NoError(t, err)
	assert.Equal(t, out.Bytes(), again.Bytes())
}

func TestFilterRefuses(t *testing.T) {
	full := func() []byte { s, _ := testStream(); return s.b }
	for _, c := range []struct {
		name string
		b    func() []byte
		want error
	}{
		{"empty", func() []byte { return nil }, ErrFormat},
		{"bad magic", func() []byte { b := full(); b[0] = 'X'; return b }, ErrFormat},
		{"cut short", func() []byte { b := full(); return b[:len(b)/2] }, ErrFormat},
		{"another iterable section", func() []byte {
			return (&stream{}).header().u8(vmSectionStart).be32(1).str("block").be32(0).be32(1).b
		}, ErrUnsupported},
		{"device state before RAM ends", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionFull).be32(3).str("timer").b
		}, ErrUnsupported},
		{"xbzrle page", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionPart).be32(ramID).be64(flagXBZRLE).str("pc.ram").b
		}, ErrUnsupported},
		{"unknown block", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionPart).be32(ramID).page("nosuch", 0, 1).b
		}, ErrFormat},
		{"page past its block", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionPart).be32(ramID).page("pc.bios", 2*PageSize, 1).b
		}, ErrFormat},
		{"continue with no block before", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionPart).be32(ramID).page("", 0, 1).b
		}, ErrFormat},
		{"blocks overrun the size", func() []byte {
			s := (&stream{}).header().u8(vmSectionStart).be32(ramID).str("ram").be32(0).be32(4)
			return s.be64(PageSize | flagMemSize).str("pc.ram").be64(2 * PageSize).b
		}, ErrFormat},
		{"wrong footer", func() []byte {
			s := (&stream{}).header().start(ramID, testBlocks...).u8(vmSectionPart).be32(ramID).be64(flagEOS)
			return s.footer(ramID + 1).b
		}, ErrFormat},
		{"unknown configuration subsection", func() []byte {
			return (&stream{}).header().u8(vmSubsection).str("configuration/new").be32(1).b
		}, ErrUnsupported},
		{"ends before RAM", func() []byte {
			return (&stream{}).header().start(ramID, testBlocks...).u8(vmEOF).b
		}, ErrFormat},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Filter(bytes.NewReader(c.b()), &bytes.Buffer{}, Options{Drop: func(b Block) bool { return b.ID == "pc.ram" }})
			require.Error(t, err)
			assert.True(t, errors.Is(err, c.want), "%v", err)
		})
	}
}

func TestFilterKeptBound(t *testing.T) {
	s, _ := testStream()
	_, err := Filter(bytes.NewReader(s.b), &bytes.Buffer{}, Options{MaxKept: 8 * PageSize})
	assert.ErrorIs(t, err, ErrUnsupported, "keeping pc.ram would hold more than MaxKept")
}

func TestFilterConfiguration(t *testing.T) {
	s := (&stream{}).header()
	s.u8(vmSubsection).str("configuration/capabilities").be32(1).be32(1).str("x-ignore-shared")
	s.u8(vmSubsection).str("configuration/uuid").be32(1).raw(make([]byte, 16))
	s.start(ramID, testBlocks...)
	s.u8(vmSectionEnd).be32(ramID).be64(flagEOS).footer(ramID).u8(vmEOF)
	var out bytes.Buffer
	_, err := Filter(bytes.NewReader(s.b), &out, Options{})
	require.NoError(t, err)
	assert.Equal(t, s.b, out.Bytes(), "a stream with nothing to drop or collapse comes out as it went in")
}

func FuzzFilter(f *testing.F) {
	s, _ := testStream()
	f.Add(s.b)
	f.Add(s.b[:len(s.b)/3])
	f.Fuzz(func(t *testing.T, b []byte) {
		var out bytes.Buffer
		_, err := Filter(bytes.NewReader(b), &out, Options{
			Drop:    func(b Block) bool { return b.ID == "pc.ram" },
			MaxKept: 1 << 20,
		})
		if err != nil && !errors.Is(err, ErrFormat) && !errors.Is(err, ErrUnsupported) {
			t.Fatalf("error wraps neither ErrFormat nor ErrUnsupported: %v", err)
		}
		// As export reads a stream written with x-ignore-shared.
		_, err = Filter(bytes.NewReader(b), io.Discard, Options{
			IgnoreShared: true, Stock: true, MaxKept: 1 << 20,
			Insert: func(blocks []Block, p *Pages) error {
				for i, b := range blocks {
					if err := p.Fill(i, b.Size-PageSize, 1); err != nil {
						t.Fatalf("fill the last page of a listed block: %v", err)
					}
				}
				return nil
			},
		})
		if err != nil && !errors.Is(err, ErrFormat) && !errors.Is(err, ErrUnsupported) {
			t.Fatalf("error wraps neither ErrFormat nor ErrUnsupported: %v", err)
		}
	})
}

// TestStock turns an x-ignore-shared stream (block addresses, the
// capability in the configuration) into a stock one with pages inserted,
// as `kvmckpt export` does: the result reads back as a stream without the
// capability, carrying the inserted pages.
func TestStock(t *testing.T) {
	s := (&stream{}).header()
	s.u8(vmSubsection).str("configuration/capabilities").be32(1).be32(1).str("x-ignore-shared")
	s.u8(vmSubsection).str("configuration/uuid").be32(1).raw(make([]byte, 16))
	s.u8(vmSectionStart).be32(ramID).str("ram").be32(0).be32(4)
	s.be64(testBlocks[0].Size + testBlocks[1].Size + testBlocks[2].Size | flagMemSize)
	for i, b := range testBlocks {
		s.str(b.ID).be64(b.Size).be64(uint64(i) << 32)
	}
	s.be64(flagEOS).footer(ramID)
	s.u8(vmSectionEnd).be32(ramID).page("vga.vram", 0, 0x11).be64(flagEOS).footer(ramID)
	dev := []byte{vmSectionFull, 0, 0, 0, 9, 3, 'c', 'p', 'u', 0, 0, 0, 0, 0, 0, 0, 1, 0xaa, vmEOF}
	s.raw(dev)

	var out bytes.Buffer
	st, err := Filter(bytes.NewReader(s.b), &out, Options{
		IgnoreShared: true,
		Stock:        true,
		Insert: func(blocks []Block, p *Pages) error {
			assert.Equal(t, testBlocks, blocks)
			require.NoError(t, p.Page(0, 0, bytes.Repeat([]byte{1}, PageSize)))
			require.NoError(t, p.Page(0, 2*PageSize, bytes.Repeat([]byte{2}, PageSize)))
			require.NoError(t, p.Fill(0, 3*PageSize, 0xaa))
			require.NoError(t, p.Page(2, 0, bytes.Repeat([]byte{3}, PageSize)))
			assert.Error(t, p.Page(0, testBlocks[0].Size, make([]byte, PageSize)), "past the block")
			assert.Error(t, p.Page(9, 0, make([]byte, PageSize)), "no such block")
			return nil
		},
	})
	require.NoError(t, err)
	assert.Equal(t, uint64(4), st.Inserted)

	want := (&stream{}).header()
	want.u8(vmSubsection).str("configuration/uuid").be32(1).raw(make([]byte, 16))
	want.start(ramID, testBlocks...)
	want.u8(vmSectionPart).be32(ramID)
	want.page(testBlocks[0].ID, 0, 1).page("", 2*PageSize, 2)
	want.record("", 3*PageSize, flagZero, []byte{0xaa})
	want.page(testBlocks[2].ID, 0, 3)
	want.be64(flagEOS).footer(ramID)
	want.u8(vmSectionEnd).be32(ramID).page("vga.vram", 0, 0x11).be64(flagEOS).footer(ramID)
	want.raw(dev)
	assert.Equal(t, want.b, out.Bytes())

	// Read back as a stock stream: the pages are there.
	var pages []pageRef
	_, err = Filter(bytes.NewReader(out.Bytes()), io.Discard, Options{
		Drop: func(b Block) bool { return b.ID != "vga.vram" },
		Page: func(b int, off uint64, zero bool) { pages = append(pages, pageRef{b, off}) },
	})
	require.NoError(t, err)
	assert.Equal(t, []pageRef{{0, 0}, {0, 2 * PageSize}, {0, 3 * PageSize}, {2, 0}}, pages)

	// Without Stock, the addresses and the capability stay.
	out.Reset()
	_, err = Filter(bytes.NewReader(s.b), &out, Options{IgnoreShared: true})
	require.NoError(t, err)
	assert.Equal(t, s.b, out.Bytes())
}

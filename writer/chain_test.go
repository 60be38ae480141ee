package writer

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// writeChild writes at path a checkpoint of ram's pages in used, as a
// child of the checkpoint at parent: only the pages whose content differs
// from what parent restores.
func writeChild(tb testing.TB, path, parent string, h Header, ram [][]byte, used *pagemap.Bitmap) Stats {
	tb.Helper()
	c, err := OpenChain(parent, ChainOptions{})
	require.NoError(tb, err)
	defer c.Close()
	ps, err := c.PageSums(context.Background())
	require.NoError(tb, err)
	cur, err := PageSums(context.Background(), ram, &h, used, HashOptions{})
	require.NoError(tb, err)
	changed, err := pagehash.Changed(cur, ps, pagehash.Filled(PageSize, h.FillByte))
	require.NoError(tb, err)
	h.Parent, err = c.AsParent()
	require.NoError(tb, err)
	return writeFile(tb, path, h, Options{InUse: cur, ChunkPages: 8}, ram, changed, []byte("dev "+filepath.Base(path)))
}

// restoreChain restores the chain of path into fresh memory.
func restoreChain(tb testing.TB, path string, opt ChainOptions) [][]byte {
	tb.Helper()
	c, err := OpenChain(path, opt)
	require.NoError(tb, err)
	defer c.Close()
	h := c.Header()
	ram := make([][]byte, len(h.Regions))
	for i, r := range h.Regions {
		ram[i] = bytes.Repeat([]byte{0x5c}, int(r.Size)) // garbage to overwrite
	}
	require.NoError(tb, c.RestorePages(ram, RestoreOptions{}))
	require.NoError(tb, c.FillUnsaved(ram))
	require.NoError(tb, c.Verify(nil))
	return ram
}

// TestChain writes a full checkpoint and two children of a guest whose
// memory changes between them (pages rewritten, freed, newly used, a page
// rewritten to its old content), and restores each link to the guest's
// memory at its moment, with each page written once.
func TestChain(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(40, 30)
	h.FillByte = 0xaa
	ram := newRAM(&h, mixed)
	used := pagemap.NewBitmap(70)
	used.SetRange(0, 50)
	used.SetRange(55, 10)
	base := filepath.Join(dir, "base.kvmckpt")
	writeFile(t, base, h, Options{ChunkPages: 8}, ram, used, []byte("dev base"))
	want0 := expectedRAM(ram, used, h.FillByte)

	// Moment 1: pages 3..5 rewritten, 10..14 freed, 50..52 newly used,
	// page 20 rewritten with its own content.
	for p := 3; p < 6; p++ {
		ram[0][p*PageSize] ^= 0xff
	}
	used.ClearRange(10, 5)
	used.SetRange(50, 3)
	copy(ram[0][20*PageSize:], bytes.Clone(ram[0][20*PageSize:21*PageSize]))
	d1 := filepath.Join(dir, "d1.kvmckpt")
	st := writeChild(t, d1, base, h, ram, used)
	require.Equal(t, uint64(3+3), st.PagesWritten, "the rewritten and the newly used pages")
	want1 := expectedRAM(ram, used, h.FillByte)

	// Moment 2: page 10 used again (its content from before), 60..64
	// in the second region rewritten.
	used.Set(10)
	for p := 60; p < 65; p++ {
		ram[1][(p-40)*PageSize+7] ^= 0x55
	}
	d2 := filepath.Join(dir, "d2.kvmckpt")
	st = writeChild(t, d2, d1, h, ram, used)
	require.Equal(t, uint64(1+5), st.PagesWritten)
	want2 := expectedRAM(ram, used, h.FillByte)

	for _, c := range []struct {
		path string
		want [][]byte
	}{{base, want0}, {d1, want1}, {d2, want2}} {
		require.Equal(t, c.want, restoreChain(t, c.path, ChainOptions{}), c.path)
		// The chain's hashes, put together link by link, are those of
		// what it restores.
		ch, err := OpenChain(c.path, ChainOptions{})
		require.NoError(t, err)
		got, err := ch.PageSums(context.Background())
		require.NoError(t, err)
		direct, err := PageSums(context.Background(), c.want, &h, ch.Links[0].InUse(), HashOptions{})
		require.NoError(t, err)
		require.True(t, got.Pages.Equal(direct.Pages), c.path)
		require.Equal(t, direct.Sums, got.Sums, c.path)
		ch.Close()
	}

	c, err := OpenChain(d2, ChainOptions{})
	require.NoError(t, err)
	require.Len(t, c.Links, 3)
	var sum uint64
	for i := range c.Links {
		sum += c.Provided(i)
	}
	require.Equal(t, c.Restored(), sum, "a page restored twice")
	require.Equal(t, c.Links[0].InUse().Count(), c.Restored())
	dev := new(bytes.Buffer)
	_, err = dev.ReadFrom(c.DeviceState())
	require.NoError(t, err)
	require.Equal(t, "dev d2.kvmckpt", dev.String())
	c.Close()

	// A restore through a writer, as for a RAM file not mapped.
	c, err = OpenChain(d2, ChainOptions{})
	require.NoError(t, err)
	flat := make(memWriterAt, 70*PageSize)
	require.NoError(t, c.RestorePagesTo(flat, RestoreOptions{}))
	require.NoError(t, c.FillUnsavedTo(flat))
	require.Equal(t, concat(want2), []byte(flat))
	c.Close()
}

// TestChainBroken: a missing, changed or foreign parent is an error
// naming the link, found by its ID and not by its name; --parent finds
// one moved elsewhere.
func TestChainBroken(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(16)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(16)
	used.SetRange(0, 12)
	base := filepath.Join(dir, "base.kvmckpt")
	writeFile(t, base, h, Options{}, ram, used, []byte("dev"))
	ram[0][0] ^= 1
	d1 := filepath.Join(dir, "d1.kvmckpt")
	writeChild(t, d1, base, h, ram, used)

	// Moved: not found beside, found with Parents.
	moved := filepath.Join(t.TempDir(), "elsewhere.kvmckpt")
	require.NoError(t, os.Rename(base, moved))
	_, err := OpenChain(d1, ChainOptions{})
	require.ErrorIs(t, err, ErrChain)
	require.ErrorContains(t, err, "base.kvmckpt")
	require.ErrorContains(t, err, "--parent")
	restoreChain(t, d1, ChainOptions{Parents: []string{moved}})

	// Replaced by another checkpoint of the same name.
	h2 := h
	h2.KernelBanner = "another"
	writeFile(t, base, h2, Options{}, ram, used, []byte("dev"))
	_, err = OpenChain(d1, ChainOptions{})
	require.ErrorIs(t, err, ErrChain)
	require.ErrorContains(t, err, "changed or replaced")
	// The right one offered beside a wrong one is found.
	restoreChain(t, d1, ChainOptions{Parents: []string{base, moved}})

	// A parent of another guest cannot pass: its ID differs. A child
	// whose parent has the ID but other regions is refused too (crafted
	// here by writing a child against another guest's parent).
	other := testHeader(17)
	oram := newRAM(&other, compressible)
	oused := pagemap.NewBitmap(17)
	oused.SetRange(0, 3)
	op := filepath.Join(dir, "other.kvmckpt")
	writeFile(t, op, other, Options{}, oram, oused, []byte("dev"))
	oc, err := OpenChain(op, ChainOptions{})
	require.NoError(t, err)
	pref, err := oc.AsParent()
	require.NoError(t, err)
	oc.Close()
	cur, err := PageSums(context.Background(), ram, &h, used, HashOptions{})
	require.NoError(t, err)
	hc := h
	hc.Parent = pref
	bad := filepath.Join(dir, "bad.kvmckpt")
	writeFile(t, bad, hc, Options{InUse: cur}, ram, used, []byte("dev"))
	_, err = OpenChain(bad, ChainOptions{})
	require.ErrorIs(t, err, ErrChain)
	require.ErrorContains(t, err, "is no parent")
}

// TestChainDepth: depths must agree link by link, and a chain at the
// limit can have no child.
func TestChainDepth(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(8)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(8)
	used.SetRange(0, 8)
	base := filepath.Join(dir, "base.kvmckpt")
	writeFile(t, base, h, Options{}, ram, used, []byte("dev"))
	c, err := OpenChain(base, ChainOptions{})
	require.NoError(t, err)
	p, err := c.AsParent()
	require.NoError(t, err)
	c.Close()
	cur, err := PageSums(context.Background(), ram, &h, used, HashOptions{})
	require.NoError(t, err)
	p.Depth = 2 // a lie: the base has no parent
	hc := h
	hc.Parent = p
	child := filepath.Join(dir, "child.kvmckpt")
	writeFile(t, child, hc, Options{InUse: cur}, ram, pagemap.NewBitmap(8), []byte("dev"))
	_, err = OpenChain(child, ChainOptions{})
	require.ErrorIs(t, err, ErrChain)
	require.ErrorContains(t, err, "depth")

	p.Depth = MaxChainDepth
	writeFile(t, child, hc, Options{InUse: cur}, ram, pagemap.NewBitmap(8), []byte("dev"))
	r, err := Open(child)
	require.NoError(t, err)
	r.Close()
	c = &Chain{Links: []*Reader{r}, Paths: []string{child}, IDs: []string{p.ID}}
	_, err = c.AsParent()
	require.True(t, errors.Is(err, ErrChain))
	require.ErrorContains(t, err, "flatten")
}

// TestChainedFormat: a version 4 file's in-use bitmap and hashes are
// checked, by Open and by Verify, and its ID changes with any part.
func TestChainedFormat(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(16)
	ram := newRAM(&h, mixed)
	used := pagemap.NewBitmap(16)
	used.SetRange(2, 10)
	cur, err := PageSums(context.Background(), ram, &h, used, HashOptions{})
	require.NoError(t, err)
	path := filepath.Join(dir, "full.kvmckpt")
	writeFile(t, path, h, Options{InUse: cur, ChunkPages: 3}, ram, used, []byte("dev"))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, uint32(4), uint32(data[8]))
	r, err := openBytes(data)
	require.NoError(t, err)
	require.True(t, r.HasPageSums())
	got, err := r.PageSums()
	require.NoError(t, err)
	require.Equal(t, cur.Sums, got.Sums)
	require.NoError(t, r.Verify(nil))
	id, err := r.ID()
	require.NoError(t, err)
	// Hashed by the writer as it writes: the same, and the same file.
	hashed := filepath.Join(dir, "hashed.kvmckpt")
	writeFile(t, hashed, h, Options{PageHashes: true, ChunkPages: 3, Workers: 3}, ram, used, []byte("dev"))
	hd, err := os.ReadFile(hashed)
	require.NoError(t, err)
	require.Equal(t, data, hd)
	_, err = Create(filepath.Join(dir, "z.kvmckpt"), h, Options{PageHashes: true, Key: testKey})
	require.ErrorContains(t, err, "cannot be encrypted")
	// Computed from the chunks, the hashes are the same.
	v1 := filepath.Join(dir, "v1.kvmckpt")
	writeFile(t, v1, h, Options{}, ram, used, []byte("dev"))
	r1, err := Open(v1)
	require.NoError(t, err)
	defer r1.Close()
	computed, err := r1.ComputePageSums(context.Background(), 2)
	require.NoError(t, err)
	require.Equal(t, cur.Sums, computed.Sums)

	// Every byte of the chain section and the trailer matters to Open or
	// to Verify; a CRC in it, or the trailer, to the ID.
	hashesEnd := len(data) - trailerLen
	for off := hashesEnd - 40; off < len(data); off++ {
		bad := bytes.Clone(data)
		bad[off] ^= 0x10
		rb, err := openBytes(bad)
		if err == nil {
			err = rb.Verify(nil)
		}
		require.Error(t, err, "byte %d", off)
	}
	for _, off := range []int{hashesEnd - 4, hashesEnd + 10} {
		bad := bytes.Clone(data)
		bad[off] ^= 0x10
		rb, err := NewReader(bytes.NewReader(bad), int64(len(bad)))
		if err != nil {
			continue // the trailer's own CRC
		}
		bid, err := rb.ID()
		require.NoError(t, err)
		require.NotEqual(t, id, bid, "byte %d", off)
	}
	// A stored page that is not in use, or a full file storing fewer
	// pages than it has in use, cannot be written.
	w, err := Create(filepath.Join(dir, "x.kvmckpt"), h, Options{InUse: cur})
	require.NoError(t, err)
	require.ErrorContains(t, w.WritePages(ram, pagemap.NewBitmap(16), nil), "stores every page")
	w.Abort()
	_, err = Create(filepath.Join(dir, "y.kvmckpt"), h, Options{InUse: cur, Key: testKey})
	require.ErrorContains(t, err, "cannot be encrypted")
}

// TestLiveChild: a live checkpoint with a parent (placed chunks, version
// 4) restores through its chain like any other child.
func TestLiveChild(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(32)
	ram := newRAM(&h, mixed)
	used := pagemap.NewBitmap(32)
	used.SetRange(0, 24)
	base := filepath.Join(dir, "base.kvmckpt")
	writeFile(t, base, h, Options{}, ram, used, []byte("dev"))

	// Pages 2 and 17 change, 30 comes into use; the chunks are put in
	// any order, one replaced.
	ram[0][2*PageSize] ^= 1
	ram[0][17*PageSize] ^= 1
	used.Set(30)
	c, err := OpenChain(base, ChainOptions{})
	require.NoError(t, err)
	hc := h
	hc.Parent, err = c.AsParent()
	require.NoError(t, err)
	ps, err := c.PageSums(context.Background())
	require.NoError(t, err)
	c.Close()
	cur, err := PageSums(context.Background(), ram, &h, used, HashOptions{})
	require.NoError(t, err)
	changed, err := pagehash.Changed(cur, ps, pagehash.Filled(PageSize, 0))
	require.NoError(t, err)
	require.Equal(t, uint64(3), changed.Count())

	path := filepath.Join(dir, "live.kvmckpt")
	l, err := CreateLive(path, hc, Options{ChunkPages: 4})
	require.NoError(t, err)
	defer l.Abort()
	pg := func(p uint64) []byte { return ram[0][p*PageSize : (p+1)*PageSize] }
	require.NoError(t, l.Put(7, []uint64{30}, pg(30)))
	require.NoError(t, l.Put(0, []uint64{2, 3}, append(bytes.Clone(pg(2)), pg(3)...)))
	require.NoError(t, l.Put(0, []uint64{2}, pg(2)))
	require.NoError(t, l.Put(4, []uint64{17}, pg(17)))
	_, err = l.WriteDeviceState(bytes.NewReader([]byte("dev live")))
	require.ErrorContains(t, err, "SetInUse", "a child needs its pages in use")

	l, err = CreateLive(path, hc, Options{ChunkPages: 4})
	require.NoError(t, err)
	defer l.Abort()
	require.NoError(t, l.Put(7, []uint64{30}, pg(30)))
	require.NoError(t, l.Put(0, []uint64{2}, pg(2)))
	require.NoError(t, l.Put(4, []uint64{17}, pg(17)))
	require.NoError(t, l.SetInUse(cur))
	_, err = l.WriteDeviceState(bytes.NewReader([]byte("dev live")))
	require.NoError(t, err)
	require.NoError(t, l.Commit())

	r, err := Open(path)
	require.NoError(t, err)
	require.Equal(t, LayoutPlaced, r.Header().Layout)
	require.NotNil(t, r.Parent())
	r.Close()
	require.Equal(t, expectedRAM(ram, used, 0), restoreChain(t, path, ChainOptions{}))
	ch, err := OpenChain(path, ChainOptions{})
	require.NoError(t, err)
	defer ch.Close()
	got, err := ch.PageSums(context.Background())
	require.NoError(t, err)
	require.Equal(t, cur.Sums, got.Sums)
}

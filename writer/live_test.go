package writer

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// liveFile writes a version 3 checkpoint the way a live save does: chunks
// put by group in rounds, some rewritten in place, some moved (grown past
// their extent), some dropped, and returns its bytes, the final RAM and
// the saved pages, and the stale contents that must not survive.
func liveFile(tb testing.TB, dir string, compression Compression, writeBehind bool) (data []byte, ram [][]byte, used *pagemap.Bitmap, stale [][]byte) {
	tb.Helper()
	h := testHeader(40, 24)
	h.CommandLine = nil
	total := uint64(64)
	ram = newRAM(&h, mixed)
	flat := func(p uint64) []byte {
		if p < 40 {
			return ram[0][p*PageSize : (p+1)*PageSize]
		}
		return ram[1][(p-40)*PageSize : (p-39)*PageSize]
	}
	const group = 8
	path := filepath.Join(dir, "live.kvmckpt")
	l, err := CreateLive(path, h, Options{ChunkPages: group, Compression: compression})
	require.NoError(tb, err)
	defer l.Abort()
	put := func(g uint64, pages []uint64) {
		var b []byte
		for _, p := range pages {
			require.Equal(tb, g, p/group)
			b = append(b, flat(p)...)
		}
		require.NoError(tb, l.Put(g, pages, b))
	}
	span := func(g uint64, skip ...uint64) []uint64 {
		var ps []uint64
	next:
		for p := g * group; p < (g+1)*group && p < total; p++ {
			for _, s := range skip {
				if p == s {
					continue next
				}
			}
			ps = append(ps, p)
		}
		return ps
	}
	// Round 1: every group.
	for g := range total / group {
		put(g, span(g))
	}
	require.NoError(tb, l.Sync())
	if writeBehind {
		// The rest as a live save's final round writes it.
		l.WriteBehind()
	}
	// Round 2: page 3 changes (group 0, same size: in place); group 2
	// turns from text into random data (grows: moved); group 5 is freed
	// (dropped); group 6 loses a page.
	stale = append(stale, bytes.Clone(flat(3)))
	fillPages(flat(3), incompressible, 99)
	for p := uint64(16); p < 24; p++ {
		stale = append(stale, bytes.Clone(flat(p)))
		fillPages(flat(p), incompressible, 100+p)
	}
	put(0, span(0))
	put(2, span(2))
	for p := uint64(40); p < 48; p++ {
		stale = append(stale, bytes.Clone(flat(p)))
	}
	require.NoError(tb, l.Drop(5))
	put(6, span(6, 50))
	// Round 3: group 2 changes again, in place now.
	fillPages(flat(17), incompressible, 7)
	put(2, span(2))
	// Round 4: group 7 stored raw, then one page of it patched in place;
	// a patch naming other pages than the chunk's is refused.
	group7 := func(pages []uint64) []byte {
		var b []byte
		for _, p := range pages {
			b = append(b, flat(p)...)
		}
		return b
	}
	require.NoError(tb, l.PutRaw(7, span(7), group7(span(7))))
	stale = append(stale, bytes.Clone(flat(60)))
	fillPages(flat(60), incompressible, 8)
	ok, err := l.Patch(7, span(7), group7(span(7)), []int{4})
	require.NoError(tb, err)
	require.True(tb, ok, "a raw chunk of the same pages is patched")
	ok, err = l.Patch(7, span(7, 61), group7(span(7, 61)), []int{4})
	require.NoError(tb, err)
	require.False(tb, ok, "a patch of other pages than the chunk's is refused")
	_, err = l.WriteDeviceState(bytes.NewReader([]byte("QEVM device state")))
	require.NoError(tb, err)
	require.NoError(tb, l.Commit())
	st := l.Stats()
	assert.Positive(tb, st.InPlace)
	assert.Equal(tb, 1, st.Patches)
	if compression == CompressionLZ4 {
		assert.Positive(tb, st.Moved, "a chunk that grew is moved")
	}
	data, err = os.ReadFile(path)
	require.NoError(tb, err)
	used = pagemap.NewBitmap(total)
	used.SetRange(0, total)
	used.ClearRange(40, 8)
	used.Clear(50)
	return data, ram, used, stale
}

func TestLiveRoundTrip(t *testing.T) {
	for _, c := range []struct {
		Compression
		writeBehind bool
	}{{CompressionLZ4, false}, {CompressionNone, false}, {CompressionNone, true}} {
		name := string(c.Compression)
		if c.writeBehind {
			name += "-write-behind"
		}
		t.Run(name, func(t *testing.T) {
			data, ram, used, stale := liveFile(t, t.TempDir(), c.Compression, c.writeBehind)
			r, err := openBytes(data)
			require.NoError(t, err)
			require.NoError(t, r.Verify(nil))
			assert.Equal(t, used.Count(), r.Header().Pages.Saved)
			assert.True(t, r.Bitmap().Equal(used), "the bitmap is the union of the last chunks")
			got := [][]byte{make([]byte, len(ram[0])), make([]byte, len(ram[1]))}
			require.NoError(t, r.RestorePages(got, RestoreOptions{}))
			want := expectedRAM(ram, used, 0)
			assert.True(t, bytes.Equal(want[0], got[0]) && bytes.Equal(want[1], got[1]), "restore gives each page's last content")
			if c.Compression == CompressionNone {
				// Raw pages would show as is: none of the replaced
				// or dropped contents may.
				for i, s := range stale {
					assert.False(t, bytes.Contains(data, s), "stale page %d survives in the file", i)
				}
			}
			var dev bytes.Buffer
			_, err = dev.ReadFrom(r.DeviceState())
			require.NoError(t, err)
			assert.Equal(t, "QEVM device state", dev.String())
		})
	}
}

// TestLiveFlipOneByte flips every byte of every part a reader uses (the
// gaps between placed chunks are holes, read by nobody) and checks that
// opening and verifying fails.
func TestLiveFlipOneByte(t *testing.T) {
	data, _, _, _ := liveFile(t, t.TempDir(), CompressionLZ4, true)
	r, err := openBytes(data)
	require.NoError(t, err)
	inUse := make([]bool, len(data))
	mark := func(off, n int64) {
		for i := off; i < off+n; i++ {
			inUse[i] = true
		}
	}
	n, _ := pagemap.EncodedLen(r.Header().Pages.Total)
	bitmapEnd := r.bitmapOff + int64(n) + crcLen
	mark(0, bitmapEnd) // header and bitmap; zeros up to the chunk area
	var chunkBytes []int64
	for i := range r.NumChunks() {
		c := r.Chunk(i)
		// Chunks: a sample of their bytes, first and last included
		// (every byte of each is under the same CRC).
		for o := c.Offset; o < c.Offset+int64(c.StoredLen); o += 97 {
			chunkBytes = append(chunkBytes, o)
		}
		chunkBytes = append(chunkBytes, c.Offset+int64(c.StoredLen)-1)
	}
	mark(int64(r.tr.indexOff), int64(len(data))-int64(r.tr.indexOff))
	for _, o := range chunkBytes {
		inUse[o] = true
	}
	flipped := 0
	for i, use := range inUse {
		if !use {
			continue
		}
		bad := bytes.Clone(data)
		bad[i] ^= 0x40
		if err := openAndVerify(bad); err == nil {
			t.Fatalf("a flipped byte at %#x went unnoticed", i)
		}
		flipped++
	}
	t.Logf("flipped %d bytes of %d", flipped, len(data))
}

func TestLiveRefuses(t *testing.T) {
	h := testHeader(16)
	_, err := CreateLive(filepath.Join(t.TempDir(), "x"), h, Options{Key: testKey})
	assert.Error(t, err, "a live checkpoint is not encrypted")
	l, err := CreateLive(filepath.Join(t.TempDir(), "x"), h, Options{ChunkPages: 4})
	require.NoError(t, err)
	defer l.Abort()
	page := make([]byte, PageSize)
	assert.Error(t, l.Put(0, []uint64{1, 0}, append(page, page...)), "pages not ascending")
	assert.Error(t, l.Put(0, []uint64{0, 1, 2, 3, 4}, bytes.Repeat(page, 5)), "more than chunk_pages")
	assert.Error(t, l.Put(0, []uint64{16}, page), "past the regions")
	assert.Error(t, l.Put(0, []uint64{0}, page[:10]), "short data")
	require.NoError(t, l.Put(0, []uint64{0, 1}, append(page, page...)))
	ok, err := l.Patch(0, []uint64{0, 1}, append(page, page...), []int{1})
	assert.NoError(t, err)
	assert.False(t, ok, "a compressed chunk is not patched")
	require.NoError(t, l.Put(1, []uint64{1}, page))
	_, err = l.WriteDeviceState(bytes.NewReader(nil))
	assert.ErrorContains(t, err, "overlap", "two chunks holding one page")
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(l.TempPath()), ".*"))
	assert.Empty(t, left, "a failed writer leaves no temporary file")
}

// TestLiveWriteBehindAbort checks that a writer whose write-back runs
// aborts cleanly: the goroutine ends, the temporary file is gone, and
// nothing is put after.
func TestLiveWriteBehindAbort(t *testing.T) {
	dir := t.TempDir()
	l, err := CreateLive(filepath.Join(dir, "x"), testHeader(16), Options{ChunkPages: 4})
	require.NoError(t, err)
	l.WriteBehind()
	page := make([]byte, PageSize)
	fillPages(page, incompressible, 1)
	require.NoError(t, l.PutRaw(0, []uint64{0, 1}, append(page, page...)))
	ok, err := l.Patch(0, []uint64{0, 1}, append(page, page...), []int{0, 1})
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, l.Abort())
	left, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, left, "no temporary file")
	assert.Error(t, l.Put(1, []uint64{4}, page), "aborted")
}

// TestLiveConcurrent puts, patches, moves and drops chunks of distinct
// keys from several goroutines at once, as a live save's round workers
// do, and checks that the committed file restores every page's last
// content (run it with -race).
func TestLiveConcurrent(t *testing.T) {
	const group, groups, workers = 8, 64, 4
	h := testHeader(group * groups)
	ram := newRAM(&h, mixed)[0]
	pages := func(g uint64) []uint64 {
		ps := make([]uint64, group)
		for i := range ps {
			ps[i] = g*group + uint64(i)
		}
		return ps
	}
	chunk := func(g uint64) []byte { return ram[g*group*PageSize : (g+1)*group*PageSize] }
	path := filepath.Join(t.TempDir(), "live.kvmckpt")
	l, err := CreateLive(path, h, Options{ChunkPages: group})
	require.NoError(t, err)
	defer l.Abort()
	l.WriteBehind()
	// Each worker owns the groups g with g%workers == w; the RAM it
	// changes is its own groups' too.
	var wg sync.WaitGroup
	for w := range uint64(workers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := w; g < groups; g += workers {
				assert.NoError(t, l.Put(g, pages(g), chunk(g)))
			}
			for g := w; g < groups; g += workers {
				switch g % 3 {
				case 0: // raw, then patched
					fillPages(chunk(g), incompressible, g)
					assert.NoError(t, l.PutRaw(g, pages(g), chunk(g)))
					fillPages(chunk(g)[2*PageSize:4*PageSize], incompressible, 1000+g)
					ok, err := l.Patch(g, pages(g), chunk(g), []int{2, 3})
					assert.NoError(t, err)
					assert.True(t, ok)
				case 1: // grows: moved
					fillPages(chunk(g), incompressible, 2000+g)
					assert.NoError(t, l.Put(g, pages(g), chunk(g)))
				case 2:
					assert.NoError(t, l.Drop(g))
				}
			}
		}()
	}
	wg.Wait()
	_, err = l.WriteDeviceState(bytes.NewReader([]byte("QEVM")))
	require.NoError(t, err)
	require.NoError(t, l.Commit())
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	r, err := openBytes(data)
	require.NoError(t, err)
	require.NoError(t, r.Verify(nil))
	got := [][]byte{make([]byte, len(ram))}
	require.NoError(t, r.RestorePages(got, RestoreOptions{}))
	for g := range uint64(groups) {
		want := chunk(g)
		if g%3 == 2 {
			want = make([]byte, len(want))
		}
		assert.True(t, bytes.Equal(want, got[0][g*group*PageSize:(g+1)*group*PageSize]), "group %d", g)
	}
}

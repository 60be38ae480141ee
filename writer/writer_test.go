package writer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

func TestRoundTrip(t *testing.T) {
	const n = 16 // chunk pages
	setRange := func(total uint64, ranges ...[2]uint64) func() *pagemap.Bitmap {
		return func() *pagemap.Bitmap {
			b := pagemap.NewBitmap(total)
			for _, r := range ranges {
				b.SetRange(r[0], r[1])
			}
			return b
		}
	}
	sparse := func() *pagemap.Bitmap {
		b := pagemap.NewBitmap(200)
		for p := uint64(0); p < 200; p += 3 {
			b.Set(p)
		}
		b.SetRange(100, 40)
		return b
	}
	tests := []struct {
		name    string
		regions []uint64 // pages per region
		used    func() *pagemap.Bitmap
		kind    dataKind
		comp    Compression
		fill    byte
	}{
		{name: "no pages", regions: []uint64{64}, used: setRange(64)},
		{name: "one page", regions: []uint64{64}, used: setRange(64, [2]uint64{5, 1})},
		{name: "chunk-1", regions: []uint64{64}, used: setRange(64, [2]uint64{1, n - 1})},
		{name: "chunk", regions: []uint64{64}, used: setRange(64, [2]uint64{0, n})},
		{name: "chunk+1", regions: []uint64{64}, used: setRange(64, [2]uint64{0, n + 1})},
		{name: "all pages", regions: []uint64{64}, used: setRange(64, [2]uint64{0, 64})},
		{name: "last page", regions: []uint64{64}, used: setRange(64, [2]uint64{63, 1})},
		{name: "sparse", regions: []uint64{200}, used: sparse},
		{name: "sparse incompressible", regions: []uint64{200}, used: sparse, kind: incompressible},
		{name: "sparse mixed", regions: []uint64{200}, used: sparse, kind: mixed},
		{name: "incompressible", regions: []uint64{64}, used: setRange(64, [2]uint64{0, 40}), kind: incompressible},
		{name: "mixed", regions: []uint64{64}, used: setRange(64, [2]uint64{3, 50}), kind: mixed},
		{name: "no compression", regions: []uint64{64}, used: setRange(64, [2]uint64{3, 50}), comp: CompressionNone},
		{name: "no compression sparse", regions: []uint64{200}, used: sparse, comp: CompressionNone},
		{name: "fill 0xaa", regions: []uint64{64}, used: setRange(64, [2]uint64{10, 20}), fill: 0xaa},
		{name: "fill 0xaa nothing saved", regions: []uint64{20}, used: setRange(20), fill: 0xaa},
		{name: "regions", regions: []uint64{10, 1, 30}, used: setRange(41, [2]uint64{0, 41}), kind: mixed},
		{name: "chunk across regions", regions: []uint64{10, 30}, used: setRange(40, [2]uint64{8, 4}, [2]uint64{20, 5})},
		{name: "region boundary gap", regions: []uint64{16, 16}, used: setRange(32, [2]uint64{0, 15}, [2]uint64{17, 15}), fill: 1},
	}
	for _, tt := range tests {
		for _, key := range [][]byte{nil, testKey} {
			name := tt.name
			if key != nil {
				name += "+aes"
			}
			t.Run(name, func(t *testing.T) { testRoundTrip(t, n, tt.regions, tt.used(), tt.kind, tt.comp, tt.fill, key) })
		}
	}
}

// testRoundTrip writes a checkpoint of the given pages, with chunks of n
// pages, and reads it back every way.
func testRoundTrip(t *testing.T, n uint32, regions []uint64, used *pagemap.Bitmap, kind dataKind, comp Compression, fill byte, key []byte) {
	h := testHeader(regions...)
	h.FillByte = fill
	ram := newRAM(&h, kind)
	dev := bytes.Repeat([]byte("device "), 1000)
	path := filepath.Join(t.TempDir(), "ckpt")
	var calls int
	w, err := Create(path, h, Options{ChunkPages: int(n), Compression: comp, Workers: 3, Key: key})
	require.NoError(t, err)
	defer w.Abort()
	var last uint64
	require.NoError(t, w.WritePages(ram, used, func(done, total uint64) {
		calls++
		assert.Equal(t, used.Count(), total)
		assert.Greater(t, done, last)
		last = done
	}))
	assert.Equal(t, used.Count(), last)
	_, err = w.WriteDeviceState(bytes.NewReader(dev))
	require.NoError(t, err)
	require.NoError(t, w.Commit())
	stats := w.Stats()

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.Equal(t, fi.Size(), stats.BytesWritten)
	assert.Equal(t, used.Count(), stats.PagesWritten)
	assert.Equal(t, int64(len(dev)), stats.DeviceStateBytes)
	nChunks := int(chunkCount(used.Count(), n))
	assert.Equal(t, nChunks, calls)
	assert.Equal(t, nChunks, stats.ChunksRaw+stats.ChunksLZ4)
	switch {
	case comp == CompressionNone || kind == incompressible:
		assert.Zero(t, stats.ChunksLZ4)
	case kind == compressible:
		assert.Zero(t, stats.ChunksRaw)
	}

	r, err := OpenKey(path, key)
	require.NoError(t, err)
	defer r.Close()
	assert.Equal(t, key != nil, r.Encrypted())
	require.NoError(t, r.Verify(nil))
	got := r.Header()
	assert.Equal(t, used.Count(), got.Pages.Saved)
	assert.Equal(t, used.Len(), got.Pages.Total)
	assert.Equal(t, h.Regions, got.Regions)
	assert.Equal(t, h.CommandLine, got.CommandLine)
	assert.True(t, h.Created.Equal(got.Created))
	assert.Equal(t, fill, got.FillByte)
	assert.True(t, used.Equal(r.Bitmap()))
	assert.Equal(t, nChunks, r.NumChunks())

	want := expectedRAM(ram, used, fill)

	// Into region memory, over garbage.
	dst := make([][]byte, len(ram))
	for i := range dst {
		dst[i] = bytes.Repeat([]byte{0x5a}, len(ram[i]))
	}
	require.NoError(t, r.RestorePages(dst, RestoreOptions{Workers: 2}))
	require.NoError(t, r.FillUnsaved(dst))
	assert.Equal(t, want, dst)

	// Through WriterAt, into the concatenation.
	flat := memWriterAt(bytes.Repeat([]byte{0x5a}, int(used.Len()*PageSize)))
	require.NoError(t, r.RestorePagesTo(flat, RestoreOptions{Workers: 1}))
	require.NoError(t, r.FillUnsavedTo(flat))
	assert.Equal(t, concat(want), []byte(flat))

	// Chunk by chunk.
	flatRAM := concat(ram)
	for i := range r.NumChunks() {
		c := r.Chunk(i)
		data, err := r.ReadChunk(i, nil)
		require.NoError(t, err)
		require.Len(t, data, int(c.RawLen))
		off := 0
		for start, count := range chunkRuns(used, c.FirstPage, c.Pages) {
			n := int(count * PageSize)
			assert.Equal(t, flatRAM[start*PageSize:][:n], data[off:off+n])
			off += n
		}
	}

	gotDev, err := io.ReadAll(r.DeviceState())
	require.NoError(t, err)
	assert.Equal(t, dev, gotDev)
	assert.Equal(t, int64(len(dev)), r.DeviceStateLen())
}

func TestRestoreProgress(t *testing.T) {
	h := testHeader(100)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(100)
	used.SetRange(0, 90)
	path := filepath.Join(t.TempDir(), "ckpt")
	writeFile(t, path, h, Options{ChunkPages: 8}, ram, used, nil)
	r, err := Open(path)
	require.NoError(t, err)
	defer r.Close()

	var last, calls uint64
	dst := make([][]byte, 1)
	dst[0] = make([]byte, 100*PageSize)
	require.NoError(t, r.RestorePages(dst, RestoreOptions{Workers: 4, Progress: func(done, total uint64) {
		calls++
		assert.Equal(t, uint64(90), total)
		assert.Greater(t, done, last)
		last = done
	}}))
	assert.Equal(t, uint64(90), last)
	assert.Equal(t, uint64(12), calls)

	var verified uint64
	require.NoError(t, r.Verify(func(done, total uint64) { verified = done }))
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, uint64(fi.Size()), verified)
}

func TestUnsavedRuns(t *testing.T) {
	h := testHeader(100)
	used := pagemap.NewBitmap(100)
	used.SetRange(10, 20)
	used.SetRange(50, 50)
	path := filepath.Join(t.TempDir(), "ckpt")
	writeFile(t, path, h, Options{}, newRAM(&h, compressible), used, nil)
	r, err := Open(path)
	require.NoError(t, err)
	defer r.Close()
	var runs [][2]uint64
	for start, count := range r.UnsavedRuns() {
		runs = append(runs, [2]uint64{start, count})
	}
	assert.Equal(t, [][2]uint64{{0, 10}, {30, 20}}, runs)
}

func TestWriterMisuse(t *testing.T) {
	dir := t.TempDir()
	h := testHeader(8)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(8)
	used.SetRange(0, 4)

	t.Run("create", func(t *testing.T) {
		tests := []struct {
			name string
			h    func(*Header)
			opts Options
		}{
			{name: "page size", h: func(h *Header) { h.PageSize = 8192 }},
			{name: "ragged region", h: func(h *Header) { h.Regions[0].Size++ }},
			{name: "empty region", h: func(h *Header) { h.Regions[0].Size = 0 }},
			{name: "mapping past region", h: func(h *Header) { h.Regions[0].Mappings[0].Size += PageSize }},
			{name: "unaligned mapping", h: func(h *Header) { h.Regions[0].Mappings[0].GPA++ }},
			{name: "mapping wraps", h: func(h *Header) { h.Regions[0].Mappings[0].GPA = 1<<64 - PageSize }},
			{name: "too many pages", h: func(h *Header) { h.Regions[0].Size = (MaxPages + 1) * PageSize }},
			{name: "count past total", h: func(h *Header) { h.Pages.Zero = 9 }},
			{name: "chunk pages", opts: Options{ChunkPages: MaxChunkPages + 1}},
			{name: "negative chunk pages", opts: Options{ChunkPages: -1}},
			{name: "compression", opts: Options{Compression: "zstd"}},
			{name: "device state limit", opts: Options{MaxDeviceState: -1}},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				h := testHeader(8)
				if tt.h != nil {
					tt.h(&h)
				}
				_, err := Create(filepath.Join(dir, "x"), h, tt.opts)
				require.Error(t, err)
				assertNoTemp(t, dir)
			})
		}
		_, err := Create(filepath.Join(dir, "missing", "x"), h, Options{})
		require.ErrorIs(t, err, os.ErrNotExist)
		_, err = Create(dir+"/", h, Options{})
		require.Error(t, err)
	})

	t.Run("order", func(t *testing.T) {
		path := filepath.Join(dir, "order")
		w, err := Create(path, h, Options{})
		require.NoError(t, err)
		defer w.Abort()
		_, err = w.WriteDeviceState(strings.NewReader("x"))
		require.Error(t, err)
		require.Error(t, w.Commit())
		require.NoError(t, w.WritePages(ram, used, nil))
		require.Error(t, w.WritePages(ram, used, nil))
		require.Error(t, w.Commit())
		_, err = w.WriteDeviceState(strings.NewReader("x"))
		require.NoError(t, err)
		require.NoError(t, w.Commit())
		require.Error(t, w.Commit())
		require.NoError(t, w.Abort())
		_, err = os.Stat(path)
		require.NoError(t, err, "Abort after Commit must keep the file")
	})

	t.Run("pages", func(t *testing.T) {
		w, err := Create(filepath.Join(dir, "pages"), h, Options{})
		require.NoError(t, err)
		defer w.Abort()
		require.Error(t, w.WritePages(ram, pagemap.NewBitmap(9), nil), "bitmap length")
		require.Error(t, w.WritePages(nil, used, nil), "no memory")
		require.Error(t, w.WritePages([][]byte{ram[0][:PageSize]}, used, nil), "short memory")
		// The writer is still usable after misuse that wrote nothing.
		require.NoError(t, w.WritePages(ram, used, nil))
		require.NoError(t, w.Abort())
		assertNoTemp(t, dir)
	})

	t.Run("device state too large", func(t *testing.T) {
		w, err := Create(filepath.Join(dir, "dev"), h, Options{MaxDeviceState: 10})
		require.NoError(t, err)
		require.NoError(t, w.WritePages(ram, used, nil))
		_, err = w.WriteDeviceState(strings.NewReader("01234567890"))
		require.ErrorIs(t, err, ErrTooLarge)
		assertNoTemp(t, dir)
		require.ErrorIs(t, w.Commit(), ErrTooLarge, "later calls report the failure")
		require.NoError(t, w.Abort())
	})

	t.Run("device state read error", func(t *testing.T) {
		w, err := Create(filepath.Join(dir, "dev"), h, Options{})
		require.NoError(t, err)
		require.NoError(t, w.WritePages(ram, used, nil))
		boom := errors.New("boom")
		_, err = w.WriteDeviceState(io.MultiReader(strings.NewReader("abc"), iotestErrReader{boom}))
		require.ErrorIs(t, err, boom)
		assertNoTemp(t, dir)
	})

	t.Run("header too large", func(t *testing.T) {
		h := testHeader(8)
		h.CommandLine = []string{strings.Repeat("x", MaxHeaderBody)}
		w, err := Create(filepath.Join(dir, "big"), h, Options{})
		require.NoError(t, err)
		require.ErrorIs(t, w.WritePages(ram, used, nil), ErrTooLarge)
		require.NoError(t, w.Abort())
		assertNoTemp(t, dir)
	})
}

type iotestErrReader struct{ err error }

func (r iotestErrReader) Read([]byte) (int, error) { return 0, r.err }

// assertNoTemp checks that dir holds no temporary checkpoint files.
func assertNoTemp(tb testing.TB, dir string) {
	tb.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(tb, err)
	for _, e := range entries {
		assert.NotContains(tb, e.Name(), tempInfix)
	}
}

// failingWriter fails every write after its first left bytes.
type failingWriter struct {
	w    io.Writer
	left int
}

var errDiskFull = errors.New("injected: no space left on device")

func (f *failingWriter) Write(p []byte) (int, error) {
	if len(p) > f.left {
		n, _ := f.w.Write(p[:f.left])
		f.left = 0
		return n, errDiskFull
	}
	f.left -= len(p)
	return f.w.Write(p)
}

func TestFailingDisk(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ckpt")
	h := testHeader(40)
	ram := newRAM(&h, incompressible)
	used := pagemap.NewBitmap(40)
	used.SetRange(0, 30)
	dev := bytes.Repeat([]byte{7}, 3000)

	// The checkpoint that must survive.
	writeFile(t, path, h, Options{ChunkPages: 4}, newRAM(&h, compressible), used, []byte("old"))
	old, err := os.ReadFile(path)
	require.NoError(t, err)

	probe := filepath.Join(t.TempDir(), "probe")
	full := int(writeFile(t, probe, h, Options{ChunkPages: 4}, ram, used, dev).BytesWritten)
	for _, limit := range []int{0, 1, 100, 2000, 5000, 20000, 60000, 100000, full - 3000, full - 10, full - 1} {
		t.Run("", func(t *testing.T) {
			w, err := Create(path, h, Options{ChunkPages: 4, Workers: 2})
			require.NoError(t, err)
			defer w.Abort()
			// A small buffer, so that failures surface in the step that
			// causes them.
			require.NoError(t, setDirect(w.f, false))
			w.bw.(*fileWriter).Close()
			w.bw = bufio.NewWriterSize(&failingWriter{w: w.f, left: limit}, 512)
			err = w.WritePages(ram, used, nil)
			if err == nil {
				_, err = w.WriteDeviceState(bytes.NewReader(dev))
			}
			if err == nil {
				err = w.Commit()
			}
			require.ErrorIs(t, err, errDiskFull, "limit %d of %d", limit, full)
			assertNoTemp(t, dir)
			got, err := os.ReadFile(path)
			require.NoError(t, err)
			require.Equal(t, old, got)
		})
	}
}

func TestAbortKeepsOld(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ckpt")
	h := testHeader(8)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(8)
	used.SetRange(0, 8)
	writeFile(t, path, h, Options{}, ram, used, []byte("old"))
	old, err := os.ReadFile(path)
	require.NoError(t, err)

	w, err := Create(path, h, Options{})
	require.NoError(t, err)
	fi, err := os.Lstat(w.TempPath())
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode())
	pid, ok := parseTempName("ckpt", filepath.Base(w.TempPath()))
	assert.True(t, ok)
	assert.Equal(t, os.Getpid(), pid)

	require.NoError(t, w.WritePages(ram, used, nil))
	_, err = w.WriteDeviceState(strings.NewReader("new"))
	require.NoError(t, err)
	require.NoError(t, w.Abort())
	require.NoError(t, w.Abort())
	assertNoTemp(t, dir)
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, old, got)
	require.Error(t, w.Commit())
}

func TestCreateRefusesNonRegularTarget(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	require.NoError(t, os.WriteFile(victim, []byte("precious"), 0o644))
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink(victim, link))
	sub := filepath.Join(dir, "sub")
	require.NoError(t, os.Mkdir(sub, 0o755))

	h := testHeader(8)
	for _, path := range []string{link, sub} {
		_, err := Create(path, h, Options{})
		require.Error(t, err, path)
	}
	got, err := os.ReadFile(victim)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(got))
	assertNoTemp(t, dir)
}

func TestCleanStale(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "vm.ckpt")

	// A pid that is certainly dead: a child we waited for.
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	dead := cmd.Process.Pid
	require.False(t, processAlive(dead))
	require.True(t, processAlive(os.Getpid()))
	require.True(t, processAlive(1), "pid 1 belongs to someone else but exists")

	name := func(pid int) string {
		return tempPrefix("vm.ckpt") + strconv.Itoa(pid) + "-0123456789abcdef"
	}
	files := map[string]bool{ // name: removed
		name(dead):        true,
		name(os.Getpid()): false,
		"vm.ckpt":         false,
		tempPrefix("other") + strconv.Itoa(dead) + "-0123456789abcdef":         false,
		tempPrefix("vm.ckpt") + strconv.Itoa(dead) + "-0123":                   false, // short random
		tempPrefix("vm.ckpt") + strconv.Itoa(dead) + "-0123456789ABCDEF":       false,
		tempPrefix("vm.ckpt") + "0" + strconv.Itoa(dead) + "-0123456789abcdef": false,
	}
	for f := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o600))
	}
	// A symlink and a directory with stale names are left alone.
	require.NoError(t, os.Symlink("vm.ckpt", filepath.Join(dir, name(dead)[:len(name(dead))-1]+"0")))
	require.NoError(t, os.Mkdir(filepath.Join(dir, name(dead)[:len(name(dead))-1]+"1"), 0o700))

	removed, err := CleanStale(target)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(dir, name(dead))}, removed)
	for f, gone := range files {
		_, err := os.Lstat(filepath.Join(dir, f))
		assert.Equal(t, gone, errors.Is(err, os.ErrNotExist), f)
	}
	_, err = os.Lstat(filepath.Join(dir, name(dead)[:len(name(dead))-1]+"0"))
	assert.NoError(t, err)
}

// mapFile maps size bytes of a new file of fileSize bytes shared.
func mapFile(tb testing.TB, size, fileSize int) []byte {
	tb.Helper()
	f, err := os.Create(filepath.Join(tb.TempDir(), "ram"))
	require.NoError(tb, err)
	defer f.Close()
	require.NoError(tb, f.Truncate(int64(fileSize)))
	mem, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(tb, err)
	tb.Cleanup(func() { unix.Munmap(mem) })
	return mem
}

func TestMemoryFault(t *testing.T) {
	h := testHeader(8)
	used := pagemap.NewBitmap(8)
	used.SetRange(0, 8)

	t.Run("write pages from a truncated file", func(t *testing.T) {
		dir := t.TempDir()
		ram := mapFile(t, 8*PageSize, 2*PageSize)
		w, err := Create(filepath.Join(dir, "ckpt"), h, Options{ChunkPages: 2})
		require.NoError(t, err)
		defer w.Abort()
		err = w.WritePages([][]byte{ram}, used, nil)
		require.ErrorContains(t, err, "memory fault")
		assertNoTemp(t, dir)
	})

	t.Run("a raw chunk copied by the writer out of a truncated file", func(t *testing.T) {
		// Workers leave raw chunks in ram for the writing goroutine to
		// copy: a fault there is an error as well.
		dir := t.TempDir()
		ram := mapFile(t, 8*PageSize, 2*PageSize)
		w, err := Create(filepath.Join(dir, "ckpt"), h, Options{ChunkPages: 2})
		require.NoError(t, err)
		defer w.Abort()
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		err = w.writeChunkSafe(&chunkJob{first: 4, pages: 2, out: ram[4*PageSize : 6*PageSize]})
		require.ErrorContains(t, err, "memory fault")
	})

	t.Run("restore to a truncated file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "ckpt")
		some := pagemap.NewBitmap(8)
		some.SetRange(0, 5)
		writeFile(t, path, h, Options{ChunkPages: 2}, newRAM(&h, mixed), some, nil)
		r, err := Open(path)
		require.NoError(t, err)
		defer r.Close()
		dst := mapFile(t, 8*PageSize, 2*PageSize)
		require.ErrorContains(t, r.RestorePages([][]byte{dst}, RestoreOptions{}), "memory fault")
		require.ErrorContains(t, r.FillUnsaved([][]byte{dst}), "memory fault")
	})
}

// TestZerosNotRead writes pages marked in Options.Zeros without reading
// them: here they cannot be read at all.
func TestZerosNotRead(t *testing.T) {
	const pages = 32
	h := testHeader(pages)
	h.FillByte = 0xaa
	ram, err := unix.Mmap(-1, 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Munmap(ram) })
	for i := range ram {
		ram[i] = byte(i/PageSize + 1)
	}
	zeros := pagemap.NewBitmap(pages)
	for _, r := range [][2]uint64{{0, 1}, {3, 4}, {15, 2}, {31, 1}} {
		zeros.SetRange(r[0], r[1])
		require.NoError(t, unix.Mprotect(ram[r[0]*PageSize:(r[0]+r[1])*PageSize], unix.PROT_NONE))
	}
	used := pagemap.NewBitmap(pages)
	used.SetRange(0, pages)
	used.ClearRange(20, 2)

	for _, comp := range []Compression{CompressionLZ4, CompressionNone} {
		t.Run(string(comp), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ckpt")
			writeFile(t, path, h, Options{ChunkPages: 4, Compression: comp, Zeros: zeros}, [][]byte{ram}, used, nil)
			r, err := Open(path)
			require.NoError(t, err)
			defer r.Close()
			got := make([]byte, pages*PageSize)
			require.NoError(t, r.RestorePages([][]byte{got}, RestoreOptions{}))
			require.NoError(t, r.FillUnsaved([][]byte{got}))
			for p := range uint64(pages) {
				page := got[p*PageSize:][:PageSize]
				switch {
				case !used.Test(p):
					assert.Equal(t, bytes.Repeat([]byte{0xaa}, PageSize), page, "page %d: unsaved, so filled", p)
				case zeros.Test(p):
					assert.Equal(t, make([]byte, PageSize), page, "page %d: known zero", p)
				default:
					assert.Equal(t, bytes.Repeat([]byte{byte(p + 1)}, PageSize), page, "page %d", p)
				}
			}
		})
	}

	w, err := Create(filepath.Join(t.TempDir(), "ckpt"), h, Options{Zeros: pagemap.NewBitmap(pages + 1)})
	require.NoError(t, err)
	defer w.Abort()
	require.ErrorContains(t, w.WritePages([][]byte{ram}, used, nil), "zero-page bitmap of 33 pages")
}

func TestWritePagesCancelled(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.kvmckpt")
	ram := make([]byte, 64<<20)
	for i := range ram {
		ram[i] = byte(i*7 + i>>12)
	}
	h := Header{Regions: []Region{{ID: "mem0", Size: uint64(len(ram))}}}
	w, err := Create(path, h, Options{ChunkPages: 16})
	require.NoError(t, err)
	defer w.Abort()
	used := pagemap.NewBitmap(uint64(len(ram)) / PageSize)
	used.SetRange(0, used.Len())
	ctx, cancel := context.WithCancel(context.Background())
	err = w.WritePagesContext(ctx, [][]byte{ram}, used, func(done, total uint64) {
		if done > total/4 {
			cancel()
		}
	})
	require.ErrorIs(t, err, context.Canceled)
	assert.Less(t, w.Stats().PagesWritten, used.Len(), "stopped early")
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries, "temporary file removed")
}

// TestDirectAndBufferedAgree writes the same checkpoint on a file system
// that takes O_DIRECT (the test's temporary directory, usually) and on
// tmpfs, which refuses it, across several direct blocks and a partial last
// one: both must read back and verify.
func TestDirectAndBufferedAgree(t *testing.T) {
	h := testHeader(3000) // 12 MiB of pages: three direct blocks and more
	ram := newRAM(&h, incompressible)
	used := pagemap.NewBitmap(3000)
	used.SetRange(0, 2999)
	dirs := []string{t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "kvmckpt-writer-test-")
		require.NoError(t, err)
		t.Cleanup(func() { os.RemoveAll(d) })
		dirs = append(dirs, d)
	}
	for _, dir := range dirs {
		path := filepath.Join(dir, "d.kvmckpt")
		writeFile(t, path, h, Options{Compression: CompressionNone}, ram, used, []byte("device state"))
		r, err := Open(path)
		require.NoError(t, err, dir)
		require.NoError(t, r.Verify(nil), dir)
		got := make([]byte, len(ram[0]))
		require.NoError(t, r.RestorePages([][]byte{got}, RestoreOptions{}))
		assert.True(t, bytes.Equal(ram[0][:2999*PageSize], got[:2999*PageSize]), dir)
		r.Close()
	}
}

// failingReader fails reads at or past page bad.
type failingReader struct {
	r   io.ReaderAt
	bad int64
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.bad*PageSize {
		return 0, errors.New("process gone")
	}
	return f.r.ReadAt(p, off)
}

// TestWritePagesFrom writes pages read through ReadAt (another process's
// memory) and checks the file is the one WritePages writes from the same
// memory mapped, byte for byte, in every encoding, with zero pages not
// read; a failing read fails the save and leaves no file.
func TestWritePagesFrom(t *testing.T) {
	h := testHeader(40, 25)
	ram := newRAM(&h, mixed)
	used := pagemap.NewBitmap(65)
	used.SetRange(0, 65)
	used.ClearRange(10, 3)
	used.ClearRange(39, 2) // across the regions
	zeros := pagemap.NewBitmap(65)
	zeros.SetRange(20, 2)
	for _, b := range ram {
		for p := range len(b) / PageSize {
			if p%5 == 0 {
				clear(b[p*PageSize : (p+1)*PageSize])
			}
		}
	}
	clear(ram[0][20*PageSize : 22*PageSize])
	flat := bytes.Join(ram, nil)
	for _, opts := range []Options{
		{ChunkPages: 8, Zeros: zeros},
		{ChunkPages: 8, Compression: CompressionNone},
		{ChunkPages: 16, Key: testKey},
	} {
		dir := t.TempDir()
		want := filepath.Join(dir, "mapped")
		writeFile(t, want, h, opts, ram, used, []byte("dev"))
		got := filepath.Join(dir, "read")
		w, err := Create(got, h, opts)
		require.NoError(t, err)
		require.NoError(t, w.WritePagesFrom(context.Background(), bytes.NewReader(flat), used, nil))
		_, err = w.WriteDeviceState(bytes.NewReader([]byte("dev")))
		require.NoError(t, err)
		require.NoError(t, w.Commit())
		a, err := os.ReadFile(want)
		require.NoError(t, err)
		b, err := os.ReadFile(got)
		require.NoError(t, err)
		if opts.Key == nil {
			// Same pages, same chunks: the same file (the salt and nonces
			// of an encrypted one differ).
			assert.True(t, bytes.Equal(a, b), "files differ for %+v", opts)
		}
		r, err := OpenKey(got, opts.Key)
		require.NoError(t, err)
		require.NoError(t, r.Verify(nil))
		out := [][]byte{make([]byte, len(ram[0])), make([]byte, len(ram[1]))}
		require.NoError(t, r.RestorePages(out, RestoreOptions{}))
		r.Close()
		for p := range uint64(65) {
			src, dst := flat[p*PageSize:][:PageSize], bytes.Join(out, nil)[p*PageSize:][:PageSize]
			if used.Test(p) {
				assert.Equal(t, src, dst, "page %d", p)
			}
		}
	}

	path := filepath.Join(t.TempDir(), "failed")
	w, err := Create(path, h, Options{ChunkPages: 8})
	require.NoError(t, err)
	err = w.WritePagesFrom(context.Background(), failingReader{bytes.NewReader(flat), 50}, used, nil)
	require.ErrorContains(t, err, "process gone")
	w.Abort()
	_, err = os.Stat(path)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

package writer

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// The seed corpus of FuzzOpen is small valid checkpoints. Regenerate it,
// after a deliberate format change, with
//
//	go test ./writer -run TestFuzzSeeds -args -update-seeds
var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/fuzz/FuzzOpen")

const seedDir = "testdata/fuzz/FuzzOpen"

// seedCheckpoints returns the checkpoints of the seed corpus by name. They
// are as small as can be, as the fuzzer is slow with large inputs: pages
// of a repeated pattern, which LZ4 shrinks to a few bytes, except where a
// raw chunk is the point.
func seedCheckpoints(tb testing.TB) map[string][]byte {
	tb.Helper()
	seeds := map[string][]byte{}
	write := func(name string, h Header, opts Options, used *pagemap.Bitmap, dev string) {
		ram := make([][]byte, len(h.Regions))
		for i, r := range h.Regions {
			ram[i] = bytes.Repeat([]byte(fmt.Sprintf("region %d ", i)), int(r.Size))[:r.Size]
		}
		path := filepath.Join(tb.TempDir(), name)
		writeFile(tb, path, h, opts, ram, used, []byte(dev))
		data, err := os.ReadFile(path)
		require.NoError(tb, err)
		seeds[name] = data
	}
	h := testHeader(4)
	h.CommandLine = nil
	write("empty", h, Options{}, pagemap.NewBitmap(4), "")
	used := pagemap.NewBitmap(4)
	used.SetRange(0, 1)
	used.SetRange(2, 2)
	write("lz4", h, Options{ChunkPages: 2}, used, "QEVM")
	h.FillByte = 0xaa
	used = pagemap.NewBitmap(4)
	used.Set(1)
	write("raw", h, Options{Compression: CompressionNone}, used, "dev")
	h = testHeader(2, 1, 2)
	h.CommandLine = nil
	used = pagemap.NewBitmap(5)
	used.SetRange(0, 5)
	used.Clear(3)
	write("regions", h, Options{ChunkPages: 3}, used, "")
	// Under testKey, which FuzzOpen tries: a raw chunk and an LZ4 one.
	h = testHeader(4)
	h.CommandLine = nil
	used = pagemap.NewBitmap(4)
	used.SetRange(0, 3)
	write("encrypted", h, Options{ChunkPages: 2, Key: testKey}, used, "QEVM")
	// Version 3, as a live save writes it: chunks placed out of page
	// order, one rewritten, one moved past a punched hole.
	h = testHeader(4)
	h.CommandLine = nil
	path := filepath.Join(tb.TempDir(), "live")
	l, err := CreateLive(path, h, Options{ChunkPages: 2})
	require.NoError(tb, err)
	defer l.Abort()
	page := func(s string) []byte { return bytes.Repeat([]byte(s), PageSize)[:PageSize] }
	require.NoError(tb, l.Put(1, []uint64{2, 3}, append(page("c"), page("d")...)))
	require.NoError(tb, l.Put(0, []uint64{0}, page("a")))
	require.NoError(tb, l.Put(0, []uint64{0, 1}, append(page("a"), page("b")...)))
	_, err = l.WriteDeviceState(strings.NewReader("QEVM"))
	require.NoError(tb, err)
	require.NoError(tb, l.Commit())
	data, err := os.ReadFile(path)
	require.NoError(tb, err)
	seeds["live"] = data
	// Version 4: a child storing one of the three pages it has in use.
	h = testHeader(4)
	h.CommandLine = nil
	used = pagemap.NewBitmap(4)
	used.SetRange(0, 3)
	sums := pagehash.New(used)
	for i := range sums.Sums {
		sums.Sums[i] = pagehash.Filled(PageSize, byte(i))
	}
	h.Parent = &Parent{ID: strings.Repeat("ab", 32), Name: "base.kvmckpt", Depth: 1}
	stored := pagemap.NewBitmap(4)
	stored.Set(1)
	write("chained", h, Options{InUse: sums}, stored, "QEVM")
	return seeds
}

func seedFile(data []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", data)
}

func parseSeedFile(tb testing.TB, text []byte) []byte {
	tb.Helper()
	s, ok := strings.CutPrefix(string(text), "go test fuzz v1\n[]byte(")
	require.True(tb, ok, "not a fuzz corpus file")
	s, ok = strings.CutSuffix(strings.TrimSpace(s), ")")
	require.True(tb, ok, "not a fuzz corpus file")
	data, err := strconv.Unquote(s)
	require.NoError(tb, err)
	return []byte(data)
}

// TestFuzzSeeds checks that the committed seeds are checkpoints this
// package reads, so they exercise more than the header checks and prove
// that files written earlier still open.
func TestFuzzSeeds(t *testing.T) {
	if *updateSeeds {
		require.NoError(t, os.MkdirAll(seedDir, 0o755))
		for name, data := range seedCheckpoints(t) {
			require.NoError(t, os.WriteFile(filepath.Join(seedDir, name), seedFile(data), 0o644))
		}
	}
	entries, err := os.ReadDir(seedDir)
	require.NoError(t, err)
	require.NotEmpty(t, entries)
	for _, e := range entries {
		text, err := os.ReadFile(filepath.Join(seedDir, e.Name()))
		require.NoError(t, err)
		data := parseSeedFile(t, text)
		err = openAndVerify(data)
		if errors.Is(err, ErrEncrypted) {
			err = openAndVerifyKey(data, testKey)
		}
		require.NoError(t, err, e.Name())
	}
}

// discardWriterAt is an io.WriterAt that discards.
type discardWriterAt struct{}

func (discardWriterAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// FuzzOpen reads a checkpoint as the restore path does, and checks that
// no input panics and every error is a *FormatError. It reads each input
// as is, and with its checksums recomputed, so that mutations get past the
// CRCs to the checks behind them (in an encrypted file, to
// authentication); each without a key and with testKey, the key of the
// encrypted seed.
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fixed := fixChecksums(bytes.Clone(data))
		for _, key := range [][]byte{nil, testKey} {
			readAll(t, data, key)
			readAll(t, fixed, key)
		}
	})
}

func readAll(t *testing.T, data, key []byte) {
	r, err := openBytesKey(data, key)
	requireFormatErrorOrNil(t, err)
	if err != nil {
		return
	}
	requireFormatErrorOrNil(t, r.Verify(nil))
	for i := range r.NumChunks() {
		_, err := r.ReadChunk(i, nil)
		requireFormatErrorOrNil(t, err)
	}
	_, err = io.Copy(io.Discard, r.DeviceState())
	requireFormatErrorOrNil(t, err)
	requireFormatErrorOrNil(t, r.RestorePagesTo(discardWriterAt{}, RestoreOptions{Workers: 2}))
	if r.HasPageSums() {
		_, err := r.PageSums()
		requireFormatErrorOrNil(t, err)
	}
	_, err = r.ID()
	requireFormatErrorOrNil(t, err)
	require.NoError(t, r.FillUnsavedTo(discardWriterAt{}))
}

// fixChecksums recomputes, as far as the layout in data allows, the
// checksums of a checkpoint, and returns data.
func fixChecksums(data []byte) []byte {
	le := binary.LittleEndian
	// put stores the CRC of data[off:off+n] at data[at:], if all in range.
	put := func(off, n, at uint64) {
		if off <= uint64(len(data)) && n <= uint64(len(data))-off && at <= uint64(len(data))-crcLen {
			le.PutUint32(data[at:], crc(data[off:off+n]))
		}
	}
	if len(data) < fixedHeaderLen+crcLen+trailerLen {
		return data
	}
	// In an encrypted file, the body, the bitmap, and the index that holds
	// the chunks' CRCs are sealed: only the CRCs of the header, index and
	// device state can be fixed, and the bitmap's stays right as long as
	// the bitmap is not mutated.
	sealed := le.Uint32(data[8:]) == versionSealed
	fixedLen := uint64(fixedHeaderLen)
	if sealed {
		fixedLen = sealedFixedHeaderLen
	}
	bodyLen := uint64(le.Uint32(data[12:]))
	hdrEnd := fixedLen + bodyLen
	put(0, hdrEnd, hdrEnd)
	var h Header
	if !sealed && hdrEnd <= uint64(len(data)) && json.Unmarshal(data[fixedLen:hdrEnd], &h) == nil {
		if n, ok := pagemap.EncodedLen(h.Pages.Total); ok {
			put(hdrEnd+crcLen, n, hdrEnd+crcLen+n)
		}
	}
	t := uint64(len(data) - trailerLen)
	indexOff, indexLen := le.Uint64(data[t:]), le.Uint64(data[t+8:])
	devOff, devLen := le.Uint64(data[t+16:]), le.Uint64(data[t+24:])
	for i := uint64(0); !sealed && i < indexLen/indexEntryLen && i < uint64(len(data)); i++ {
		if e := indexOff + i*indexEntryLen; e < t && indexEntryLen <= t-e {
			put(le.Uint64(data[e:]), uint64(le.Uint32(data[e+20:])), e+24)
		}
	}
	put(indexOff, indexLen, indexOff+indexLen)
	put(devOff, devLen, devOff+devLen)
	if le.Uint32(data[8:]) == versionChained && devOff+devLen+crcLen > devOff {
		if n, ok := pagemap.EncodedLen(h.Pages.Total); ok {
			inUse := devOff + devLen + crcLen
			put(inUse, n, inUse+n)
			if sums := inUse + n + crcLen; sums <= t-crcLen {
				put(sums, t-crcLen-sums, t-crcLen)
			}
		}
	}
	put(0, t, t+32)
	put(t, 36, t+36)
	return data
}

func requireFormatErrorOrNil(tb testing.TB, err error) {
	tb.Helper()
	var fe *FormatError
	if err != nil && !errors.As(err, &fe) {
		tb.Fatalf("error is not a *FormatError: %v", err)
	}
}

// TestFixChecksums checks that FuzzOpen's checksum repair works, so that
// the fuzzer does reach past the CRCs.
func TestFixChecksums(t *testing.T) {
	good := smallCheckpoint(t)
	r, err := openBytes(good)
	require.NoError(t, err)
	require.Equal(t, EncodingRaw, r.Chunk(1).Encoding)
	banner := int64(bytes.Index(good, []byte("Linux version")))
	require.Positive(t, banner)
	for _, off := range []int64{banner, r.Chunk(1).Offset, int64(r.tr.devOff)} {
		bad := bytes.Clone(good)
		bad[off] ^= 1
		require.Error(t, openAndVerify(bad))
		require.NoError(t, openAndVerify(fixChecksums(bad)), "offset %#x", off)
	}

	// In an encrypted file, fixed checksums get mutations as far as
	// authentication, which must stop them.
	good = smallCheckpointKey(t, testKey)
	r, err = openBytesKey(good, testKey)
	require.NoError(t, err)
	tests := []struct {
		off  int64
		part Part
	}{
		{sealedFixedHeaderLen + 5, PartHeader},
		{int64(r.tr.indexOff), PartIndex},
		{int64(r.tr.devOff), PartDeviceState},
	}
	for _, tt := range tests {
		bad := bytes.Clone(good)
		bad[tt.off] ^= 1
		err := openAndVerifyKey(fixChecksums(bad), testKey)
		requireFormatError(t, err, tt.part, 0, "offset %#x", tt.off)
		require.ErrorIs(t, err, ErrAuthFailed, "offset %#x", tt.off)
	}
}

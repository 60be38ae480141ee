package writer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// partAt returns the part of the checkpoint read by r that holds offset
// off, and the chunk number for chunks.
func partAt(r *Reader, off int64) (Part, int) {
	switch {
	case off < r.bitmapOff:
		return PartHeader, 0
	case off < r.chunksOff:
		return PartBitmap, 0
	case off < int64(r.tr.indexOff):
		for i, c := range r.chunks {
			if off < c.Offset+int64(c.StoredLen) {
				return PartChunk, i
			}
		}
	case off < int64(r.tr.devOff):
		return PartIndex, 0
	case off < r.size-trailerLen:
		return PartDeviceState, 0
	}
	return PartTrailer, 0
}

// requireFormatError checks that err is a *FormatError for part and chunk
// wrapping one of the sentinels.
func requireFormatError(tb testing.TB, err error, part Part, chunk int, msgAndArgs ...any) {
	tb.Helper()
	var fe *FormatError
	require.ErrorAs(tb, err, &fe, msgAndArgs...)
	require.Equal(tb, part.String(), fe.Part.String(), append(msgAndArgs, err)...)
	require.Equal(tb, chunk, fe.Index, msgAndArgs...)
	sentinel := false
	for _, s := range []error{ErrCorrupt, ErrTruncated, ErrBadMagic, ErrNewerVersion, ErrEncrypted, ErrNotEncrypted, ErrWrongKey} {
		sentinel = sentinel || errors.Is(err, s)
	}
	require.True(tb, sentinel, "%v wraps no sentinel", err)
}

func TestFlipOneByte(t *testing.T) {
	good := smallCheckpoint(t)
	r, err := openBytes(good)
	require.NoError(t, err)
	require.NoError(t, r.Verify(nil))
	require.Greater(t, r.NumChunks(), 2)

	flip := func(off int64) []byte {
		bad := bytes.Clone(good)
		bad[off] ^= 0xff
		return bad
	}
	last := r.chunks[len(r.chunks)-1]
	tests := []struct {
		name  string
		off   int64
		part  Part
		chunk int
		is    error
	}{
		{"header magic", 0, PartHeader, 0, ErrBadMagic},
		{"header version", 8, PartHeader, 0, ErrNewerVersion},
		{"header length", 14, PartHeader, 0, ErrCorrupt},
		{"header body", 40, PartHeader, 0, ErrCorrupt},
		{"header crc", r.bitmapOff - 1, PartHeader, 0, ErrCorrupt},
		{"bitmap count", r.bitmapOff, PartBitmap, 0, ErrCorrupt},
		{"bitmap words", r.bitmapOff + 8, PartBitmap, 0, ErrCorrupt},
		{"bitmap crc", r.chunksOff - 1, PartBitmap, 0, ErrCorrupt},
		{"first chunk", r.chunksOff, PartChunk, 0, ErrCorrupt},
		{"chunk 1", r.chunks[1].Offset + 7, PartChunk, 1, ErrCorrupt},
		{"last chunk", last.Offset + int64(last.StoredLen) - 1, PartChunk, len(r.chunks) - 1, ErrCorrupt},
		{"index", int64(r.tr.indexOff) + 3, PartIndex, 0, ErrCorrupt},
		{"index crc", int64(r.tr.devOff) - 1, PartIndex, 0, ErrCorrupt},
		{"device state", int64(r.tr.devOff), PartDeviceState, 0, ErrCorrupt},
		{"device state crc", r.size - trailerLen - 1, PartDeviceState, 0, ErrCorrupt},
		{"trailer offsets", r.size - trailerLen, PartTrailer, 0, ErrCorrupt},
		{"trailer file crc", r.size - trailerLen + 32, PartTrailer, 0, ErrCorrupt},
		{"trailer magic", r.size - 1, PartTrailer, 0, ErrTruncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := openAndVerify(flip(tt.off))
			requireFormatError(t, err, tt.part, tt.chunk)
			require.ErrorIs(t, err, tt.is)
		})
	}

	t.Run("every byte", func(t *testing.T) {
		for off := range int64(len(good)) {
			part, chunk := partAt(r, off)
			requireFormatError(t, openAndVerify(flip(off)), part, chunk, "offset %#x", off)
		}
	})
}

func TestCorruptChunkOnRead(t *testing.T) {
	good := smallCheckpoint(t)
	r, err := openBytes(good)
	require.NoError(t, err)
	c := r.Chunk(1)
	bad := bytes.Clone(good)
	bad[c.Offset] ^= 1
	r, err = openBytes(bad)
	require.NoError(t, err, "chunks are checked when read, not on open")

	_, err = r.ReadChunk(1, nil)
	requireFormatError(t, err, PartChunk, 1)
	_, err = r.ReadChunk(0, nil)
	require.NoError(t, err)

	h := r.Header()
	dst := [][]byte{make([]byte, h.Regions[0].Size), make([]byte, h.Regions[1].Size)}
	err = r.RestorePages(dst, RestoreOptions{})
	requireFormatError(t, err, PartChunk, 1)
	err = r.RestorePagesTo(memWriterAt(make([]byte, h.Pages.Total*PageSize)), RestoreOptions{})
	requireFormatError(t, err, PartChunk, 1)
}

func TestCorruptDeviceStateOnRead(t *testing.T) {
	good := smallCheckpoint(t)
	r, err := openBytes(good)
	require.NoError(t, err)
	bad := bytes.Clone(good)
	bad[r.tr.devOff+2] ^= 1
	r, err = openBytes(bad)
	require.NoError(t, err)
	_, err = io.ReadAll(r.DeviceState())
	requireFormatError(t, err, PartDeviceState, 0)
	require.ErrorIs(t, err, ErrCorrupt)
}

func TestTruncated(t *testing.T) {
	good := smallCheckpoint(t)
	for n := range len(good) {
		err := openAndVerify(good[:n])
		var fe *FormatError
		require.ErrorAs(t, err, &fe, "length %d", n)
		if n < len(good)-trailerLen {
			// Cut before the trailer: either a part is missing or the
			// trailer is.
			require.ErrorIs(t, err, ErrTruncated, "length %d", n)
		}
	}
	// Appending garbage loses the trailer too.
	requireFormatError(t, openAndVerify(append(bytes.Clone(good), 0)), PartTrailer, 0)
}

// setHeader rewrites the fixed header field at off of a copy of good.
func setHeader(good []byte, off int, v uint32) []byte {
	bad := bytes.Clone(good)
	binary.LittleEndian.PutUint32(bad[off:], v)
	return bad
}

func TestHeaderFields(t *testing.T) {
	good := smallCheckpoint(t)
	tests := []struct {
		name string
		data []byte
		is   error
	}{
		{"empty", nil, ErrTruncated},
		{"magic prefix", good[:5], ErrTruncated},
		{"wrong magic", append([]byte("KVMCKPU\x00"), good[8:]...), ErrBadMagic},
		{"short wrong magic", []byte("KX"), ErrBadMagic},
		{"newer version", setHeader(good, 8, FormatVersion+1), ErrNewerVersion},
		{"much newer version", setHeader(good, 8, 1<<31), ErrNewerVersion},
		{"version 0", setHeader(good, 8, 0), ErrCorrupt},
		{"body past end", setHeader(good, 12, uint32(len(good))), ErrTruncated},
		{"body past limit", setHeader(good, 12, MaxHeaderBody+1), ErrCorrupt},
		{"body huge", setHeader(good, 12, 1<<32-1), ErrCorrupt},
		{"body shorter", setHeader(good, 12, 10), ErrCorrupt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := openAndVerify(tt.data)
			requireFormatError(t, err, PartHeader, 0)
			require.ErrorIs(t, err, tt.is)
		})
	}
}

// TestConsistentButWrong rewrites parts with correct checksums but wrong
// contents, the way a buggy writer or a crafted file would, and checks
// that the cross-checks catch them.
func TestConsistentButWrong(t *testing.T) {
	good := smallCheckpoint(t)
	r, err := openBytes(good)
	require.NoError(t, err)

	// rewriteBytes changes the encoding of entry i and fixes the index CRC.
	rewriteBytes := func(i int, change func(b []byte)) []byte {
		bad := bytes.Clone(good)
		idx := bad[r.tr.indexOff : r.tr.indexOff+r.tr.indexLen]
		change(idx[i*indexEntryLen:][:indexEntryLen])
		binary.LittleEndian.PutUint32(bad[r.tr.devOff-crcLen:], crc(idx))
		return bad
	}
	// rewriteIndex changes entry i and fixes the index CRC.
	rewriteIndex := func(i int, change func(e *indexEntry)) []byte {
		return rewriteBytes(i, func(b []byte) {
			e, _ := parseIndexEntry(b)
			change(&e)
			e.append(b[:0])
		})
	}
	require.Equal(t, []Encoding{EncodingLZ4, EncodingRaw, EncodingLZ4},
		[]Encoding{r.chunks[0].Encoding, r.chunks[1].Encoding, r.chunks[2].Encoding})
	tests := []struct {
		name  string
		data  []byte
		part  Part
		chunk int
	}{
		{"chunk offset", rewriteIndex(1, func(e *indexEntry) { e.offset++ }), PartIndex, 0},
		{"first page", rewriteIndex(1, func(e *indexEntry) { e.firstPage++ }), PartIndex, 0},
		{"raw length", rewriteIndex(0, func(e *indexEntry) { e.rawLen += PageSize }), PartIndex, 0},
		{"stored length", rewriteIndex(2, func(e *indexEntry) { e.storedLen-- }), PartIndex, 0},
		{"stored past index", rewriteIndex(2, func(e *indexEntry) { e.storedLen = 1 << 31 }), PartIndex, 0},
		{"encoding", rewriteIndex(0, func(e *indexEntry) { e.encoding = 7 }), PartIndex, 0},
		{"reserved", rewriteBytes(0, func(b []byte) { b[30] = 1 }), PartIndex, 0},
		{"lz4 claimed raw", rewriteIndex(0, func(e *indexEntry) { e.encoding = EncodingRaw }), PartIndex, 0},
		// Plausible for the index, caught when the chunk is decoded.
		{"raw claimed lz4", rewriteIndex(1, func(e *indexEntry) { e.encoding = EncodingLZ4 }), PartChunk, 1},
		{"crc", rewriteIndex(1, func(e *indexEntry) { e.crc++ }), PartChunk, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := openAndVerify(tt.data)
			requireFormatError(t, err, tt.part, tt.chunk)
			assert.ErrorIs(t, err, ErrCorrupt)
		})
	}
}

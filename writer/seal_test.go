package writer

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// sealedPages returns a checkpoint encrypted under key of one region of 6
// pages of kind, made from seed, all saved, in 3 chunks of 2 pages, with
// device state dev.
func sealedPages(tb testing.TB, key []byte, kind dataKind, seed uint64, dev []byte) []byte {
	tb.Helper()
	h := testHeader(6)
	ram := [][]byte{make([]byte, 6*PageSize)}
	fillPages(ram[0], kind, seed)
	used := pagemap.NewBitmap(6)
	used.SetRange(0, 6)
	path := filepath.Join(tb.TempDir(), "ckpt")
	writeFile(tb, path, h, Options{ChunkPages: 2, Key: key}, ram, used, dev)
	data, err := os.ReadFile(path)
	require.NoError(tb, err)
	return data
}

// refreshSealed recomputes every checksum of the encrypted checkpoint data
// after an edit, as only a holder of the key can: it reseals the index with
// the CRCs of the chunks as they now are. layout is a Reader of the file
// before the edit; it gives the offsets and the file key. It shows that
// authentication, not the CRCs, catches the edit.
func refreshSealed(tb testing.TB, data []byte, layout *Reader) []byte {
	tb.Helper()
	r := layout
	var entries []byte
	for _, c := range r.chunks {
		e := indexEntry{
			offset:    uint64(c.Offset),
			firstPage: c.FirstPage,
			rawLen:    c.RawLen,
			storedLen: c.StoredLen,
			crc:       crc(data[c.Offset:][:c.StoredLen]),
			encoding:  c.Encoding,
		}
		entries = e.append(entries)
	}
	require.LessOrEqual(tb, len(entries), sealBlock, "one block of index")
	sealed := r.seal.seal(nil, entries, PartIndex, 0, true)
	require.Len(tb, sealed, int(r.tr.indexLen))
	copy(data[r.tr.indexOff:], sealed)

	le := binary.LittleEndian
	putCRC := func(off, n int64) { le.PutUint32(data[off+n:], crc(data[off:off+n])) }
	putCRC(0, r.bitmapOff-crcLen)
	putCRC(r.bitmapOff, r.chunksOff-crcLen-r.bitmapOff)
	putCRC(int64(r.tr.indexOff), int64(r.tr.indexLen))
	putCRC(int64(r.tr.devOff), int64(r.tr.devLen))
	t := len(data) - trailerLen
	le.PutUint32(data[t+32:], crc(data[:t]))
	le.PutUint32(data[t+36:], crc(data[t:t+36]))
	return data
}

func TestEncryptedKeys(t *testing.T) {
	sealed := smallCheckpointKey(t, testKey)
	plain := smallCheckpoint(t)
	dir := t.TempDir()
	sealedPath, plainPath := filepath.Join(dir, "sealed"), filepath.Join(dir, "plain")
	require.NoError(t, os.WriteFile(sealedPath, sealed, 0o600))
	require.NoError(t, os.WriteFile(plainPath, plain, 0o600))

	t.Run("right key", func(t *testing.T) {
		r, err := OpenKey(sealedPath, testKey)
		require.NoError(t, err)
		defer r.Close()
		assert.True(t, r.Encrypted())
		require.NoError(t, r.Verify(nil))
	})
	t.Run("no key", func(t *testing.T) {
		// Verify is a method of a Reader, so it needs the key too: an
		// encrypted file has no keyless check.
		_, err := Open(sealedPath)
		requireFormatError(t, err, PartHeader, 0)
		require.ErrorIs(t, err, ErrEncrypted)
		require.ErrorContains(t, err, "give the key with --encrypt-key FILE")
		_, err = openBytes(sealed)
		require.ErrorIs(t, err, ErrEncrypted)
	})
	t.Run("wrong key", func(t *testing.T) {
		_, err := OpenKey(sealedPath, otherKey)
		requireFormatError(t, err, PartHeader, 0)
		require.ErrorIs(t, err, ErrWrongKey)
		require.NotErrorIs(t, err, ErrCorrupt)
	})
	t.Run("key for a plain file", func(t *testing.T) {
		// A forged plain file must not pass for an encrypted one.
		_, err := OpenKey(plainPath, testKey)
		requireFormatError(t, err, PartHeader, 0)
		require.ErrorIs(t, err, ErrNotEncrypted)
		r, err := Open(plainPath)
		require.NoError(t, err)
		assert.False(t, r.Encrypted())
		r.Close()
	})
	t.Run("key length", func(t *testing.T) {
		for _, key := range [][]byte{{}, testKey[:16], append(bytes.Clone(testKey), 0)} {
			_, err := OpenKey(sealedPath, key)
			require.ErrorContains(t, err, "want 32", "key of %d bytes", len(key))
			h := testHeader(8)
			_, err = Create(filepath.Join(dir, "x"), h, Options{Key: key})
			require.ErrorContains(t, err, "want 32", "key of %d bytes", len(key))
			assertNoTemp(t, dir)
		}
	})
}

func TestEncryptedTamper(t *testing.T) {
	dev := bytes.Repeat([]byte("device "), 100)
	// Two files under the same key, with raw chunks all of one size, so
	// that chunks can be swapped.
	good := sealedPages(t, testKey, incompressible, 0, dev)
	other := sealedPages(t, testKey, incompressible, 1, dev)
	r, err := openBytesKey(good, testKey)
	require.NoError(t, err)
	ro, err := openBytesKey(other, testKey)
	require.NoError(t, err)
	require.Equal(t, 3, r.NumChunks())
	c0, c1 := r.Chunk(0), r.Chunk(1)
	require.Equal(t, c0.StoredLen, c1.StoredLen)
	for i := range r.chunks {
		require.Equal(t, r.chunks[i].Offset, ro.chunks[i].Offset)
	}
	require.Equal(t, r.tr.devOff, ro.tr.devOff)

	// edit changes a copy of good and fixes all its CRCs with the key.
	edit := func(change func(b []byte)) []byte {
		bad := bytes.Clone(good)
		change(bad)
		return refreshSealed(t, bad, r)
	}
	flip := func(off int64) func(b []byte) { return func(b []byte) { b[off] ^= 1 } }
	// flipFixed flips a byte and fixes the CRCs that need no key.
	flipFixed := func(off int64) []byte {
		bad := bytes.Clone(good)
		bad[off] ^= 1
		return fixChecksums(bad)
	}
	flipOnly := func(off int64) []byte {
		bad := bytes.Clone(good)
		bad[off] ^= 1
		return bad
	}
	tests := []struct {
		name  string
		data  []byte
		part  Part
		chunk int
		is    error
	}{
		{"header body", edit(flip(sealedFixedHeaderLen + 10)), PartHeader, 0, ErrAuthFailed},
		{"header body tag", edit(flip(r.bitmapOff - crcLen - 1)), PartHeader, 0, ErrAuthFailed},
		{"header body, crc not fixed", flipOnly(sealedFixedHeaderLen + 10), PartHeader, 0, ErrCorrupt},
		{"cipher", edit(flip(16)), PartHeader, 0, ErrCorrupt},
		{"salt", edit(flip(20)), PartHeader, 0, ErrWrongKey},
		{"key check", edit(flip(sealedFixedHeaderLen - 1)), PartHeader, 0, ErrWrongKey},
		{"header of another file", edit(func(b []byte) { copy(b, other[:r.bitmapOff]) }), PartBitmap, 0, ErrAuthFailed},
		{"bitmap", edit(flip(r.bitmapOff + 3)), PartBitmap, 0, ErrAuthFailed},
		{"chunk", edit(flip(c1.Offset + 100)), PartChunk, 1, ErrAuthFailed},
		{"chunk tag", edit(flip(c1.Offset + int64(c1.StoredLen) - 1)), PartChunk, 1, ErrAuthFailed},
		{"chunk, crc not fixed", flipOnly(c1.Offset + 100), PartChunk, 1, ErrCorrupt},
		{"swapped chunks", edit(func(b []byte) {
			copy(b[c0.Offset:], good[c1.Offset:][:c1.StoredLen])
			copy(b[c1.Offset:], good[c0.Offset:][:c0.StoredLen])
		}), PartChunk, 0, ErrAuthFailed},
		{"chunk of another file", edit(func(b []byte) {
			copy(b[c1.Offset:], other[c1.Offset:][:c1.StoredLen])
		}), PartChunk, 1, ErrAuthFailed},
		{"index", flipFixed(int64(r.tr.indexOff) + 1), PartIndex, 0, ErrAuthFailed},
		{"device state", flipFixed(int64(r.tr.devOff) + 5), PartDeviceState, 0, ErrAuthFailed},
		{"device state, crc not fixed", flipOnly(int64(r.tr.devOff) + 5), PartDeviceState, 0, ErrAuthFailed},
		{"device state of another file", edit(func(b []byte) {
			copy(b[r.tr.devOff:], other[r.tr.devOff:][:r.tr.devLen])
		}), PartDeviceState, 0, ErrAuthFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.False(t, bytes.Equal(good, tt.data), "no change")
			err := openAndVerifyKey(tt.data, testKey)
			requireFormatError(t, err, tt.part, tt.chunk)
			require.ErrorIs(t, err, tt.is)
			if tt.is != ErrAuthFailed {
				require.NotErrorIs(t, err, ErrAuthFailed, "an accident is no failed authentication")
			}
		})
	}

	// refreshSealed would reseal the index, so this edit has its CRCs
	// fixed without the key.
	t.Run("index of another file", func(t *testing.T) {
		bad := bytes.Clone(good)
		copy(bad[r.tr.indexOff:r.tr.devOff], other[r.tr.indexOff:r.tr.devOff])
		err := openAndVerifyKey(fixChecksums(bad), testKey)
		requireFormatError(t, err, PartIndex, 0)
		require.ErrorIs(t, err, ErrAuthFailed)
	})

	t.Run("read paths", func(t *testing.T) {
		bad, err := openBytesKey(edit(flip(c1.Offset+100)), testKey)
		require.NoError(t, err, "chunks are authenticated when read, not on open")
		_, err = bad.ReadChunk(0, nil)
		require.NoError(t, err)
		_, err = bad.ReadChunk(1, nil)
		requireFormatError(t, err, PartChunk, 1)
		require.ErrorIs(t, err, ErrAuthFailed)
		dst := [][]byte{make([]byte, 6*PageSize)}
		err = bad.RestorePages(dst, RestoreOptions{Workers: 2})
		requireFormatError(t, err, PartChunk, 1)
		require.ErrorIs(t, err, ErrAuthFailed)
		err = bad.RestorePagesTo(memWriterAt(dst[0]), RestoreOptions{Workers: 1})
		requireFormatError(t, err, PartChunk, 1)
		require.ErrorIs(t, err, ErrAuthFailed)

		bad, err = openBytesKey(flipOnly(int64(r.tr.devOff)+5), testKey)
		require.NoError(t, err)
		got, err := io.ReadAll(bad.DeviceState())
		requireFormatError(t, err, PartDeviceState, 0)
		require.ErrorIs(t, err, ErrAuthFailed)
		assert.Empty(t, got, "nothing of a block that does not authenticate is delivered")
	})
}

// TestEncryptedDeviceState checks device states of more than one sealed
// block, and that blocks cannot be dropped or reordered.
func TestEncryptedDeviceState(t *testing.T) {
	for _, n := range []int{0, 1, sealBlock - 1, sealBlock, sealBlock + 1, 2 * sealBlock} {
		dev := make([]byte, n)
		fillPages(dev, incompressible, uint64(n))
		data := sealedPages(t, testKey, compressible, 0, dev)
		r, err := openBytesKey(data, testKey)
		require.NoError(t, err)
		require.Equal(t, int64(n), r.DeviceStateLen())
		require.Equal(t, sealedLen(uint64(n)), r.tr.devLen)
		require.NoError(t, r.Verify(nil))
		got, err := io.ReadAll(r.DeviceState())
		require.NoError(t, err, "%d bytes", n)
		require.Equal(t, dev, got, "%d bytes", n)
		if n != 2*sealBlock {
			continue
		}

		// Two full blocks: swap them; drop the last one.
		const block = sealBlock + tagLen
		dOff := int64(r.tr.devOff)
		swapped := bytes.Clone(data)
		copy(swapped[dOff:], data[dOff+block:][:block])
		copy(swapped[dOff+block:], data[dOff:][:block])
		cut := bytes.Clone(data[:dOff+block])
		cut = binary.LittleEndian.AppendUint32(cut, crc(cut[dOff:]))
		tr := r.tr
		tr.devLen = block
		tr.fileCRC = crc(cut)
		cut = tr.append(cut)
		for name, bad := range map[string][]byte{"swapped": fixChecksums(swapped), "last block dropped": cut} {
			r, err := openBytesKey(bad, testKey)
			require.NoError(t, err, name)
			_, err = io.ReadAll(r.DeviceState())
			requireFormatError(t, err, PartDeviceState, 0, name)
			require.ErrorIs(t, err, ErrAuthFailed, name)
			err = r.Verify(nil)
			requireFormatError(t, err, PartDeviceState, 0, name)
			require.ErrorIs(t, err, ErrAuthFailed, name)
		}
	}
}

// TestEncryptedFlipOneByte is TestFlipOneByte for an encrypted file: every
// byte matters, and a flip is reported in its part.
func TestEncryptedFlipOneByte(t *testing.T) {
	good := smallCheckpointKey(t, testKey)
	r, err := openBytesKey(good, testKey)
	require.NoError(t, err)
	require.NoError(t, r.Verify(nil))
	for off := range int64(len(good)) {
		bad := bytes.Clone(good)
		bad[off] ^= 0xff
		part, chunk := partAt(r, off)
		requireFormatError(t, openAndVerifyKey(bad, testKey), part, chunk, "offset %#x", off)
	}
}

// TestEncryptedNoPlaintext checks that an encrypted file holds nothing of
// the guest's pages, device state or header in the clear.
func TestEncryptedNoPlaintext(t *testing.T) {
	marker := make([]byte, 64)
	rand.Read(marker)
	h := testHeader(64)
	ram := newRAM(&h, mixed)
	for _, off := range []int{0, 5*PageSize + 123, 40*PageSize - 32, 64*PageSize - 64} {
		copy(ram[0][off:], marker)
	}
	used := pagemap.NewBitmap(64)
	used.SetRange(0, 64)
	dev := append(bytes.Repeat([]byte("device "), 100), marker...)
	secrets := [][]byte{
		marker,
		[]byte(h.KernelBanner),
		[]byte(h.Regions[0].MemPath),
		[]byte(`"page_size"`),
		[]byte("qemu-system-x86_64"),
	}
	for _, comp := range []Compression{CompressionLZ4, CompressionNone} {
		t.Run(string(comp), func(t *testing.T) {
			dir := t.TempDir()
			for _, key := range [][]byte{nil, testKey} {
				path := filepath.Join(dir, "ckpt")
				writeFile(t, path, h, Options{Compression: comp, ChunkPages: 16, Key: key}, ram, used, dev)
				data, err := os.ReadFile(path)
				require.NoError(t, err)
				for _, s := range secrets {
					// Without a key, the test must see what it looks for.
					assert.Equal(t, key == nil, bytes.Contains(data, s), "key %v: %q", key != nil, s)
				}
			}
		})
	}
}

func TestLoadKeyFile(t *testing.T) {
	dir := t.TempDir()
	hexKey := hex.EncodeToString(testKey)
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		err     string // "" for success
	}{
		{"raw", string(testKey), 0o600, ""},
		{"raw read-only", string(testKey), 0o400, ""},
		{"hex", hexKey, 0o600, ""},
		{"hex newline", hexKey + "\n", 0o600, ""},
		{"hex crlf", hexKey + "\r\n", 0o600, ""},
		{"hex upper", strings.ToUpper(hexKey) + "\n", 0o600, ""},
		{"empty", "", 0o600, "0 bytes: want 32 raw bytes, or 64 hex digits"},
		{"short", string(testKey[:31]), 0o600, "31 bytes"},
		{"raw newline", string(testKey) + "\n", 0o600, "33 bytes, 32 before the newline"},
		{"short hex", hexKey[:62] + "\n", 0o600, "63 bytes, 62 before the newline"},
		{"long hex", hexKey + "00", 0o600, "66 bytes"},
		{"not hex", strings.Repeat("g", 64), 0o600, "64 characters but not hex digits"},
		{"huge", strings.Repeat("0", 1<<20), 0o600, "more than 66 bytes"},
		{"group readable", string(testKey), 0o640, "mode 0640 lets group or others access it: chmod 600"},
		{"world readable", hexKey, 0o604, "chmod 600"},
		{"group writable", hexKey, 0o620, "chmod 600"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, tt.name)
			require.NoError(t, os.WriteFile(path, []byte(tt.content), 0o600))
			require.NoError(t, os.Chmod(path, tt.mode))
			key, err := LoadKeyFile(path)
			if tt.err == "" {
				require.NoError(t, err)
				require.Equal(t, testKey, key)
				return
			}
			require.ErrorContains(t, err, tt.err)
			require.ErrorContains(t, err, path)
			require.Nil(t, key)
		})
	}
	_, err := LoadKeyFile(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
	sub := filepath.Join(dir, "sub")
	require.NoError(t, os.Mkdir(sub, 0o700))
	_, err = LoadKeyFile(sub)
	require.ErrorContains(t, err, "not a regular file")
}

func TestSealedLen(t *testing.T) {
	for _, n := range []uint64{0, 1, sealBlock - 1, sealBlock, sealBlock + 1, 3*sealBlock + 5} {
		got, ok := openedLen(sealedLen(n))
		require.True(t, ok, "%d", n)
		require.Equal(t, n, got)
	}
	for _, s := range []uint64{0, tagLen - 1, sealBlock + tagLen + 1, sealBlock + 2*tagLen - 1} {
		_, ok := openedLen(s)
		require.False(t, ok, "%d", s)
	}
}

package profiles

import (
	"bytes"
	"encoding/binary"
	"slices"
	"testing"

	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/stretchr/testify/require"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// sizeAppend appends the uncompressed size as scripts/Makefile.lib does.
func sizeAppend(stream []byte, n int) []byte {
	return binary.LittleEndian.AppendUint32(bytes.Clone(stream), uint32(n))
}

func TestDecompressFixtures(t *testing.T) {
	want := readTestdata(t, "payload.bin")
	for _, tc := range []struct{ file, format string }{
		{"payload.bin.gzip", "gzip"},
		{"payload.bin.bzip2", "bzip2"},
		{"payload.bin.lzma", "lzma"},
		{"payload.bin.xz", "xz"},
		{"payload.bin.xz-crc64", "xz"},
		{"payload.bin.lz4", "lz4"},
		{"payload.bin.zstd", "zstd"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			got, format, err := decompressPayload(readTestdata(t, tc.file), 1<<20)
			require.NoError(t, err)
			require.Equal(t, tc.format, format)
			require.Equal(t, want, got)
		})
	}
}

// TestDecompressGenerated round-trips data through the Go encoders of the
// libraries the decoders use.
func TestDecompressGenerated(t *testing.T) {
	want := bytes.Repeat([]byte("node_data page_offset_base \xe8\x00\x00\x00\x00"), 4000)
	enc := map[string]func(tb testing.TB) []byte{
		"gzip": func(tb testing.TB) []byte {
			var b bytes.Buffer
			w := kgzip.NewWriter(&b)
			_, err := w.Write(want)
			require.NoError(tb, err)
			require.NoError(tb, w.Close())
			return b.Bytes()
		},
		"zstd": func(tb testing.TB) []byte {
			e, err := zstd.NewWriter(nil)
			require.NoError(tb, err)
			return sizeAppend(e.EncodeAll(want, nil), len(want))
		},
		"lz4": func(tb testing.TB) []byte {
			out := binary.LittleEndian.AppendUint32(nil, lz4LegacyMagic)
			for chunk := range slices.Chunk(want, 50000) {
				dst := make([]byte, lz4.CompressBlockBound(len(chunk)))
				n, err := lz4.CompressBlock(chunk, dst, nil)
				require.NoError(tb, err)
				out = binary.LittleEndian.AppendUint32(out, uint32(n))
				out = append(out, dst[:n]...)
			}
			return sizeAppend(out, len(want))
		},
		"lzma": func(tb testing.TB) []byte {
			var b bytes.Buffer
			w, err := lzma.NewWriter(&b)
			require.NoError(tb, err)
			_, err = w.Write(want)
			require.NoError(tb, err)
			require.NoError(tb, w.Close())
			return sizeAppend(b.Bytes(), len(want))
		},
		"xz": func(tb testing.TB) []byte {
			var b bytes.Buffer
			w, err := xz.WriterConfig{BlockSize: 32 << 10}.NewWriter(&b) // several blocks
			require.NoError(tb, err)
			_, err = w.Write(want)
			require.NoError(tb, err)
			require.NoError(tb, w.Close())
			return sizeAppend(b.Bytes(), len(want))
		},
	}
	for name, f := range enc {
		t.Run(name, func(t *testing.T) {
			got, format, err := decompressPayload(f(t), 1<<20)
			require.NoError(t, err)
			require.Equal(t, name, format)
			require.Equal(t, want, got)

			_, _, err = decompressPayload(f(t), len(want)-1)
			require.ErrorIs(t, err, ErrTooLarge)
		})
	}
}

func TestDecompressErrors(t *testing.T) {
	xzFix := readTestdata(t, "payload.bin.xz")
	flip := func(b []byte, i int) []byte {
		b = bytes.Clone(b)
		b[i] ^= 0x40
		return b
	}
	for _, tc := range []struct {
		name    string
		payload []byte
		want    error
	}{
		{"short", []byte{0x1f, 0x8b, 0}, ErrMalformed},
		{"unknown magic", []byte("ELF?ELF?ELF?"), ErrUnsupportedCompression},
		{"lzo", append([]byte{0x89, 'L', 'Z', 'O', 0, 0x0d, 0x0a, 0x1a}, 0, 0, 0, 0), ErrUnsupportedCompression},
		{"wrong size trailer", sizeAppend(xzFix[:len(xzFix)-4], 7), ErrMalformed},
		{"truncated xz", xzFix[:len(xzFix)/2], ErrMalformed},
		{"xz data flipped", flip(xzFix, 200), ErrMalformed},
		{"xz header flipped", flip(xzFix, 13), ErrMalformed},
		{"truncated lz4", readTestdata(t, "payload.bin.lz4")[:300], ErrMalformed},
		{"truncated zstd", readTestdata(t, "payload.bin.zstd")[:300], ErrMalformed},
		{"truncated gzip", readTestdata(t, "payload.bin.gzip")[:300], ErrMalformed},
		{"truncated bzip2", readTestdata(t, "payload.bin.bzip2")[:300], ErrMalformed},
		{"truncated lzma", readTestdata(t, "payload.bin.lzma")[:300], ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := decompressPayload(tc.payload, 1<<20)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

func TestBCJX86(t *testing.T) {
	// A CALL at position 16 whose encoded (absolute) target is 0x100 goes
	// back to the relative 0x100 - (16 + 5).
	buf := make([]byte, 32)
	buf[16] = 0xe8
	binary.LittleEndian.PutUint32(buf[17:], 0x100)
	bcjX86Decode(buf, 0)
	require.Equal(t, uint32(0x100-21), binary.LittleEndian.Uint32(buf[17:]))
	// Operands whose top byte is not 0x00/0xff are not converted.
	buf = make([]byte, 32)
	buf[3] = 0xe9
	binary.LittleEndian.PutUint32(buf[4:], 0x12345678)
	bcjX86Decode(buf, 0)
	require.Equal(t, uint32(0x12345678), binary.LittleEndian.Uint32(buf[4:]))
	// Short buffers are left alone.
	short := []byte{0xe8, 1, 2, 3}
	bcjX86Decode(short, 0)
	require.Equal(t, []byte{0xe8, 1, 2, 3}, short)
}

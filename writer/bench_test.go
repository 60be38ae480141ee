package writer

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

const benchRAM = 256 << 20

// benchGuest returns 256 MiB of guest memory, page by page a quarter each
// of random bytes (encrypted or compressed data), text, and mostly-zero
// pages with a few values (page tables, sparse structs), and a used-page
// bitmap with about 1/8 of the pages cleared in runs, as free pages are.
func benchGuest(tb testing.TB) (Header, [][]byte, *pagemap.Bitmap) {
	tb.Helper()
	h := testHeader(benchRAM / PageSize)
	ram := make([]byte, benchRAM)
	src := rand.NewChaCha8([32]byte{42})
	rng := rand.New(src)
	for p := 0; p < len(ram); p += PageSize {
		page := ram[p : p+PageSize]
		switch p / PageSize % 4 {
		case 0:
			src.Read(page)
		case 1, 2:
			fillPages(page, compressible, uint64(p))
		case 3:
			for range 32 {
				page[rng.IntN(PageSize/8)*8] = byte(rng.Uint32())
			}
		}
	}
	used := pagemap.NewBitmap(benchRAM / PageSize)
	used.SetRange(0, used.Len())
	for range used.Len() / 8 / 16 {
		used.ClearRange(rng.Uint64N(used.Len()-32), 1+rng.Uint64N(31))
	}
	return h, [][]byte{ram}, used
}

// benchModes are the ways to store pages that benchmarks compare: each
// compression, without and with encryption.
var benchModes = []struct {
	name   string
	comp   Compression
	key    []byte
	hashes bool
}{
	{"lz4", CompressionLZ4, nil, false},
	{"lz4+hashes", CompressionLZ4, nil, true},
	{"none", CompressionNone, nil, false},
	{"none+hashes", CompressionNone, nil, true},
	{"lz4+aes", CompressionLZ4, testKey, false},
	{"none+aes", CompressionNone, testKey, false},
}

func BenchmarkWritePages(b *testing.B) {
	h, ram, used := benchGuest(b)
	for _, m := range benchModes {
		b.Run(m.name, func(b *testing.B) {
			dir := b.TempDir()
			b.SetBytes(int64(used.Count() * PageSize))
			var stats Stats
			for b.Loop() {
				b.StopTimer()
				w, err := Create(filepath.Join(dir, "ckpt"), h, Options{Compression: m.comp, Key: m.key, PageHashes: m.hashes})
				require.NoError(b, err)
				b.StartTimer()
				require.NoError(b, w.WritePages(ram, used, nil))
				b.StopTimer()
				stats = w.Stats()
				require.NoError(b, w.Abort())
				b.StartTimer()
			}
			b.ReportMetric(float64(stats.StoredBytes)/float64(stats.PageBytes), "stored/raw")
		})
	}
}

func BenchmarkRestorePages(b *testing.B) {
	h, ram, used := benchGuest(b)
	dst := [][]byte{make([]byte, benchRAM)}
	for _, m := range benchModes {
		b.Run(m.name, func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "ckpt")
			writeFile(b, path, h, Options{Compression: m.comp, Key: m.key}, ram, used, nil)
			r, err := OpenKey(path, m.key)
			require.NoError(b, err)
			defer r.Close()
			b.SetBytes(int64(used.Count() * PageSize))
			for b.Loop() {
				require.NoError(b, r.RestorePages(dst, RestoreOptions{}))
			}
		})
	}
}

func BenchmarkVerify(b *testing.B) {
	h, ram, used := benchGuest(b)
	for _, key := range [][]byte{nil, testKey} {
		name := "lz4"
		if key != nil {
			name += "+aes"
		}
		b.Run(name, func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "ckpt")
			stats := writeFile(b, path, h, Options{Key: key}, ram, used, nil)
			r, err := OpenKey(path, key)
			require.NoError(b, err)
			defer r.Close()
			b.SetBytes(stats.BytesWritten)
			for b.Loop() {
				require.NoError(b, r.Verify(nil))
			}
		})
	}
}

// BenchmarkChunk measures one worker's compression and decompression of a
// 1 MiB chunk of each kind of page, without I/O.
func BenchmarkChunk(b *testing.B) {
	for _, kind := range []dataKind{compressible, incompressible, mixed} {
		raw := make([]byte, DefaultChunkPages*PageSize)
		fillPages(raw, kind, 1)
		h := testHeader(DefaultChunkPages)
		sp, err := newSpace([][]byte{raw}, &h)
		require.NoError(b, err)
		used := pagemap.NewBitmap(DefaultChunkPages)
		used.SetRange(0, DefaultChunkPages)
		b.Run(fmt.Sprintf("compress/%v", kind), func(b *testing.B) {
			var c compressor
			c.lz4 = true
			j := &chunkJob{first: 0, pages: DefaultChunkPages}
			b.SetBytes(int64(len(raw)))
			for b.Loop() {
				c.do(j, sp, used)
			}
			b.ReportMetric(float64(len(j.out))/float64(len(raw)), "stored/raw")
		})
	}
}

package writer

import (
	"bytes"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

func TestCRCCombine(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, cut := range []int{0, 1, 4095, 4096, 1 << 20, len(data) - 1, len(data)} {
		a, b := data[:cut], data[cut:]
		assert.Equal(t, crc(data), crcCombine(crc(a), crc(b), len(b)), "cut at %d", cut)
	}
	// As the writer uses it: a running CRC, chunk by chunk.
	var run uint32
	for off := 0; off < len(data); {
		n := min(1+rng.IntN(300000), len(data)-off)
		run = crcCombine(run, crc(data[off:off+n]), n)
		off += n
	}
	assert.Equal(t, crc32.Checksum(data, castagnoli), run)
}

// fakeDisk is a disk of a given speed for pace.
type fakeDisk float64

func (d fakeDisk) Rate() float64 { return float64(d) }

func TestPaceShare(t *testing.T) {
	// Two workers; LZ4 at 250 MB/s per worker to half the size; the
	// rest of the work 1 ms per MB (1 GB/s per worker).
	feed := func(p *pace) {
		for range 10 {
			p.report(1e6, time.Millisecond, 4*time.Millisecond, 5e5)
		}
	}
	cases := []struct {
		disk float64
		want float64 // share of chunks compressed
	}{
		// Workers: 0.5 ms + f·2 ms per MB; disk: (1 - f/2)/D.
		{disk: 1e9, want: (1/1e9 - 0.5e-9) / (2e-9 + 0.5/1e9)},       // 0.2
		{disk: 400e6, want: (1/400e6 - 0.5e-9) / (2e-9 + 0.5/400e6)}, // 0.615
		{disk: 100e6, want: 1}, // a slow disk: all of it
		{disk: 10e9, want: 0},  // faster than the workers read: none
	}
	for _, c := range cases {
		p := &pace{disk: fakeDisk(c.disk), workers: 2}
		assert.True(t, p.compress(), "nothing measured: compress")
		feed(p)
		n := 0
		const chunks = 1000
		for range chunks {
			if p.compress() {
				n++
			}
		}
		assert.InDelta(t, min(c.want, 1), float64(n)/chunks, 0.002, "disk %.0f MB/s", c.disk/1e6)
	}
	// Without a disk to pace by (not a file), always LZ4.
	p := &pace{workers: 2}
	feed(p)
	assert.True(t, p.compress())
}

// pacedWriter is a fileWriter whose disk claims a speed.
type pacedWriter struct {
	*fileWriter
	fakeDisk
}

func (p pacedWriter) Rate() float64 { return p.fakeDisk.Rate() }

// TestAutoCompression writes compressible pages with CompressionAuto to
// a disk that claims to be very fast, then very slow: the first stores
// most chunks raw, the second none; both files read back the pages and
// say "lz4".
func TestAutoCompression(t *testing.T) {
	const chunkPages = 16
	h := testHeader(64 * chunkPages)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(h.Regions[0].Size / PageSize)
	used.SetRange(0, used.Len())
	for _, disk := range []fakeDisk{1e15, 1} {
		path := filepath.Join(t.TempDir(), "ckpt")
		w, err := Create(path, h, Options{Compression: CompressionAuto, ChunkPages: chunkPages, Workers: 2})
		require.NoError(t, err)
		w.bw = pacedWriter{w.bw.(*fileWriter), disk}
		require.NoError(t, w.WritePages(ram, used, nil))
		_, err = w.WriteDeviceState(bytes.NewReader([]byte("dev")))
		require.NoError(t, err)
		require.NoError(t, w.Commit())
		st := w.Stats()
		if disk > 1e9 {
			assert.Greater(t, st.Stages.RawChunks, 48, "a fast disk: most chunks raw")
			assert.Equal(t, st.Stages.RawChunks, st.ChunksRaw)
		} else {
			assert.Zero(t, st.Stages.RawChunks, "a slow disk: every chunk compressed")
			assert.Zero(t, st.ChunksRaw)
		}
		assert.Positive(t, st.Stages.Compress)
		assert.Positive(t, st.Stages.Read)

		r, err := Open(path)
		require.NoError(t, err)
		assert.Equal(t, CompressionLZ4, r.Header().Compression)
		require.NoError(t, r.Verify(nil))
		dst := [][]byte{make([]byte, len(ram[0]))}
		require.NoError(t, r.RestorePages(dst, RestoreOptions{}))
		assert.True(t, bytes.Equal(ram[0], dst[0]))
		r.Close()
	}
}

// TestFileWriter writes through the asynchronous O_DIRECT writer in
// pieces of every size: the file holds the bytes in order; and a disk
// that fails makes Write or Flush fail, without hanging.
func TestFileWriter(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	want := make([]byte, 5*directBlock+12345)
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	require.NoError(t, err)
	fw := newFileWriter(f)
	for off := 0; off < len(want); {
		n := min(rng.IntN(3*directBlock/2), len(want)-off)
		k, err := fw.Write(want[off : off+n])
		require.NoError(t, err)
		require.Equal(t, n, k)
		off += n
	}
	require.NoError(t, fw.Flush())
	fw.Close() // after Flush: nothing more
	require.NoError(t, f.Close())
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, got))
	_, err = fw.Write([]byte{1})
	assert.Error(t, err, "write after flush")
	// The space reserved ahead of the writes is given back.
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	assert.Less(t, st.Blocks*512, int64(len(want)+directBlock), "space reserved beyond the end")

	// Whole blocks only: nothing left for Flush to write, but the
	// reservation is trimmed all the same.
	f, err = os.Create(path)
	require.NoError(t, err)
	fw = newFileWriter(f)
	_, err = fw.Write(want[:3*directBlock])
	require.NoError(t, err)
	require.NoError(t, fw.Flush())
	require.NoError(t, f.Close())
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, int64(3*directBlock), fi.Size())

	// Reserving given up part way (a file system out of space ahead of
	// the data, which may have grown the file in part): the file still
	// ends where the data does.
	f, err = os.Create(path)
	require.NoError(t, err)
	fw = newFileWriter(f)
	_, err = fw.Write(want[:2*directBlock])
	require.NoError(t, err)
	for {
		fw.mu.Lock()
		done := fw.written == 2*directBlock
		fw.mu.Unlock()
		if done {
			break
		}
		time.Sleep(time.Millisecond)
	}
	fw.mu.Lock()
	fw.reserved = -1
	fw.mu.Unlock()
	_, err = fw.Write(want[:directBlock+7])
	require.NoError(t, err)
	require.NoError(t, fw.Flush())
	require.NoError(t, f.Close())
	fi, err = os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, int64(3*directBlock+7), fi.Size())

	// A file open read-only: every write fails.
	ro, err := os.Open(path)
	require.NoError(t, err)
	defer ro.Close()
	fw = newFileWriter(ro)
	var werr error
	for range 2 * fileBlocks {
		if _, werr = fw.Write(want[:directBlock]); werr != nil {
			break
		}
	}
	ferr := fw.Flush()
	assert.True(t, werr != nil || ferr != nil, "a failing disk fails Write or Flush")
	fw.Close()
}

// TestFileWriterRate checks the disk's rate and busy time as
// CompressionAuto and a save's stages read them while writes overlap:
// the time with a write under way counts as it goes, not only once no
// write is left (with two in flight that may be never: the rate once read
// near infinite mid-save, and every chunk went raw).
func TestFileWriterRate(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	require.NoError(t, err)
	defer f.Close()
	fw := newFileWriter(f)
	defer fw.Close()
	start := time.Now()
	assert.Zero(t, fw.Rate(), "nothing written yet")

	fw.begin(directBlock) // a write A
	time.Sleep(20 * time.Millisecond)
	fw.begin(2 * directBlock) // B, while A is under way
	fw.end(directBlock, nil)  // A done, B under way
	assert.GreaterOrEqual(t, fw.Busy(), 20*time.Millisecond)
	assert.Positive(t, fw.Rate())
	assert.LessOrEqual(t, fw.Rate(), float64(directBlock)/0.020)

	time.Sleep(10 * time.Millisecond)
	fw.end(directBlock, nil) // B done: nothing under way
	busy := fw.Busy()
	assert.GreaterOrEqual(t, busy, 30*time.Millisecond)
	assert.LessOrEqual(t, busy, time.Since(start))
	assert.LessOrEqual(t, fw.Rate(), float64(2*directBlock)/0.030)
	time.Sleep(10 * time.Millisecond)
	assert.Equal(t, busy, fw.Busy(), "idle time is not busy")
}

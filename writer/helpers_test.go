package writer

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// testHeader returns a header for regions of the given page counts, with
// every informative field set and a fixed creation time, so that files
// are reproducible.
func testHeader(regionPages ...uint64) Header {
	h := Header{
		KernelBanner: "Linux version 6.1.0-47-amd64 (debian-kernel@lists.debian.org)",
		Profile:      "6.1.0-47-amd64-3f2a9c1d",
		QEMUVersion:  "9.2.0",
		MachineType:  "pc-q35-9.2",
		CommandLine:  []string{"qemu-system-x86_64", "-machine", "q35", "-m", "64M"},
		Created:      time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC),
		Pages:        PageCounts{FreeBuddy: 1, FreePCP: 1, Zero: 1},
	}
	for i, n := range regionPages {
		size := n * PageSize
		h.Regions = append(h.Regions, Region{
			ID:       fmt.Sprintf("mem%d", i),
			Size:     size,
			MemPath:  fmt.Sprintf("/dev/shm/vm-mem%d", i),
			Mappings: []Mapping{{GPA: uint64(i) << 32, Offset: 0, Size: size}},
		})
	}
	return h
}

// dataKind says what test pages hold.
type dataKind int

const (
	compressible   dataKind = iota // text-like, LZ4 halves it or better
	incompressible                 // random
	mixed                          // a mix of the two, page by page
)

func (k dataKind) String() string {
	return [...]string{"compressible", "incompressible", "mixed"}[k]
}

// fillPages fills mem with pages of kind k, deterministically from seed.
func fillPages(mem []byte, k dataKind, seed uint64) {
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(k)})
	rng := rand.New(src)
	words := []string{"kvm ", "qemu ", "page ", "struct ", "task_struct ", "0000 ", "ffff8880 ", "\n"}
	for p := 0; p+PageSize <= len(mem); p += PageSize {
		page := mem[p : p+PageSize]
		kind := k
		if k == mixed {
			kind = dataKind(rng.IntN(2))
		}
		switch kind {
		case compressible:
			for i := 0; i < len(page); {
				i += copy(page[i:], words[rng.IntN(len(words))])
			}
		case incompressible:
			src.Read(page)
		}
	}
}

// newRAM returns region memory for h, filled with kind k.
func newRAM(h *Header, k dataKind) [][]byte {
	ram := make([][]byte, len(h.Regions))
	for i, r := range h.Regions {
		ram[i] = make([]byte, r.Size)
		fillPages(ram[i], k, uint64(i))
	}
	return ram
}

// expectedRAM returns what a restore of ram with used and fill must give.
func expectedRAM(ram [][]byte, used *pagemap.Bitmap, fill byte) [][]byte {
	out := make([][]byte, len(ram))
	page := uint64(0)
	for i, r := range ram {
		out[i] = bytes.Clone(r)
		for p := 0; p < len(r); p += PageSize {
			if !used.Test(page) {
				for j := p; j < p+PageSize; j++ {
					out[i][j] = fill
				}
			}
			page++
		}
	}
	return out
}

// writeFile writes a checkpoint to path and returns the writer's stats.
func writeFile(tb testing.TB, path string, h Header, opts Options, ram [][]byte, used *pagemap.Bitmap, dev []byte) Stats {
	tb.Helper()
	w, err := Create(path, h, opts)
	require.NoError(tb, err)
	defer w.Abort()
	require.NoError(tb, w.WritePages(ram, used, nil))
	n, err := w.WriteDeviceState(bytes.NewReader(dev))
	require.NoError(tb, err)
	require.Equal(tb, int64(len(dev)), n)
	require.NoError(tb, w.Commit())
	return w.Stats()
}

// testKey and otherKey are encryption keys for tests.
var (
	testKey  = []byte("kvmckpt test key, 32 bytes long!")
	otherKey = []byte("kvmckpt other key, not the test!")
)

// smallCheckpoint returns the bytes of a small checkpoint with every part:
// two regions of 3 and 4 pages, chunks of 2 pages: an LZ4 one, a raw one
// across the regions, and an LZ4 one; fill byte 0xaa; a device state.
func smallCheckpoint(tb testing.TB) []byte {
	tb.Helper()
	return smallCheckpointKey(tb, nil)
}

// smallCheckpointKey is smallCheckpoint encrypted under key, if not nil.
func smallCheckpointKey(tb testing.TB, key []byte) []byte {
	tb.Helper()
	h := testHeader(3, 4)
	h.FillByte = 0xaa
	ram := newRAM(&h, compressible)
	fillPages(ram[0][2*PageSize:], incompressible, 0)
	fillPages(ram[1][:PageSize], incompressible, 1)
	used := pagemap.NewBitmap(7)
	for _, p := range []uint64{0, 1, 2, 3, 5, 6} {
		used.Set(p)
	}
	path := filepath.Join(tb.TempDir(), "small.kvmckpt")
	writeFile(tb, path, h, Options{ChunkPages: 2, Key: key}, ram, used, []byte("QEVM\x00\x00\x00\x03device state"))
	data, err := os.ReadFile(path)
	require.NoError(tb, err)
	return data
}

// openBytes opens a checkpoint held in memory.
func openBytes(data []byte) (*Reader, error) { return openBytesKey(data, nil) }

// openBytesKey opens a checkpoint held in memory with a key.
func openBytesKey(data, key []byte) (*Reader, error) {
	return NewReaderKey(bytes.NewReader(data), int64(len(data)), key)
}

// openAndVerify opens and verifies a checkpoint held in memory and returns
// the first error.
func openAndVerify(data []byte) error { return openAndVerifyKey(data, nil) }

// openAndVerifyKey is openAndVerify with a key.
func openAndVerifyKey(data, key []byte) error {
	r, err := openBytesKey(data, key)
	if err != nil {
		return err
	}
	return r.Verify(nil)
}

// memWriterAt is an io.WriterAt over a byte slice.
type memWriterAt []byte

func (m memWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(m)) || int64(len(p)) > int64(len(m))-off {
		return 0, errors.New("write past the end")
	}
	return copy(m[off:], p), nil
}

// concat returns the regions' memory as one slice, as RestorePagesTo sees
// it.
func concat(ram [][]byte) []byte { return bytes.Join(ram, nil) }

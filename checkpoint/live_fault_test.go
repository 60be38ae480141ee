package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// TestLiveRoundRAMShrinks checks that a round whose guest RAM file shrinks
// under its mapping (QEMU gone, the file truncated) fails with an error
// instead of crashing kvmckpt on the fault.
func TestLiveRoundRAMShrinks(t *testing.T) {
	const size = 16 << 20
	shm := func() *os.File {
		f, err := os.CreateTemp("/dev/shm", "kvmckpt-test-ram")
		require.NoError(t, err)
		os.Remove(f.Name())
		t.Cleanup(func() { f.Close() })
		require.NoError(t, f.Truncate(size))
		_, err = f.WriteAt(make([]byte, size), 0) // no holes
		require.NoError(t, err)
		return f
	}
	// The holes come from a file of full size; the pages from the
	// mapping of one that shrinks to half.
	whole, shrinking := shm(), shm()
	ram, err := syscall.Mmap(int(shrinking.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
	require.NoError(t, err)
	defer syscall.Munmap(ram)
	require.NoError(t, shrinking.Truncate(size/2))
	g := &guest{backends: []qmp.Backend{{ID: "pc.ram", Size: size}}, files: []*os.File{whole}, ram: [][]byte{ram}, log: logger(nil)}
	h := writer.Header{Regions: []writer.Region{{ID: "pc.ram", Size: size}}}
	w, err := writer.CreateLive(filepath.Join(t.TempDir(), "x.kvmckpt"), h, writer.Options{ChunkPages: liveGroupPages})
	require.NoError(t, err)
	defer w.Abort()
	ls := newLiveSave(g, w, nil, nil, true)
	_, err = ls.round(context.Background(), pagemap.NewBitmap(size/introspect.PageSize), roundSurvey)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "RAM file shrank")
}

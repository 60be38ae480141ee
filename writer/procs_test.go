package writer

import (
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

func TestSpareP(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	require.Equal(t, 2, cpus())

	first := spareP()
	require.Equal(t, 3, runtime.GOMAXPROCS(0), "a pipeline has one P more than its workers")
	require.Equal(t, 2, cpus(), "workers are still one a CPU")
	second := spareP()
	require.Equal(t, 3, runtime.GOMAXPROCS(0), "pipelines at once share the spare P")
	first()
	first()
	require.Equal(t, 3, runtime.GOMAXPROCS(0), "released twice, counted once")
	second()
	require.Equal(t, 2, runtime.GOMAXPROCS(0))

	// Changed meanwhile by someone else: left as they set it.
	release := spareP()
	runtime.GOMAXPROCS(5)
	release()
	require.Equal(t, 5, runtime.GOMAXPROCS(0))
}

// TestPipelineSpareP checks that a save's pipeline runs with the spare P
// and gives it back.
func TestPipelineSpareP(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	h := testHeader(1024)
	ram := newRAM(&h, compressible)
	used := pagemap.NewBitmap(1024)
	used.SetRange(0, 1024)
	var seen int
	w, err := Create(t.TempDir()+"/ckpt", h, Options{})
	require.NoError(t, err)
	require.Equal(t, 2, w.opts.Workers)
	require.NoError(t, w.WritePages(ram, used, func(done, total uint64) {
		seen = max(seen, runtime.GOMAXPROCS(0))
	}))
	_, err = w.WriteDeviceState(strings.NewReader("device state"))
	require.NoError(t, err)
	require.NoError(t, w.Commit())
	require.Equal(t, 3, seen)
	require.Equal(t, 2, runtime.GOMAXPROCS(0))
}

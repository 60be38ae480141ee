package checkpoint

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// TestPSFileNeedsKernelPGD: a checkpoint that does not say where the
// kernel's page tables are (an older kvmckpt's, or a full save of a guest
// it could not read) is refused with the reason, not searched at random.
func TestPSFileNeedsKernelPGD(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.kvmckpt")
	h := writer.Header{Regions: []writer.Region{{ID: "mem0", Size: 16 * writer.PageSize}}}
	w, err := writer.Create(path, h, writer.Options{})
	require.NoError(t, err)
	require.NoError(t, w.WritePages([][]byte{make([]byte, 16*writer.PageSize)}, pagemap.NewBitmap(16), nil))
	_, err = w.WriteDeviceState(bytes.NewReader(nil))
	require.NoError(t, err)
	require.NoError(t, w.Commit())
	_, err = PSFile(context.Background(), path, nil, PSOptions{})
	require.ErrorIs(t, err, ErrNoIntrospection)
	assert.Contains(t, err.Error(), "page tables")
}

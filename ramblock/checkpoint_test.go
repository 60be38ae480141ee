package ramblock

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// TestCheckpoint reads a checkpoint of two regions as guest memory:
// saved pages read back as saved, across chunk and region boundaries;
// pages it does not hold are absent; a corrupt chunk makes its pages
// absent and says why.
func TestCheckpoint(t *testing.T) {
	const a, b = 40, 24
	h := writer.Header{Regions: []writer.Region{{ID: "mem0", Size: a * PageSize}, {ID: "mem1", Size: b * PageSize}}}
	ram := [][]byte{make([]byte, a*PageSize), make([]byte, b*PageSize)}
	for i, r := range ram {
		for p := range len(r) / PageSize {
			copy(r[p*PageSize:], bytes.Repeat([]byte{byte(i*100 + p + 1)}, PageSize))
		}
	}
	used := pagemap.NewBitmap(a + b)
	used.SetRange(0, a+b)
	used.ClearRange(5, 3)   // absent in mem0
	used.ClearRange(a+2, 1) // absent in mem1
	used.ClearRange(a-1, 1) // the last page of mem0
	path := filepath.Join(t.TempDir(), "c.kvmckpt")
	w, err := writer.Create(path, h, writer.Options{ChunkPages: 8})
	require.NoError(t, err)
	require.NoError(t, w.WritePages(ram, used, nil))
	_, err = w.WriteDeviceState(bytes.NewReader(nil))
	require.NoError(t, err)
	require.NoError(t, w.Commit())

	r, err := writer.Open(path)
	require.NoError(t, err)
	defer r.Close()
	c, err := OpenCheckpoint(r)
	require.NoError(t, err)
	defer c.Close()
	regs := c.Regions()
	require.Len(t, regs, 2)
	assert.Equal(t, uint64(a*PageSize), regs[0].Size())
	got, ok := regs[0].Bytes(3*PageSize+10, 2*PageSize-20)
	require.True(t, ok)
	assert.Equal(t, ram[0][3*PageSize+10:5*PageSize-10], got)
	_, ok = regs[0].Bytes(4*PageSize, PageSize+1)
	assert.False(t, ok, "a page not saved is absent")
	_, ok = regs[0].Bytes((a-1)*PageSize, 8)
	assert.False(t, ok)
	got, ok = regs[1].Bytes(3*PageSize, 16*PageSize)
	require.True(t, ok)
	assert.Equal(t, ram[1][3*PageSize:19*PageSize], got, "pages of the second region, over chunks")
	_, ok = regs[1].Bytes(2*PageSize, 1)
	assert.False(t, ok)
	_, ok = regs[1].Bytes(b*PageSize-1, 2)
	assert.False(t, ok, "past the region")
	assert.NoError(t, c.Err())

	// A chunk corrupted on disk: its pages absent, Err says which.
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	ch := r.Chunk(r.NumChunks() - 1)
	raw[ch.Offset+1] ^= 0xff
	bad := filepath.Join(t.TempDir(), "bad.kvmckpt")
	require.NoError(t, os.WriteFile(bad, raw, 0o600))
	rb, err := writer.Open(bad)
	require.NoError(t, err)
	defer rb.Close()
	cb, err := OpenCheckpoint(rb)
	require.NoError(t, err)
	defer cb.Close()
	_, ok = cb.Regions()[1].Bytes((b-1)*PageSize, 8)
	assert.False(t, ok)
	assert.Error(t, cb.Err())
}

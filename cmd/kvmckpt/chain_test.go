package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// writeChainFiles writes a whole checkpoint base and a child d1 of it
// into dir, of a 32-page guest whose page 3 changed between them.
func writeChainFiles(t *testing.T, dir string) (base, d1 string) {
	t.Helper()
	h := writer.Header{
		Regions: []writer.Region{{ID: "pc.ram", Size: 32 * writer.PageSize, Mappings: []writer.Mapping{{Size: 32 * writer.PageSize}}}},
		Created: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC),
	}
	ram := make([]byte, 32*writer.PageSize)
	for i := range ram {
		ram[i] = byte(i / writer.PageSize)
	}
	used := pagemap.NewBitmap(32)
	used.SetRange(1, 20)
	write := func(path string, h writer.Header, opts writer.Options, store *pagemap.Bitmap) {
		w, err := writer.Create(path, h, opts)
		require.NoError(t, err)
		require.NoError(t, w.WritePages([][]byte{ram}, store, nil))
		_, err = w.WriteDeviceState(bytes.NewReader([]byte("dev")))
		require.NoError(t, err)
		require.NoError(t, w.Commit())
	}
	base = filepath.Join(dir, "base.kvmckpt")
	write(base, h, writer.Options{}, used)
	ram[3*writer.PageSize] = 0xee
	c, err := writer.OpenChain(base, writer.ChainOptions{})
	require.NoError(t, err)
	defer c.Close()
	ps, err := c.PageSums(context.Background())
	require.NoError(t, err)
	cur, err := writer.PageSums(context.Background(), [][]byte{ram}, &h, used, writer.HashOptions{})
	require.NoError(t, err)
	changed, err := pagehash.Changed(cur, ps, pagehash.Filled(writer.PageSize, 0))
	require.NoError(t, err)
	require.Equal(t, uint64(1), changed.Count())
	h.Parent, err = c.AsParent()
	require.NoError(t, err)
	d1 = filepath.Join(dir, "d1.kvmckpt")
	write(d1, h, writer.Options{InUse: cur}, changed)
	return base, d1
}

// TestChainCommands: inspect shows a chain, verify checks it, flatten
// makes it one file; a parent gone is exit 3 for every command, restore
// included before any QEMU is touched, and --parent finds it again.
func TestChainCommands(t *testing.T) {
	dir := t.TempDir()
	base, d1 := writeChainFiles(t, dir)

	code, stdout, stderr := cli(t, "inspect", d1, "--json")
	require.Equal(t, exitOK, code, stderr)
	var info checkpoint.Info
	require.NoError(t, json.Unmarshal([]byte(stdout), &info))
	require.Len(t, info.Chain, 2)
	assert.Equal(t, 1, info.Chain[0].Depth)
	assert.Equal(t, uint64(1), info.Chain[0].PagesStored)
	assert.Equal(t, uint64(1), info.Chain[0].PagesRestored)
	assert.Equal(t, uint64(19), info.Chain[1].PagesRestored)
	code, stdout, _ = cli(t, "inspect", d1)
	require.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "chain:")
	code, _, stderr = cli(t, "verify", d1)
	require.Equal(t, exitOK, code, stderr)

	moved := filepath.Join(t.TempDir(), "moved.kvmckpt")
	require.NoError(t, os.Rename(base, moved))
	for _, args := range [][]string{
		{"verify", d1},
		{"restore", "-i", d1, "--qmp", "/nonexistent"},
		{"restore", "-i", d1, "--launch", "--ram-dir", t.TempDir()},
		{"flatten", d1, "-o", filepath.Join(dir, "flat.kvmckpt")},
	} {
		code, _, stderr := cli(t, args...)
		assert.Equal(t, exitInvalid, code, "%v: %s", args, stderr)
		assert.Contains(t, stderr, "base.kvmckpt", args)
		assert.Contains(t, stderr, "--parent", args)
	}
	code, stdout, _ = cli(t, "inspect", d1)
	require.Equal(t, exitOK, code, "inspect shows a file whose chain is broken")
	assert.Contains(t, stdout, "BROKEN")
	code, _, stderr = cli(t, "export", d1, "-o", filepath.Join(dir, "x"), "--format", "qemu")
	assert.Equal(t, exitInvalid, code)
	assert.Contains(t, stderr, "kvmckpt flatten")

	code, _, stderr = cli(t, "verify", d1, "--parent", moved)
	require.Equal(t, exitOK, code, stderr)
	flat := filepath.Join(dir, "flat.kvmckpt")
	code, stdout, stderr = cli(t, "flatten", d1, "-o", flat, "--parent", moved, "--json")
	require.Equal(t, exitOK, code, stderr)
	var fr checkpoint.FlattenResult
	require.NoError(t, json.Unmarshal([]byte(stdout), &fr))
	assert.Equal(t, 2, fr.Links)
	assert.Equal(t, uint64(20), fr.PagesSaved)
	code, _, stderr = cli(t, "verify", flat)
	require.Equal(t, exitOK, code, stderr)
	code, _, stderr = cli(t, "flatten", d1, "-o", d1, "--parent", moved)
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stderr, "a link of the chain")

	// The flat file restores what the chain does.
	r, err := writer.Open(flat)
	require.NoError(t, err)
	defer r.Close()
	assert.Nil(t, r.Parent())
	c, err := writer.OpenChain(d1, writer.ChainOptions{Parents: []string{moved}})
	require.NoError(t, err)
	defer c.Close()
	a, b := make([]byte, 32*writer.PageSize), make([]byte, 32*writer.PageSize)
	require.NoError(t, c.RestorePages([][]byte{a}, writer.RestoreOptions{}))
	require.NoError(t, r.RestorePages([][]byte{b}, writer.RestoreOptions{}))
	assert.Equal(t, a, b)
	assert.Equal(t, byte(0xee), a[3*writer.PageSize])

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"save", "--qmp", "x", "-o", "y", "--parent", d1, "--encrypt-key", "k"}, "exclude each other"},
		{[]string{"flatten", d1}, "--o is required"},
		{[]string{"flatten"}, "one checkpoint file"},
	} {
		code, _, stderr := cli(t, c.args...)
		assert.Equal(t, exitUsage, code, c.args)
		assert.Contains(t, stderr, c.want)
	}
}

package checkpoint

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// TestNoLinuxKernel saves a guest with no Linux kernel in it (its firmware
// found nothing to boot, as in early boot or with another operating
// system): kvmckpt cannot prove any page free, so it saves every non-zero
// page with a warning, like a careful `virsh save`, and the restored RAM
// is the source's byte for byte. --require-introspection refuses instead,
// leaving the guest running and no file.
func TestNoLinuxKernel(t *testing.T) {
	cfg := vmtest.Config{MemMiB: 128, NoKernel: true}
	src := vmtest.Boot(t, cfg)
	ctx := context.Background()
	// Let the firmware run and give up on booting.
	time.Sleep(2 * time.Second)
	dir := t.TempDir()
	out := filepath.Join(dir, "fw.kvmckpt")

	_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir, RequireIntrospection: true}, Output: out})
	require.ErrorIs(t, err, ErrNoIntrospection)
	assert.NoFileExists(t, out)
	assert.True(t, src.Status(t).Running, "a refused save leaves the guest running")

	res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: out, After: AfterKeepPaused})
	require.NoError(t, err)
	assert.True(t, res.FullSave)
	require.NotEmpty(t, res.Warnings)
	assert.Contains(t, res.Warnings[0], "saving every non-zero page")
	assert.Zero(t, res.PagesFree, "nothing is free without proof")
	assert.Equal(t, res.PagesTotal, res.PagesSaved+res.PagesZero+res.PagesHole, "every page saved, zero or a hole")
	assert.Greater(t, res.PagesSaved, uint64(0))

	tcfg := cfg
	tcfg.Incoming = true
	dst := vmtest.Boot(t, tcfg)
	_, err = Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath})
	require.NoError(t, err)
	a, err := os.ReadFile(src.RAMPath)
	require.NoError(t, err)
	b, err := os.ReadFile(dst.RAMPath)
	require.NoError(t, err)
	require.Equal(t, len(a), len(b))
	assert.True(t, bytes.Equal(a, b), "the restored RAM is the paused source's")
	state, err := Resume(ctx, Target{QMP: dst.QMPPath})
	require.NoError(t, err)
	assert.Equal(t, "running", state)
	_, err = Resume(ctx, Target{QMP: src.QMPPath})
	require.NoError(t, err)
}

package checkpoint

import (
	"context"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/profiles"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// TestRefusals covers guests and targets kvmckpt must refuse with a clear
// error, touching nothing.
func TestRefusals(t *testing.T) {
	ctx := context.Background()
	src := vmtest.Boot(t, vmtest.Config{MemMiB: 512, Workload: vmtest.Workload{Churn: 64, Anon: 16}})
	src.WaitReady(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "g.kvmckpt")
	_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: out})
	require.NoError(t, err)

	t.Run("profile of another kernel", func(t *testing.T) {
		cloud, err := filepath.Glob("../testdata/profiles/6.1.0-47-cloud-amd64-*.json")
		require.NoError(t, err)
		require.Len(t, cloud, 1)
		_, err = Scan(ctx, ScanOptions{QMP: src.QMPPath, Profile: cloud[0]})
		require.ErrorIs(t, err, profiles.ErrBannerMismatch)
		assert.Contains(t, err.Error(), "6.1.0-47-cloud-amd64")
		assert.Contains(t, err.Error(), "6.1.0-47-amd64 (")
		assert.True(t, src.Status(t).Running, "guest back to running after a refused scan")
	})

	t.Run("save of a restore target", func(t *testing.T) {
		dst := vmtest.Boot(t, vmtest.Config{MemMiB: 512, Incoming: true})
		_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: dst.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "x.kvmckpt")})
		require.ErrorIs(t, err, ErrGuestState)
		assert.Contains(t, err.Error(), "inmigrate")
	})

	t.Run("restore into a running guest", func(t *testing.T) {
		_, err := Restore(ctx, RestoreOptions{Input: out, QMP: src.QMPPath})
		require.ErrorIs(t, err, ErrGuestState)
		assert.Contains(t, err.Error(), "-incoming defer")
		assert.True(t, src.Status(t).Running)
	})

	t.Run("restore into a target of another size", func(t *testing.T) {
		dst := vmtest.Boot(t, vmtest.Config{MemMiB: 768, Incoming: true})
		_, err := Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath})
		require.ErrorIs(t, err, ErrInvalid)
		assert.Contains(t, err.Error(), "512 MiB")
		assert.Contains(t, err.Error(), "768 MiB")
		assert.Equal(t, "inmigrate", dst.Status(t).State, "the target was not fed")
	})
}

// TestPagePoisoning saves and restores a guest booted with page_poison=1:
// its free pages hold the poison byte and are checked on allocation, so the
// restore must put the poison back into every page it did not write.
func TestPagePoisoning(t *testing.T) {
	cfg := vmtest.Config{MemMiB: 1024, Append: []string{"page_poison=1"}, Workload: vmtest.Workload{Churn: 512, Anon: 64, Interval: 1}}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	ctx := context.Background()
	dir := t.TempDir()
	out := filepath.Join(dir, "p.kvmckpt")
	// Paused, so that nothing but kvmckpt could make the host allocate
	// pages of the RAM file while it saves.
	s, err := qmp.Dial(ctx, src.QMPPath)
	require.NoError(t, err)
	require.NoError(t, s.Stop(ctx))
	s.Close()
	before := allocatedBlocks(t, src.RAMPath)
	res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: out})
	require.NoError(t, err)
	info, err := Inspect(out, nil, nil)
	require.NoError(t, err)
	assert.Equal(t, byte(0xaa), info.FillByte, "page poisoning must be detected")
	assert.Greater(t, res.PagesFree, uint64(100000))
	// Holes are saved (they must come back as zeros, not poison), yet
	// never read, which would have the host allocate them.
	assert.Positive(t, res.PagesHole, "the RAM file has holes the guest never touched")
	assert.Equal(t, before, allocatedBlocks(t, src.RAMPath), "saving must not allocate the RAM file's holes")

	cfg.Incoming = true
	dst := vmtest.Boot(t, cfg)
	_, err = Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath, Resume: true})
	require.NoError(t, err)
	// Make the restored guest allocate: its verification loop runs, and
	// the kernel checks poison on every page it hands out.
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
	require.NoError(t, err)
	assert.NotRegexp(t, kernelTrouble, dst.Serial())
}

// allocatedBlocks is the number of 512-byte blocks the host has allocated
// to a file.
func allocatedBlocks(tb testing.TB, path string) int64 {
	tb.Helper()
	var st syscall.Stat_t
	require.NoError(tb, syscall.Stat(path, &st))
	return st.Blocks
}

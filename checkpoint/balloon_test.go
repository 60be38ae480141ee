package checkpoint

import (
	"context"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// inflate asks the guest at sock to give size bytes to its balloon and
// waits until it has.
func inflate(t *testing.T, sock string, ram, size uint64) {
	t.Helper()
	ctx := context.Background()
	s, err := qmp.Dial(ctx, sock)
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.SetBalloon(ctx, ram-size))
	deadline := time.Now().Add(2 * time.Minute)
	for {
		actual, err := s.BalloonActual(ctx)
		require.NoError(t, err)
		if actual <= ram-size {
			return
		}
		require.True(t, time.Now().Before(deadline), "the balloon holds %d MiB of %d after 2 minutes", (ram-actual)>>20, size>>20)
		time.Sleep(200 * time.Millisecond)
	}
}

// TestBalloon saves a guest with an inflated balloon: the pages it gave
// to the balloon (PageOffline) are neither saved nor read, and the
// restored guest runs on with its balloon still inflated and its data
// verified.
//
// With free page reporting on, the guest also hands free pages back (QEMU
// punches them out of the RAM file) while they stay on its free lists:
// the same save, restored as well.
func TestBalloon(t *testing.T) {
	for _, balloon := range []string{"on", "reporting"} {
		t.Run(balloon, func(t *testing.T) { testBalloon(t, balloon) })
	}
}

func testBalloon(t *testing.T, balloon string) {
	cfg := vmtest.Config{MemMiB: 1024, Balloon: balloon, Workload: vmtest.Workload{Churn: 256, Anon: 64, Tmpfs: 32, Interval: 1}}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	const ram, size = 1024 << 20, 384 << 20
	if balloon == "reporting" {
		// Reports come about 2 s after pages are freed, 2 MiB at a time.
		time.Sleep(4 * time.Second)
	}
	// What free page reporting changes: the host's RAM file, not what
	// kvmckpt reads (reported pages stay on the guest's free lists).
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(src.RAMPath, &st))
	t.Logf("balloon %s: RAM file holds %d of %d MiB before the balloon inflates", balloon, st.Blocks*512>>20, ram>>20)
	inflate(t, src.QMPPath, ram, size)

	ctx := context.Background()
	out := filepath.Join(t.TempDir(), "balloon.kvmckpt")
	res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: t.TempDir()}, Output: out})
	require.NoError(t, err)
	t.Logf("save: %+v", *res)
	require.NoError(t, syscall.Stat(src.RAMPath, &st))
	t.Logf("balloon %s: RAM file holds %d MiB at the save; %d free pages, %d zero, %d holes among the used, scan %d ms",
		balloon, st.Blocks*512>>20, res.PagesFree, res.PagesZero, res.PagesHole, res.ScanMS)
	assert.Equal(t, uint64(size/4096), res.BalloonPages)
	// The driver marks a page offline as it takes it, and reports it to
	// QEMU a batch (256 pages) at a time.
	assert.InDelta(t, float64(res.BalloonPages), float64(res.PagesOffline), 512, "pages found offline vs. the balloon's size")
	assert.LessOrEqual(t, res.PagesSaved+res.PagesOffline+res.PagesFree, res.PagesTotal)

	// The restored guest's balloon is where the device state says.
	tcfg := cfg
	tcfg.Incoming = true
	dst := vmtest.Boot(t, tcfg)
	_, err = Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath, Resume: true})
	require.NoError(t, err)
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
	require.NoError(t, err, "restored guest does not verify its data")
	assert.NotRegexp(t, kernelTrouble, dst.Serial())
	s, err := qmp.Dial(ctx, dst.QMPPath)
	require.NoError(t, err)
	defer s.Close()
	actual, err := s.BalloonActual(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint64(ram-size), actual, "the restored guest's balloon")
	// And it gives the pages back when asked.
	require.NoError(t, s.SetBalloon(ctx, ram))
	deadline := time.Now().Add(time.Minute)
	for actual < ram && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		actual, err = s.BalloonActual(ctx)
		require.NoError(t, err)
	}
	assert.Equal(t, uint64(ram), actual, "the restored guest deflates its balloon")
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK`), len(dst.Serial()), time.Minute)
	require.NoError(t, err)
}

// TestSqueeze saves a guest that read 160 MiB of files from its disk and
// keeps 32 MiB of dirty file data on another twice: as it is, and with
// --squeeze=auto, which has the balloon take the clean page cache first.
// The squeezed checkpoint is smaller by about the cache; the dirty data is
// not counted as reclaimable and survives; the source gets its memory
// back and re-reads its files from the disk correctly; the restored copy
// (on the same disks, the source gone) does too, with its balloon put
// back and its dirty data intact.
func TestSqueeze(t *testing.T) {
	disk := vmtest.MakeDisk(t, 160)
	cfg := vmtest.Config{MemMiB: 1024, Balloon: "on", Disk: disk, Scratch: vmtest.MakeScratch(t, 128),
		Workload: vmtest.Workload{Churn: 128, Anon: 64, Tmpfs: 32, Files: 160, Dirty: 32, Interval: 2}}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	ctx := context.Background()
	_, _, err := src.WaitSerial(ctx, regexp.MustCompile(`KW FILES OK pass=1 `), 0, 2*time.Minute)
	require.NoError(t, err)
	dir := t.TempDir()

	plain, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "plain.kvmckpt")})
	require.NoError(t, err)
	out := filepath.Join(dir, "squeezed.kvmckpt")
	sq, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: out, Squeeze: "auto"})
	require.NoError(t, err)
	require.NotNil(t, sq.Squeeze)
	t.Logf("plain: %d pages, %d bytes; squeezed: %d pages, %d bytes, %+v", plain.PagesSaved, plain.BytesWritten, sq.PagesSaved, sq.BytesWritten, *sq.Squeeze)
	assert.Greater(t, sq.Squeeze.Reclaimable, uint64(120<<20), "the guest's counters show its page cache")
	// The last meminfo: after the dirty data was written.
	all := regexp.MustCompile(`KW MEMINFO .*cached_kb=(\d+) .*dirty_kb=(\d+)`).FindAllStringSubmatch(src.Serial(), -1)
	require.NotEmpty(t, all)
	m := all[len(all)-1]
	cached, _ := strconv.ParseUint(m[1], 10, 64)
	dirty, _ := strconv.ParseUint(m[2], 10, 64)
	assert.Greater(t, dirty, uint64(30<<10), "the guest keeps its data dirty")
	assert.LessOrEqual(t, sq.Squeeze.Reclaimable, (cached-dirty)<<10+16<<20, "dirty data is not reclaimable")
	assert.Greater(t, sq.Squeeze.Taken, uint64(120<<20))
	// Most of the 160 MiB of cache (the plain save holds some of it
	// twice over: the workload's reads of it).
	assert.Less(t, sq.PagesSaved+100<<20/4096, plain.PagesSaved, "the page cache is not saved")
	assert.Equal(t, "running", sq.GuestState)

	// The source gets its memory back and reads its files from the disk.
	s, err := qmp.Dial(ctx, src.QMPPath)
	require.NoError(t, err)
	defer s.Close()
	deadline := time.Now().Add(time.Minute)
	for {
		actual, err := s.BalloonActual(ctx)
		require.NoError(t, err)
		if actual == 1024<<20 {
			break
		}
		require.True(t, time.Now().Before(deadline), "the balloon was not put back: %d MiB", actual>>20)
		time.Sleep(200 * time.Millisecond)
	}
	_, _, err = src.WaitSerial(ctx, regexp.MustCompile(`KW FILES OK[\s\S]*KW DIRTY OK|KW DIRTY OK[\s\S]*KW FILES OK`), len(src.Serial()), 2*time.Minute)
	require.NoError(t, err)
	assert.NotContains(t, src.Serial(), "FAIL")
	// The restored copy takes the source's place on its disks.
	src.Close()

	// The restored copy runs, re-reads its files, and gets its memory back.
	tcfg := cfg
	tcfg.Incoming = true
	dst := vmtest.Boot(t, tcfg)
	_, err = Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath, Resume: true})
	require.NoError(t, err)
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW FILES OK[\s\S]*KW DIRTY OK`), 0, 3*time.Minute)
	require.NoError(t, err, "the restored guest does not read its files back")
	assert.NotRegexp(t, kernelTrouble, dst.Serial())
	assert.NotContains(t, dst.Serial(), "FAIL")
	ds, err := qmp.Dial(ctx, dst.QMPPath)
	require.NoError(t, err)
	defer ds.Close()
	deadline = time.Now().Add(time.Minute)
	for {
		actual, err := ds.BalloonActual(ctx)
		require.NoError(t, err)
		if actual == 1024<<20 {
			break
		}
		require.True(t, time.Now().Before(deadline), "the restored guest's balloon was not put back: %d MiB", actual>>20)
		time.Sleep(200 * time.Millisecond)
	}
}

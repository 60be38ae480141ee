package checkpoint

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/stretchr/testify/require"
)

func TestZZProbeLive(t *testing.T) {
	if os.Getenv("PROBE") == "" {
		t.Skip()
	}
	cfg := vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1}
	cfg.Workload = vmtest.Workload{Churn: 600, Anon: 50, Tmpfs: 50, Text: 100, Interval: 5, WSet: 128, Rate: 50}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	ctx := context.Background()
	_, _, err := src.WaitSerial(ctx, writerOK, 0, 3*time.Minute)
	require.NoError(t, err)
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	for i, live := range []bool{true, false, true, true} {
		out := filepath.Join("/var/tmp", "probe.kvmckpt")
		t0 := time.Now()
		res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir, Log: log}, Output: out, Live: live, Tracker: map[int]string{0: "qemu", 2: "hash", 3: "qemu"}[i]})
		require.NoError(t, err)
		t.Logf("live=%v total %v pause %d scan %d pages %d dev %d sync %d bytes %d", live, time.Since(t0), res.PauseMS, res.ScanMS, res.PagesMS, res.DeviceStateMS, res.SyncMS, res.BytesWritten)
		if res.Live != nil {
			t.Logf("%+v", *res.Live)
		}
		time.Sleep(3 * time.Second)
	}
}

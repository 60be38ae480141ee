package checkpoint

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/qmp"
)

// TestCheckStale: a pause record counts only for the QEMU it names, and
// only while that guest is still paused.
func TestCheckStale(t *testing.T) {
	const this = "qemu pid 10 started 500 boot b1"
	rec := func(format, instance string) string {
		return fmt.Sprintf(format, 4321, "2026-01-02T03:04:05Z", instance)
	}
	tests := []struct {
		name      string
		record    string
		instance  string
		running   bool
		wantStale bool
		wantKept  bool // the record is still in the lock file
	}{
		{name: "no record", instance: this},
		{name: "killed while paused", record: rec(pauseRecord, this), instance: this, wantStale: true, wantKept: true},
		{name: "killed while pausing", record: rec(pausingRecord, this), instance: this, wantStale: true, wantKept: true},
		{name: "guest runs again", record: rec(pauseRecord, this), instance: this, running: true},
		{name: "another QEMU on a reused inode", record: rec(pauseRecord, "qemu pid 10 started 499 boot b1"), instance: this},
		{name: "another boot", record: rec(pauseRecord, "qemu pid 10 started 500 boot b0"), instance: this},
		{name: "instance a prefix of the record's", record: rec(pauseRecord, this+"0"), instance: this},
		{name: "this QEMU unknown", record: rec(pauseRecord, this), wantKept: true},
		{name: "record of an unknown QEMU", record: rec(pauseRecord, "qemu unknown"), instance: this},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lock, err := os.OpenFile(filepath.Join(t.TempDir(), "lock"), os.O_RDWR|os.O_CREATE, 0o600)
			require.NoError(t, err)
			defer lock.Close()
			_, err = lock.WriteString(tt.record)
			require.NoError(t, err)
			_, err = lock.Seek(0, 0)
			require.NoError(t, err)
			st := qmp.Status{State: "paused"}
			if tt.running {
				st = qmp.Status{State: "running", Running: true}
			}
			g := &guest{lock: lock, prior: st, instance: tt.instance, log: logger(nil)}
			g.checkStale()
			assert.Equal(t, tt.wantStale, g.stale != "")
			assert.Equal(t, tt.wantStale || tt.running, g.prior.Running, "prior state to go back to")
			left, err := os.ReadFile(lock.Name())
			require.NoError(t, err)
			if tt.wantKept {
				assert.Equal(t, tt.record, string(left))
			} else {
				assert.Empty(t, left)
			}
		})
	}
}

// TestLockFile: one holder at a time; the file goes when its holder is done
// unless it keeps a pause record.
func TestLockFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kvmckpt-x.lock")
	a, err := lockFile(path)
	require.NoError(t, err)
	_, err = lockFile(path)
	require.ErrorIs(t, err, ErrBusy)

	g := &guest{lock: a, lockPath: path}
	g.close()
	assert.NoFileExists(t, path, "an empty lock file is removed by its holder")

	b, err := lockFile(path)
	require.NoError(t, err)
	g = &guest{lock: b, lockPath: path, instance: "qemu pid 1 started 2 boot 3"}
	g.writePauseRecord(pauseRecord)
	g.close()
	require.FileExists(t, path, "a pause record is kept for the next kvmckpt")
	c, err := lockFile(path)
	require.NoError(t, err)
	defer c.Close()
	rec, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Contains(t, string(rec), "paused a running guest")
}

// TestZeroRange: whatever the grain the file system punches in, every byte
// of the range reads as zero afterwards and none outside it changes.
func TestZeroRange(t *testing.T) {
	const size = 8 << 20
	for _, tt := range []struct {
		name          string
		off, n, grain int64
	}{
		{"page grain", 3 << 12, 5 << 12, 4096},
		{"inside one grain", 3 << 12, 5 << 12, 2 << 20},
		{"across grains", 1<<20 + 4096, 5 << 20, 2 << 20},
		{"aligned", 2 << 20, 4 << 20, 2 << 20},
		{"to the end", 3<<20 + 4096, 5<<20 - 4096, 2 << 20},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "ram"))
			require.NoError(t, err)
			defer f.Close()
			require.NoError(t, f.Truncate(size))
			mem, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			require.NoError(t, err)
			defer unix.Munmap(mem)
			for i := range mem {
				mem[i] = 0xcc
			}
			zeroRange(f, mem, tt.off, tt.n, tt.grain)
			assert.Equal(t, int(tt.n), bytes.Count(mem[tt.off:tt.off+tt.n], []byte{0}), "range not all zero")
			assert.Equal(t, bytes.Repeat([]byte{0xcc}, int(tt.off)), mem[:tt.off])
			assert.Equal(t, bytes.Repeat([]byte{0xcc}, int(size-tt.off-tt.n)), mem[tt.off+tt.n:])
		})
	}
}

package checkpoint

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

func TestMain(m *testing.M) { vmtest.Main(m) }

// kernelTrouble matches kernel messages that mean a restored guest is not
// intact.
var kernelTrouble = regexp.MustCompile(`(?i)BUG:|Oops|bad page|corrupt|general protection|Kernel panic|VERIFY FAIL`)

// guestConfigs are the machines the acceptance criteria name.
var guestConfigs = []struct {
	name string
	cfg  vmtest.Config
}{
	{"pc-1G-1cpu", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1}},
	{"q35-3G-2cpu", vmtest.Config{Machine: "q35", MemMiB: 3072, CPUs: 2}},
	{"pc-1G-cpumax-la57", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, CPU: "max"}},
	// Two NUMA nodes, each with a RAM backend and file of its own.
	{"q35-2G-2cpu-2numa", vmtest.Config{Machine: "q35", MemMiB: 2048, CPUs: 2, NUMANodes: 2}},
	// The version matrix: QEMU 7.2 (bookworm) and 10.0 (backports), Linux
	// 6.1 and 6.12 guests. The cells above are all QEMU 7.2 with 6.1.
	{"pc-1G-6.12", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, Kernel: "6.12-amd64"}},
	{"pc-1G-qemu10", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, QEMU: "10.0"}},
	{"q35-2G-2cpu-qemu10-6.12", vmtest.Config{Machine: "q35", MemMiB: 2048, CPUs: 2, QEMU: "10.0", Kernel: "6.12-amd64"}},
}

// dirtyFree is the workload of the acceptance tests: about 60% of RAM
// filled with non-zero data and freed, some incompressible data kept.
func dirtyFree(memMiB int) vmtest.Workload {
	return vmtest.Workload{Churn: memMiB * 6 / 10, Anon: memMiB / 16, Tmpfs: memMiB / 16, Text: memMiB / 32, Interval: 1}
}

func memFreePages(t *testing.T, g *vmtest.Guest) uint64 {
	t.Helper()
	m := regexp.MustCompile(`KW MEM when=kept total_kb=(\d+) free_kb=(\d+)`).FindStringSubmatch(g.Serial())
	require.NotNil(t, m, "no MEM line")
	var free uint64
	for _, c := range m[2] {
		free = free*10 + uint64(c-'0')
	}
	return free / 4
}

func TestSaveRestore(t *testing.T) {
	for _, gc := range guestConfigs {
		t.Run(gc.name, func(t *testing.T) {
			cfg := gc.cfg
			cfg.Workload = dirtyFree(cfg.MemMiB)
			// A thread of /coretarget runs on a vCPU: the checkpoint's
			// vCPU registers make its core.
			cfg.Workload.Spin = gc.name == "q35-3G-2cpu"
			src, out, _ := bootAndSave(t, cfg)
			ctx := context.Background()
			st, err := os.Stat(out)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
			require.NoError(t, Verify(out, nil, nil, nil))
			if cfg.Workload.Spin {
				coreFromFile(t, out)
			}

			// The source keeps running and verifying.
			_, _, err = src.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK`), len(src.Serial()), time.Minute)
			require.NoError(t, err)

			tcfg := gc.cfg
			tcfg.Workload = cfg.Workload
			restoreVerified(t, tcfg, out)
			if !t.Failed() {
				vmtest.RecordMatrix(cfg, "save, restore, data verified")
			}
			if gc.name == "pc-1G-qemu10" {
				// Saved with x-ignore-shared, exported stock: a
				// target with its own new RAM file loads it with no
				// capability set.
				tcfg.Incoming = false
				loadExported(t, tcfg, exportQEMU(t, out))
			}
		})
	}
}

// TestHugePageRAM saves a guest whose RAM is on hugetlbfs, as many
// production guests' is, and restores it into a target whose RAM file is
// full of garbage: restore must not trust the target to start out zero.
func TestHugePageRAM(t *testing.T) {
	hp := hugetlbfsDir(t, 2*1024)
	cfg := vmtest.Config{MemMiB: 1024, RAMDir: hp, Workload: vmtest.Workload{Churn: 512, Anon: 128, Tmpfs: 64, Interval: 1}}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	ctx := context.Background()
	dir := t.TempDir()
	out := filepath.Join(dir, "huge.kvmckpt")
	res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: dir}, Output: out})
	require.NoError(t, err)
	assert.Greater(t, res.PagesFree, res.PagesTotal/3, "free pages found in huge-page RAM")

	cfg.Incoming = true
	dst := vmtest.Boot(t, cfg)
	f, err := os.OpenFile(dst.RAMPath, os.O_RDWR, 0)
	require.NoError(t, err)
	ram, err := syscall.Mmap(int(f.Fd()), 0, cfg.MemMiB<<20, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	f.Close()
	require.NoError(t, err)
	for i := 0; i < len(ram); i += 8 {
		ram[i] = 0xcc
	}
	require.NoError(t, syscall.Munmap(ram))

	_, err = Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath, Resume: true})
	require.NoError(t, err)
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
	require.NoError(t, err)
	assert.NotRegexp(t, kernelTrouble, dst.Serial(), "restored guest's console shows trouble")
}

func TestSaveKeepsPausedGuestPaused(t *testing.T) {
	g := vmtest.Boot(t, vmtest.Config{MemMiB: 512, Workload: vmtest.Workload{Churn: 128, Anon: 16}})
	g.WaitReady(t)
	ctx := context.Background()
	s, err := qmp.Dial(ctx, g.QMPPath)
	require.NoError(t, err)
	require.NoError(t, s.Stop(ctx))
	s.Close()
	// A pause record left by a kvmckpt killed while it held another QEMU
	// paused, whose socket had the same inode: not this guest's pause.
	require.NoError(t, os.WriteFile(LockPath(g.QMPPath), fmt.Appendf(nil, pauseRecord, 1, "2026-01-02T03:04:05Z", "qemu pid 1 started 1 boot x"), 0o600))
	dir := t.TempDir()
	res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "a.kvmckpt")})
	require.NoError(t, err)
	assert.NotEqual(t, "running", res.GuestState)
	s, err = qmp.Dial(ctx, g.QMPPath)
	require.NoError(t, err)
	st, err := s.Status(ctx)
	require.NoError(t, err)
	assert.False(t, st.Running, "a paused guest must stay paused, is %s", st.State)

	// --keep-paused from running, and resume. (QEMU serves one QMP client
	// at a time: close ours first.)
	require.NoError(t, s.Cont(ctx))
	s.Close()
	res, err = Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "b.kvmckpt"), After: AfterKeepPaused})
	require.NoError(t, err)
	assert.NotEqual(t, "running", res.GuestState)
	// QEMU will not migrate from postmigrate: a second save is refused,
	// saying the first checkpoint is still current.
	_, err = Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "b2.kvmckpt")})
	require.ErrorIs(t, err, ErrGuestState)
	assert.ErrorContains(t, err, "still current")
	assert.NoFileExists(t, filepath.Join(dir, "b2.kvmckpt"))
	state, err := Resume(ctx, Target{QMP: g.QMPPath})
	require.NoError(t, err)
	assert.Equal(t, "running", state)

	// A kvmckpt killed after QEMU sent the device state leaves the guest
	// in postmigrate, which QEMU will not migrate from: the next save
	// resumes it and saves it all the same.
	s, err = qmp.Dial(ctx, g.QMPPath)
	require.NoError(t, err)
	require.NoError(t, s.Stop(ctx))
	_, err = s.SaveDeviceState(ctx, io.Discard)
	require.NoError(t, err)
	st, err = s.Status(ctx)
	require.NoError(t, err)
	require.Equal(t, "postmigrate", st.State)
	require.NoError(t, os.WriteFile(LockPath(g.QMPPath), fmt.Appendf(nil, pauseRecord, 1, "2026-01-02T03:04:05Z", qemuInstance(s)), 0o600))
	s.Close()
	res, err = Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, "d.kvmckpt")})
	require.NoError(t, err)
	assert.Equal(t, "running", res.GuestState)

	// --quit ends QEMU, after the file is durable.
	out := filepath.Join(dir, "c.kvmckpt")
	res, err = Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: out, After: AfterQuit})
	require.NoError(t, err)
	require.NoError(t, g.Wait(30*time.Second), "QEMU must end after --quit")
	require.NoError(t, Verify(out, nil, nil, nil))
}

func TestSaveIntoReadOnlyDirFailsCleanly(t *testing.T) {
	g := vmtest.Boot(t, vmtest.Config{MemMiB: 512, Workload: vmtest.Workload{Churn: 64, Anon: 16}})
	g.WaitReady(t)
	dir := readOnlyDir(t)
	ctx := context.Background()
	_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: t.TempDir()}, Output: filepath.Join(dir, "x.kvmckpt")})
	require.Error(t, err)
	t.Log(err)
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries, "no file may be left")
	st := g.Status(t)
	assert.True(t, st.Running, "guest must run again, is %s", st.State)
}

func TestSaveIntoFullDiskFailsCleanly(t *testing.T) {
	g := vmtest.Boot(t, vmtest.Config{MemMiB: 512, Workload: vmtest.Workload{Churn: 64, Anon: 48}})
	g.WaitReady(t)
	dir := tmpfsDir(t, "16m", 0)
	out := filepath.Join(dir, "x.kvmckpt")
	older := []byte("an older checkpoint of the same name")
	require.NoError(t, os.WriteFile(out, older, 0o600))
	ctx := context.Background()
	_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: t.TempDir()}, Output: out})
	require.Error(t, err)
	t.Log(err)
	assert.Contains(t, err.Error(), "no space left")
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, older, got, "the older checkpoint must survive")
	entries, _ := os.ReadDir(dir)
	assert.Len(t, entries, 1, "no temporary file may be left")
	st := g.Status(t)
	assert.True(t, st.Running, "guest must run again, is %s", st.State)
}

func TestRestoreLaunch(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  vmtest.Config
	}{
		{"pc-512M", vmtest.Config{MemMiB: 512}},
		// A RAM file per NUMA node, each replaced by a new one.
		{"q35-1G-2numa", vmtest.Config{Machine: "q35", MemMiB: 1024, CPUs: 2, NUMANodes: 2}},
		// QEMU's own RAM: the copy's too, filled through its process.
		{"pc-512M-default-ram", vmtest.Config{MemMiB: 512, RAM: "default"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := c.cfg
			cfg.Workload = vmtest.Workload{Churn: 128, Anon: 32, Interval: 1}
			g := vmtest.Boot(t, cfg)
			g.WaitReady(t)
			ctx := context.Background()
			dir := t.TempDir()
			out := filepath.Join(dir, "g.kvmckpt")
			// Encrypted, to take the key through save and restore too.
			key := []byte("0123456789abcdef0123456789abcdef")
			_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: out, After: AfterQuit, Key: key})
			require.NoError(t, err)
			require.NoError(t, g.Wait(30*time.Second))
			_, err = RestoreLaunch(ctx, LaunchOptions{RestoreOptions: RestoreOptions{Input: out, Resume: true}, RAMDir: dir})
			require.ErrorIs(t, err, ErrInvalid, "no key, no restore")

			l, err := RestoreLaunch(ctx, LaunchOptions{RestoreOptions: RestoreOptions{Input: out, Resume: true, Key: key}, RAMDir: dir})
			require.NoError(t, err)
			t.Cleanup(func() {
				syscall.Kill(l.PID, syscall.SIGKILL)
				for i := 0; i < 100 && syscall.Kill(l.PID, 0) == nil; i++ {
					time.Sleep(20 * time.Millisecond)
				}
				for _, f := range l.RAMFiles {
					os.Remove(f)
				}
			})
			assert.Equal(t, "running", l.GuestState)
			assert.Contains(t, l.Args, "defer")
			assert.Len(t, l.RAMFiles, len(g.RAMPaths))
			// Guest memory and the monitor are the user's alone.
			for _, f := range append(append([]string(nil), l.RAMFiles...), l.QMP) {
				st, err := os.Stat(f)
				require.NoError(t, err)
				assert.Zero(t, st.Mode().Perm()&0o077, "%s is mode %v: others may read it", f, st.Mode().Perm())
			}
			// The copy writes its own serial file, not the source's.
			serial := l.Paths[g.SerialPath]
			require.NotEmpty(t, serial, "the serial file was moved: %v", l.Paths)
			t.Cleanup(func() { os.Remove(serial) })
			deadline := time.Now().Add(time.Minute)
			for {
				b, _ := os.ReadFile(serial)
				if regexp.MustCompile(`KW VERIFY OK`).Match(b) {
					break
				}
				require.True(t, time.Now().Before(deadline), "launched guest does not verify; its serial:\n%s", b)
				time.Sleep(200 * time.Millisecond)
			}
		})
	}
}

// TestQEMUOwnRAM saves and restores guests whose RAM is not a file
// kvmckpt can open by name: QEMU's default RAM (anonymous, read and
// written through QEMU's process), and a guest with one anonymous and one
// memfd backend (the memfd opened through /proc/PID/fd), on both QEMU
// versions. QEMU sends such RAM with the device state, whatever
// x-ignore-shared says (10.0 sends memfd RAM too): the stream is filtered
// of it, which the device state's size shows.
func TestQEMUOwnRAM(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  vmtest.Config
	}{
		{"default-ram-qemu7.2", vmtest.Config{Machine: "pc", MemMiB: 768, RAM: "default"}},
		{"anon-memfd-qemu7.2", vmtest.Config{Machine: "pc", MemMiB: 768, CPUs: 2, RAM: "mixed"}},
		{"anon-memfd-qemu10", vmtest.Config{Machine: "q35", MemMiB: 768, CPUs: 2, RAM: "mixed", QEMU: "10.0"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := c.cfg
			cfg.Workload = dirtyFree(cfg.MemMiB)
			src, out, res := bootAndSave(t, cfg)
			ctx := context.Background()
			assert.False(t, res.FullSave, "the guest kernel is read through QEMU's memory")
			assert.Less(t, res.DeviceStateBytes, int64(8<<20), "the device state carries no guest RAM")
			// What x-ignore-shared really leaves out, by QEMU version:
			// never anonymous RAM; a shared memfd in 7.2, not in 10.0
			// (migration/ram.c).
			t.Logf("RAM pages QEMU sent with the device state: %v", res.RAMInDeviceState)
			switch cfg.RAM {
			case "default":
				assert.Greater(t, res.RAMInDeviceState["pc.ram"], uint64(0))
			case "mixed":
				assert.Greater(t, res.RAMInDeviceState["mem0"], uint64(0), "anonymous RAM is sent")
				if cfg.QEMU == "" {
					assert.Zero(t, res.RAMInDeviceState["mem1"], "QEMU 7.2 leaves a shared memfd out")
				} else {
					assert.Greater(t, res.RAMInDeviceState["mem1"], uint64(0), "QEMU 10.0 sends a shared memfd")
				}
			}
			_, _, err := src.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK`), len(src.Serial()), time.Minute)
			require.NoError(t, err, "source verifies after the save")
			caps := src.MigrationCapabilities(t)
			assert.False(t, caps["x-ignore-shared"], "capabilities put back as they were")
			if cfg.RAM == "default" {
				// The rounds of a live save read RAM while the guest
				// runs, through a mapping: refused, guest untouched.
				_, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: t.TempDir()},
					Output: filepath.Join(t.TempDir(), "live.kvmckpt"), Live: true})
				require.ErrorIs(t, err, ErrLive)
				assert.Contains(t, err.Error(), "save without --live")
				assert.True(t, src.Status(t).Running)
			}

			tcfg := c.cfg
			tcfg.Workload = cfg.Workload
			restoreVerified(t, tcfg, out)
			if !t.Failed() {
				check := "anonymous RAM: save, restore, verified"
				if cfg.RAM == "mixed" {
					check = "anonymous + memfd RAM: save, restore, verified"
				}
				vmtest.RecordMatrix(cfg, check)
			}
			if cfg.RAM == "default" {
				// A standard migration stream of it, loaded by a
				// stock QEMU.
				loadExported(t, tcfg, exportQEMU(t, out))
			}
		})
	}
}

// bootAndSave boots a guest like cfg, waits for its workload and saves
// it, checking that it runs on and that the checkpoint holds no more than
// the pages the guest uses (by its own MemFree).
func bootAndSave(t *testing.T, cfg vmtest.Config) (*vmtest.Guest, string, *SaveResult) {
	t.Helper()
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	free := memFreePages(t, src)
	out := filepath.Join(t.TempDir(), "guest.kvmckpt")
	res, err := Save(context.Background(), SaveOptions{ScanOptions: ScanOptions{QMP: src.QMPPath, ProfileDir: t.TempDir()}, Output: out})
	require.NoError(t, err)
	t.Logf("save: %+v", *res)
	assert.Equal(t, "running", res.GuestState, "save must put a running guest back to running")
	used := res.PagesTotal - free
	assert.LessOrEqual(t, float64(res.PagesSaved), 1.02*float64(used),
		"checkpoint holds %d pages, guest uses %d", res.PagesSaved, used)
	assert.Greater(t, res.PagesFree, res.PagesTotal/2, "most of the churned memory is free")
	// Where the pages phase went: every chunk accounted for, and the
	// stages that every save has took time.
	if st := res.PagesStages; assert.NotNil(t, st, "pages_stages") {
		t.Logf("pages stages: %+v", *st)
		assert.Positive(t, st.Workers)
		assert.Equal(t, int(ceilDiv(res.PagesSaved, 256)), st.ChunksLZ4+st.ChunksRaw, "chunks of 256 pages")
		assert.LessOrEqual(t, st.ChunksRawByChoice, st.ChunksRaw)
		assert.Positive(t, st.ReadMS)
		assert.Positive(t, st.HashMS)
		assert.Positive(t, st.ChecksumMS)
		assert.Positive(t, st.DiskMS)
		assert.Positive(t, st.RawMBps)
		assert.GreaterOrEqual(t, st.RawMBps, st.StoredMBps*0.99)
	}
	return src, out, res
}

func ceilDiv(a, b uint64) uint64 { return (a + b - 1) / b }

// restoreVerified restores the checkpoint at out into a target booted
// like cfg and waits for two rounds of the workload's verification of
// all its kept data.
func restoreVerified(t *testing.T, cfg vmtest.Config, out string) {
	t.Helper()
	ctx := context.Background()
	cfg.Incoming = true
	dst := vmtest.Boot(t, cfg)
	rres, err := Restore(ctx, RestoreOptions{Input: out, QMP: dst.QMPPath, Resume: true})
	require.NoError(t, err)
	t.Logf("restore: %+v", *rres)
	assert.Equal(t, "running", rres.GuestState)
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
	require.NoError(t, err, "restored guest does not verify its data")
	assert.NotRegexp(t, kernelTrouble, dst.Serial(), "restored guest's console shows trouble")
}

// loadExported boots a target like cfg, has it load the exported stream
// at path the way an operator would (migrate-incoming "exec:cat PATH":
// QEMU reads it itself, nothing of kvmckpt's in between), resumes it and
// waits for it to verify its data.
func loadExported(t *testing.T, cfg vmtest.Config, path string) {
	t.Helper()
	ctx := context.Background()
	cfg.Incoming = true
	dst := vmtest.Boot(t, cfg)
	s, err := qmp.Dial(ctx, dst.QMPPath)
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.Run(ctx, "migrate-incoming", map[string]string{"uri": "exec:cat " + path}, nil))
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, err := s.Status(ctx)
		require.NoError(t, err, "QEMU loading the export:\n%s", dst.SerialTail(20))
		if st.State != "inmigrate" {
			require.Equal(t, "paused", st.State, "the guest was paused for its checkpoint")
			break
		}
		require.True(t, time.Now().Before(deadline), "QEMU did not load the export in time")
		time.Sleep(100 * time.Millisecond)
	}
	require.NoError(t, s.Cont(ctx))
	_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
	require.NoError(t, err, "guest loaded from the export does not verify its data")
	assert.NotRegexp(t, kernelTrouble, dst.Serial())
}

// exportQEMU exports a checkpoint as a migration stream and checks what
// Export says of it.
func exportQEMU(t *testing.T, ckpt string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "guest.qemu")
	res, err := Export(context.Background(), ExportOptions{Input: ckpt, Output: out, Format: FormatQEMU})
	require.NoError(t, err)
	t.Logf("export: %+v", *res)
	r, err := writer.Open(ckpt)
	require.NoError(t, err)
	defer r.Close()
	assert.Equal(t, r.Header().Pages.Saved, res.PagesWritten)
	st, err := os.Stat(out)
	require.NoError(t, err)
	assert.Equal(t, st.Size(), res.Bytes)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	return out
}

// coreFromFile writes a core of /coretarget from the checkpoint at path,
// its spinning thread included, and checks it in gdb.
func coreFromFile(t *testing.T, path string) {
	t.Helper()
	ctx := context.Background()
	ps, err := PSFile(ctx, path, nil, PSOptions{})
	require.NoError(t, err)
	var pid int32
	for _, p := range ps.Tasks {
		if p.Comm == vmtest.CoreTargetComm {
			pid = p.PID
		}
	}
	require.NotZero(t, pid, "the checkpoint's guest runs no %s", vmtest.CoreTargetComm)
	core := filepath.Join(t.TempDir(), "file.core")
	res, err := CoreFile(ctx, path, nil, CoreOptions{PID: pid, Output: core})
	require.NoError(t, err)
	t.Logf("core from the checkpoint: first thread %d (%s), registers from %s", res.Threads[0].TID, res.Threads[0].Comm, res.Threads[0].Registers)
	vmtest.CheckCore(t, core, pid, true)
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// binary is the kvmckpt command built for the tests that need a process of
// their own (to kill it).
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kvmckpt-bin-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "kvmckpt")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build kvmckpt: %v\n%s", err, out)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	vmtest.Main(m)
}

// cli runs kvmckpt in-process and returns its exit code and output.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	ctx := context.Background()
	err := run(ctx, &o, &e, args)
	return exitCode(ctx, err), o.String(), e.String() + errString(err)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{nil, exitUsage, "no command"},
		{[]string{"--help"}, exitOK, "Usage:"},
		{[]string{"frobnicate"}, exitUsage, "unknown command"},
		{[]string{"save", "-o", "x"}, exitUsage, "--qmp (a QMP socket) or --domain (a libvirt domain) is required"},
		{[]string{"save", "--qmp", "x", "--domain", "d", "-o", "x"}, exitUsage, "not both"},
		{[]string{"scan", "--qmp", "x", "--connect", "qemu:///system"}, exitUsage, "--connect goes with --domain"},
		{[]string{"export", "f", "-o", "x", "--format", "vmware"}, exitUsage, "qemu or libvirt"},
		{[]string{"export", "f", "-o", "x", "--format", "qemu", "--paused"}, exitUsage, "go with --format libvirt"},
		{[]string{"restore", "-i", "f", "--qmp", "x", "--domain", "d"}, exitUsage, "give one of"},
		{[]string{"ps"}, exitUsage, "is required"},
		{[]string{"save", "--qmp", "x"}, exitUsage, "--o is required"},
		{[]string{"save", "--qmp", "x", "-o", "y", "--quit", "--keep-paused"}, exitUsage, "exclude each other"},
		{[]string{"save", "--qmp", "x", "-o", "y", "--compress", "zip"}, exitUsage, "lz4 or none"},
		{[]string{"save", "--bogus"}, exitUsage, "not defined"},
		{[]string{"restore", "--qmp", "x"}, exitUsage, "--i is required"},
		{[]string{"restore", "-i", "x"}, exitUsage, "one of --qmp"},
		{[]string{"restore", "-i", "x", "--qmp", "y", "--launch"}, exitUsage, "one of --qmp"},
		{[]string{"restore", "-i", "x", "--qmp", "y", "--qemu", "/usr/bin/qemu-system-x86_64"}, exitUsage, "go with --launch"},
		{[]string{"inspect"}, exitUsage, "one checkpoint file"},
		{[]string{"profile"}, exitUsage, "subcommand"},
		{[]string{"profile", "build"}, exitUsage, "--kernel or --isf"},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, stdout, stderr := cli(t, c.args...)
			assert.Equal(t, c.code, code)
			assert.Contains(t, stdout+stderr, c.want)
		})
	}
}

func TestNotAQMPSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("220 smtp.example.com ESMTP\r\n"))
			go func() { time.Sleep(10 * time.Second); c.Close() }()
		}
	}()
	start := time.Now()
	code, _, stderr := cli(t, "scan", "--qmp", "unix:"+sock)
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stderr, "QMP")
	assert.Less(t, time.Since(start), 8*time.Second, "must not hang on a socket that is not QMP")

	code, _, stderr = cli(t, "scan", "--qmp", filepath.Join(t.TempDir(), "missing.sock"))
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stderr, "no such file")
}

func TestVerifyCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.kvmckpt")
	require.NoError(t, os.WriteFile(path, []byte("KVMCKPT\x00 but not really a checkpoint"), 0o600))
	code, _, stderr := cli(t, "verify", path)
	assert.Equal(t, exitInvalid, code)
	assert.Contains(t, stderr, "checkpoint invalid")
	code, _, _ = cli(t, "inspect", path)
	assert.Equal(t, exitInvalid, code)
	code, _, _ = cli(t, "restore", "-i", path, "--qmp", "/nonexistent")
	assert.Equal(t, exitInvalid, code, "restore refuses a corrupt file before touching any QEMU")
	code, _, _ = cli(t, "restore", "-i", path, "--launch")
	assert.Equal(t, exitInvalid, code, "restore refuses a corrupt file before touching any QEMU")
}

// TestCLIOnGuest drives the command on a real guest: scan and save with
// JSON output, inspect, verify, a second kvmckpt refused while one holds the
// guest, and a save killed half-way.
func TestCLIOnGuest(t *testing.T) {
	g := vmtest.Boot(t, vmtest.Config{MemMiB: 1024, Workload: vmtest.Workload{Churn: 512, Anon: 128, Tmpfs: 64}})
	g.WaitReady(t)
	dir := t.TempDir()
	isolateProfiles(t, dir)

	code, stdout, stderr := cli(t, "scan", "--qmp", g.QMPPath, "--json", "--map", filepath.Join(dir, "map.png"))
	require.Equal(t, exitOK, code, stderr)
	var scan map[string]any
	require.NoError(t, json.Unmarshal([]byte(stdout), &scan))
	assert.Greater(t, scan["pages_free"], float64(100000))
	png, err := os.ReadFile(filepath.Join(dir, "map.png"))
	require.NoError(t, err)
	assert.True(t, bytes.HasPrefix(png, []byte("\x89PNG")))

	out := filepath.Join(dir, "guest.kvmckpt")
	code, stdout, stderr = cli(t, "save", "--qmp", "unix:"+g.QMPPath, "-o", out, "--json")
	require.Equal(t, exitOK, code, stderr)
	var save map[string]any
	require.NoError(t, json.Unmarshal([]byte(stdout), &save))
	for _, k := range []string{"pages_total", "pages_saved", "pages_free", "pages_zero", "bytes_written", "device_state_bytes", "pause_ms", "duration_ms"} {
		assert.Contains(t, save, k)
	}
	code, stdout, _ = cli(t, "inspect", out, "--json")
	require.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "restore_command_line")
	code, _, _ = cli(t, "verify", out)
	require.Equal(t, exitOK, code)
	before, err := os.ReadFile(out)
	require.NoError(t, err)

	t.Run("ps", func(t *testing.T) {
		code, stdout, stderr := cli(t, "ps", "--qmp", g.QMPPath, "--threads", "--json")
		require.Equal(t, exitOK, code, stderr)
		var ps checkpoint.PSResult
		require.NoError(t, json.Unmarshal([]byte(stdout), &ps))
		byPid := map[int32]checkpoint.Process{}
		for _, p := range ps.Tasks {
			byPid[p.PID] = p
		}
		require.Contains(t, byPid, int32(2))
		assert.Equal(t, "kthreadd", byPid[2].Comm)
		assert.True(t, byPid[2].KernelThread)
		var workload bool
		for _, p := range ps.Tasks {
			if len(p.Cmdline) > 0 && strings.HasSuffix(p.Cmdline[0], "workload") {
				workload = true
				assert.False(t, p.KernelThread)
				assert.Greater(t, p.RSSPages, uint64(1000))
			}
		}
		assert.True(t, workload, "the workload's command line is read from its memory")
		assert.True(t, g.Status(t).Running, "ps puts the guest back to running")
		code, stdout, stderr = cli(t, "ps", "--qmp", g.QMPPath)
		require.Equal(t, exitOK, code, stderr)
		assert.Contains(t, stdout, "[kthreadd]")
		assert.Contains(t, stderr, "tasks, guest paused")

		// The same guest's tasks from the checkpoint saved above: the
		// file read as guest memory. The guest is quiet: the same
		// processes, with the same names and command lines.
		code, stdout, stderr = cli(t, "ps", out, "--json")
		require.Equal(t, exitOK, code, stderr)
		var fromFile checkpoint.PSResult
		require.NoError(t, json.Unmarshal([]byte(stdout), &fromFile))
		code, stdout, stderr = cli(t, "ps", "--qmp", g.QMPPath, "--json")
		require.Equal(t, exitOK, code, stderr)
		var live checkpoint.PSResult
		require.NoError(t, json.Unmarshal([]byte(stdout), &live))
		procs := func(r checkpoint.PSResult) map[int32]string {
			m := map[int32]string{}
			for _, p := range r.Tasks {
				if !strings.HasPrefix(p.Comm, "kworker") { // workers come and go
					m[p.PID] = p.Comm + " " + strings.Join(p.Cmdline, " ")
				}
			}
			return m
		}
		assert.Equal(t, procs(live), procs(fromFile))
		assert.Greater(t, len(procs(fromFile)), 10)
	})

	t.Run("core", func(t *testing.T) {
		code, stdout, stderr := cli(t, "ps", "--qmp", g.QMPPath, "--json")
		require.Equal(t, exitOK, code, stderr)
		var ps checkpoint.PSResult
		require.NoError(t, json.Unmarshal([]byte(stdout), &ps))
		var pid int32
		for _, p := range ps.Tasks {
			if p.Comm == vmtest.CoreTargetComm {
				pid = p.PID
			}
		}
		require.NotZero(t, pid, "the guest runs no %s", vmtest.CoreTargetComm)
		arg := strconv.Itoa(int(pid))

		// From the running guest, which runs on after it.
		live := filepath.Join(dir, "live.core")
		code, stdout, stderr = cli(t, "core", "--qmp", g.QMPPath, "--pid", arg, "-o", live, "--json")
		require.Equal(t, exitOK, code, stderr)
		var res checkpoint.CoreResult
		require.NoError(t, json.Unmarshal([]byte(stdout), &res))
		assert.Equal(t, pid, res.PID)
		assert.Len(t, res.Threads, 4)
		assert.Equal(t, []string{"/coretarget"}, res.Cmdline)
		assert.True(t, g.Status(t).Running, "core puts the guest back to running")
		vmtest.CheckCore(t, live, pid, false)

		// From the checkpoint saved above: the same process.
		fromFile := filepath.Join(dir, "file.core")
		code, stdout, stderr = cli(t, "core", out, "--pid", arg, "-o", fromFile)
		require.Equal(t, exitOK, code, stderr)
		assert.Contains(t, stdout, "core of pid "+arg)
		vmtest.CheckCore(t, fromFile, pid, false)

		// Refused: a kernel thread, a pid the guest does not have, no
		// -o. No file is left.
		bad := filepath.Join(dir, "bad.core")
		code, _, stderr = cli(t, "core", "--qmp", g.QMPPath, "--pid", "2", "-o", bad)
		assert.Equal(t, exitFailed, code)
		assert.Contains(t, stderr, "kernel thread")
		code, _, stderr = cli(t, "core", out, "--pid", "4000000", "-o", bad)
		assert.Equal(t, exitFailed, code)
		assert.Contains(t, stderr, "kvmckpt ps")
		code, _, _ = cli(t, "core", "--qmp", g.QMPPath, "--pid", arg)
		assert.Equal(t, exitUsage, code)
		assert.NoFileExists(t, bad)
		assert.True(t, g.Status(t).Running)
	})

	t.Run("squeeze without a balloon", func(t *testing.T) {
		sq := filepath.Join(dir, "squeezed.kvmckpt")
		code, _, stderr := cli(t, "save", "--qmp", g.QMPPath, "-o", sq, "--squeeze")
		assert.Equal(t, exitFailed, code)
		assert.Contains(t, stderr, "virtio-balloon-pci")
		assert.NoFileExists(t, sq)
		assert.True(t, g.Status(t).Running)
		code, _, stderr = cli(t, "save", "--qmp", g.QMPPath, "-o", sq, "--squeeze=lots")
		assert.Equal(t, exitUsage, code)
		assert.Contains(t, stderr, "512M")
	})

	t.Run("encrypted", func(t *testing.T) {
		key := filepath.Join(dir, "key")
		require.NoError(t, os.WriteFile(key, bytes.Repeat([]byte("k"), 32), 0o600))
		wrong := filepath.Join(dir, "wrong")
		require.NoError(t, os.WriteFile(wrong, bytes.Repeat([]byte("w"), 32), 0o600))
		enc := filepath.Join(dir, "enc.kvmckpt")
		code, _, stderr := cli(t, "save", "--qmp", g.QMPPath, "-o", enc, "--encrypt-key", key)
		require.Equal(t, exitOK, code, stderr)
		code, _, stderr = cli(t, "verify", enc)
		assert.Equal(t, exitInvalid, code)
		assert.Contains(t, stderr, "--encrypt-key")
		code, _, stderr = cli(t, "inspect", enc, "--encrypt-key", wrong)
		assert.Equal(t, exitInvalid, code)
		assert.Contains(t, stderr, "wrong key")
		code, stdout, stderr := cli(t, "inspect", enc, "--encrypt-key", key)
		require.Equal(t, exitOK, code, stderr)
		assert.Contains(t, stdout, "AES-256-GCM")
		code, _, stderr = cli(t, "verify", enc, "--encrypt-key", key)
		assert.Equal(t, exitOK, code, stderr)
		b, err := os.ReadFile(enc)
		require.NoError(t, err)
		assert.NotContains(t, string(b), "Linux version", "the kernel banner must not be readable")
		require.NoError(t, os.Chmod(key, 0o644))
		code, _, stderr = cli(t, "verify", enc, "--encrypt-key", key)
		assert.NotEqual(t, exitOK, code)
		assert.Contains(t, stderr, "chmod 600")
	})

	t.Run("busy", func(t *testing.T) {
		// Hold the guest's lock the way a running kvmckpt does.
		f, err := os.OpenFile(checkpoint.LockPath(g.QMPPath), os.O_RDWR|os.O_CREATE, 0o600)
		require.NoError(t, err)
		defer f.Close()
		defer os.Remove(f.Name()) // while still locked, as kvmckpt does
		require.NoError(t, syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB))
		code, _, stderr := cli(t, "scan", "--qmp", g.QMPPath)
		assert.Equal(t, exitBusy, code)
		assert.Contains(t, stderr, "another kvmckpt")
	})

	t.Run("killed", func(t *testing.T) {
		cmd := exec.Command(binary, "save", "--qmp", g.QMPPath, "-o", out, "-v")
		var errOut bytes.Buffer
		cmd.Stderr = &errOut
		require.NoError(t, cmd.Start())
		// Kill it once it has paused the guest.
		waitPaused(t, g.QMPPath, 20*time.Second)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		after, err := os.ReadFile(out)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(before, after), "the previous checkpoint must be intact")
		assert.False(t, g.Status(t).Running, "a killed kvmckpt leaves the guest paused")

		// The next run says so (without -v too: warnings always reach
		// stderr), resumes the guest, and cleans up.
		code, _, stderr := cli(t, "save", "--qmp", g.QMPPath, "-o", out)
		require.Equal(t, exitOK, code, stderr)
		assert.Contains(t, stderr, "earlier kvmckpt was stopped")
		st := g.Status(t)
		assert.True(t, st.Running, "guest must run again after the next save, is %s", st.State)
		left, _ := filepath.Glob(filepath.Join(dir, ".guest.kvmckpt.kvmckpt-tmp-*"))
		assert.Empty(t, left, "stale temporary files must be cleaned")
	})
}

// waitPaused waits until a kvmckpt process has written its pause record
// into the guest's lock file.
func waitPaused(t *testing.T, sock string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(checkpoint.LockPath(sock)); bytes.Contains(b, []byte("paused a running guest")) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("kvmckpt never paused the guest")
}

// waitLocked waits until the kvmckpt process cmd holds a flock (the
// guest's lock: it takes no other), or has exited. It reads /proc/locks
// rather than probing the lock, which could make kvmckpt find it busy.
func waitLocked(t *testing.T, cmd *exec.Cmd, timeout time.Duration) {
	t.Helper()
	pid := strconv.Itoa(cmd.Process.Pid)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile("/proc/locks")
		require.NoError(t, err)
		for _, line := range strings.Split(string(b), "\n") {
			// "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
			if f := strings.Fields(line); len(f) > 4 && f[1] == "FLOCK" && f[4] == pid {
				return
			}
		}
		if st, err := os.ReadFile("/proc/" + pid + "/stat"); err != nil || strings.Contains(string(st), ") Z ") {
			return // exited
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("kvmckpt never took the guest's lock")
}

// TestFaults interrupts saves and restores: by a signal to kvmckpt, and by
// QEMU dying under it. Each must end quickly with a clear error, no partial
// file and, where the guest survives, the guest in its prior run state.
func TestFaults(t *testing.T) {
	cfg := vmtest.Config{MemMiB: 1024, Workload: vmtest.Workload{Churn: 256, Anon: 256, Tmpfs: 64, Interval: 1}}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	dir := t.TempDir()
	isolateProfiles(t, dir)
	good := filepath.Join(dir, "good.kvmckpt")
	code, _, stderr := cli(t, "save", "--qmp", src.QMPPath, "-o", good)
	require.Equal(t, exitOK, code, stderr)

	// start runs kvmckpt and returns once it has paused the guest.
	start := func(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer) {
		cmd := exec.Command(binary, args...)
		var errOut bytes.Buffer
		cmd.Stderr = &errOut
		require.NoError(t, cmd.Start())
		return cmd, &errOut
	}
	wait := func(t *testing.T, cmd *exec.Cmd) int {
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			t.Fatal("kvmckpt did not stop within 60 s")
		}
		return cmd.ProcessState.ExitCode()
	}
	noTemp := func(t *testing.T) {
		left, _ := filepath.Glob(filepath.Join(dir, ".*kvmckpt-tmp-*"))
		assert.Empty(t, left, "temporary files left")
	}

	for _, c := range []struct {
		sig   syscall.Signal
		delay time.Duration
	}{{syscall.SIGINT, 0}, {syscall.SIGTERM, 0}, {syscall.SIGINT, 150 * time.Millisecond}, {syscall.SIGTERM, 400 * time.Millisecond}} {
		t.Run(fmt.Sprintf("save %v after %v", c.sig, c.delay), func(t *testing.T) {
			out := filepath.Join(dir, "sig.kvmckpt")
			cmd, errOut := start(t, "save", "--qmp", src.QMPPath, "-o", out)
			waitPaused(t, src.QMPPath, 20*time.Second)
			time.Sleep(c.delay)
			require.NoError(t, cmd.Process.Signal(c.sig))
			code := wait(t, cmd)
			t.Logf("exit %d: %s", code, errOut)
			if code == exitOK {
				// The signal came after the last point of no return: the
				// checkpoint is whole. Nothing more to check.
				require.NoError(t, checkpointVerify(out))
			} else {
				assert.Equal(t, exitInterrupted, code)
				assert.Contains(t, errOut.String(), "interrupted")
				_, err := os.Stat(out)
				assert.True(t, os.IsNotExist(err), "no checkpoint from an interrupted save")
			}
			noTemp(t)
			assert.True(t, src.Status(t).Running, "guest back to running")
		})
	}

	// A live save interrupted in its rounds, the guest running: no
	// file, no temporary file, the guest still running.
	t.Run("live save SIGTERM in the rounds", func(t *testing.T) {
		out := filepath.Join(dir, "live.kvmckpt")
		cmd, errOut := start(t, "save", "--live", "--qmp", src.QMPPath, "-o", out)
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if m, _ := filepath.Glob(filepath.Join(dir, ".live.kvmckpt.kvmckpt-tmp-*")); len(m) > 0 {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		code := wait(t, cmd)
		t.Logf("exit %d: %s", code, errOut)
		if code == exitOK {
			require.NoError(t, checkpointVerify(out))
			return
		}
		assert.Equal(t, exitInterrupted, code)
		_, err := os.Stat(out)
		assert.True(t, os.IsNotExist(err), "no checkpoint from an interrupted save")
		noTemp(t)
		assert.True(t, src.Status(t).Running, "the guest runs on")
	})

	t.Run("restore SIGTERM", func(t *testing.T) {
		tcfg := cfg
		tcfg.Incoming = true
		dst := vmtest.Boot(t, tcfg)
		cmd, errOut := start(t, "restore", "-i", good, "--qmp", dst.QMPPath)
		// Signal it once it holds the target's lock: its signal handler
		// is in place by then (installed before any work starts), so the
		// signal must end it in order, never by the default action.
		waitLocked(t, cmd, 20*time.Second)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		code := wait(t, cmd)
		t.Logf("exit %d: %s", code, errOut)
		if code != exitOK {
			assert.Equal(t, exitInterrupted, code)
			assert.Contains(t, errOut.String(), "interrupted")
		}
	})

	// A target started with the source's own mem-path (as an operator
	// copying inspect's command line might) shares the running source's
	// memory: a restore into it would overwrite that guest. So would a
	// save whose output is the guest's RAM file.
	t.Run("memory in use", func(t *testing.T) {
		tdir := t.TempDir()
		args := append([]string(nil), src.Args...)
		for i := range args {
			if strings.HasPrefix(args[i], "unix:"+src.QMPPath) {
				args[i] = "unix:" + filepath.Join(tdir, "qmp.sock") + ",server=on,wait=off"
			}
			if strings.HasPrefix(args[i], "file:"+src.SerialPath) {
				args[i] = "file:" + filepath.Join(tdir, "serial.log")
			}
		}
		args = append(args, "-incoming", "defer", "-S")
		// No RAM path of its own: Close must not remove the source's.
		dst, err := vmtest.StartWithArgs(context.Background(), args, filepath.Join(tdir, "qmp.sock"), filepath.Join(tdir, "serial.log"), filepath.Join(tdir, "none"))
		require.NoError(t, err)
		defer dst.Close()
		ramBefore, err := os.Stat(src.RAMPath)
		require.NoError(t, err)

		code, _, stderr := cli(t, "restore", "-i", good, "--qmp", dst.QMPPath, "--resume")
		assert.Equal(t, exitFailed, code)
		assert.Contains(t, stderr, "mapped by")
		assert.Contains(t, stderr, "mem-path of its own")
		assert.Equal(t, "inmigrate", dst.Status(t).State, "the target was not started")

		code, _, stderr = cli(t, "save", "--qmp", src.QMPPath, "-o", src.RAMPath)
		assert.Equal(t, exitFailed, code)
		assert.Contains(t, stderr, "mapped by")
		ramAfter, err := os.Stat(src.RAMPath)
		require.NoError(t, err)
		assert.True(t, os.SameFile(ramBefore, ramAfter), "the guest's RAM file is still at its path")
		assert.True(t, src.Status(t).Running, "the source runs on")
		// Its workload verifies its memory every second: untouched.
		code, _, stderr = cli(t, "save", "--qmp", src.QMPPath, "-o", filepath.Join(tdir, "after.kvmckpt"))
		require.Equal(t, exitOK, code, stderr)
		assert.NotContains(t, src.Serial(), "VERIFY FAIL")
	})

	t.Run("qemu dies during restore", func(t *testing.T) {
		tcfg := cfg
		tcfg.Incoming = true
		dst := vmtest.Boot(t, tcfg)
		cmd, errOut := start(t, "restore", "-i", good, "--qmp", dst.QMPPath)
		time.Sleep(30 * time.Millisecond)
		require.NoError(t, syscall.Kill(dst.PID, syscall.SIGKILL))
		code := wait(t, cmd)
		t.Logf("exit %d: %s", code, errOut)
		assert.NotEqual(t, exitOK, code)
	})

	// QEMU stopped (SIGSTOP) while it holds the guest paused for a save:
	// a signal to kvmckpt must still end it within a bound, saying that
	// the guest could not be resumed; once QEMU continues, the next
	// kvmckpt puts the guest back to running.
	t.Run("qemu stopped during save", func(t *testing.T) {
		out := filepath.Join(dir, "stopped.kvmckpt")
		cmd, errOut := start(t, "save", "--qmp", src.QMPPath, "-o", out)
		waitPaused(t, src.QMPPath, 20*time.Second)
		require.NoError(t, syscall.Kill(src.PID, syscall.SIGSTOP))
		defer syscall.Kill(src.PID, syscall.SIGCONT)
		time.Sleep(200 * time.Millisecond)
		sent := time.Now()
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		code := wait(t, cmd)
		took := time.Since(sent)
		t.Logf("exit %d after %v: %s", code, took, errOut)
		require.NoError(t, syscall.Kill(src.PID, syscall.SIGCONT))
		if code == exitOK {
			return // the save was done before QEMU stopped
		}
		assert.Equal(t, exitInterrupted, code)
		assert.Less(t, took, 20*time.Second, "a signal must end the wait on a stopped QEMU")
		assert.Contains(t, errOut.String(), "could not be resumed")
		assert.Contains(t, errOut.String(), "kvmckpt resume")
		_, err := os.Stat(out)
		assert.True(t, os.IsNotExist(err), "no checkpoint from an interrupted save")
		noTemp(t)

		// QEMU may run the commands still queued on the closed
		// connection once it continues (the guest then runs already), or
		// not: either way the next save leaves the guest running.
		code, _, stderr := cli(t, "save", "--qmp", src.QMPPath, "-o", out)
		require.Equal(t, exitOK, code, stderr)
		assert.True(t, src.Status(t).Running, "the guest runs after the next save")
	})

	// Last: the source dies.
	t.Run("qemu dies during save", func(t *testing.T) {
		out := filepath.Join(dir, "dies.kvmckpt")
		cmd, errOut := start(t, "save", "--qmp", src.QMPPath, "-o", out)
		waitPaused(t, src.QMPPath, 20*time.Second)
		require.NoError(t, syscall.Kill(src.PID, syscall.SIGKILL))
		code := wait(t, cmd)
		t.Logf("exit %d: %s", code, errOut)
		if code != exitOK {
			assert.Equal(t, exitFailed, code)
			_, err := os.Stat(out)
			assert.True(t, os.IsNotExist(err), "no checkpoint from a failed save")
		}
		noTemp(t)
		_, err := os.Stat(good)
		assert.NoError(t, err)
	})
}

// isolateProfiles points kvmckpt's cache, and so its profile store, at
// dir for the test. The test bed's kernel stays the one already resolved.
func isolateProfiles(t *testing.T, dir string) {
	t.Helper()
	kernel, err := vmtest.KernelPath("")
	require.NoError(t, err, "run make deps")
	t.Setenv("KVMCKPT_KERNEL", kernel)
	t.Setenv("KVMCKPT_CACHE", dir)
}

func checkpointVerify(path string) error { return checkpoint.Verify(path, nil, nil, nil) }

func TestProfileCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("reads the Debian kernel image")
	}
	kernel, err := vmtest.KernelPath("amd64")
	require.NoError(t, err, "run make deps")
	dir := t.TempDir()
	isolateProfiles(t, dir)

	out := filepath.Join(dir, "p.json")
	code, stdout, stderr := cli(t, "profile", "build", "--kernel", kernel, "-o", out)
	require.Equal(t, exitOK, code, stderr)
	assert.Contains(t, stdout, "6.1.0-47-amd64")
	code, stdout, stderr = cli(t, "profile", "show", out)
	require.Equal(t, exitOK, code, stderr)
	for _, want := range []string{"node_data", "vmemmap_base", "free_area", "MAX_ORDER", "NR_PCP_LISTS"} {
		assert.Contains(t, stdout, want)
	}

	// Into the store, then list and show by name.
	code, _, stderr = cli(t, "profile", "build", "--kernel", kernel)
	require.Equal(t, exitOK, code, stderr)
	code, stdout, _ = cli(t, "profile", "list")
	require.Equal(t, exitOK, code)
	assert.Contains(t, stdout, "6.1.0-47-amd64-")
	name := strings.Fields(strings.Split(stdout, "\n")[1])[0]
	code, stdout, _ = cli(t, "profile", "show", name, "--json")
	require.Equal(t, exitOK, code)
	assert.Contains(t, stdout, `"banner"`)

	isf, err := filepath.Glob("../../testdata/profiles/isf-*.json.xz")
	require.NoError(t, err)
	require.NotEmpty(t, isf)
	code, _, stderr = cli(t, "profile", "build", "--isf", isf[0], "-o", filepath.Join(dir, "isf.json"))
	assert.Equal(t, exitOK, code, stderr)

	notKernel := filepath.Join(dir, "not-a-kernel")
	require.NoError(t, os.WriteFile(notKernel, []byte("hostname\n"), 0o600))
	code, _, stderr = cli(t, "profile", "build", "--kernel", notKernel)
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stderr, "not an x86 bzImage or ELF vmlinux")
	code, _, stderr = cli(t, "profile", "show", "no-such-profile")
	assert.Equal(t, exitFailed, code)
	assert.Contains(t, stderr, "kvmckpt profile list")
}

package qmp

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// shmPrefix starts the name of every RAM file this package's tests create
// in /dev/shm. It extends the test bed's prefix so that
// scripts/leftovers.sh finds strays.
const shmPrefix = "kvmckpt-test-qmp-"

// TestMain fails the run if a test left a RAM file behind.
func TestMain(m *testing.M) {
	code := m.Run()
	left, _ := filepath.Glob("/dev/shm/" + shmPrefix + "*")
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "RAM files left behind: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// requiresQEMU skips a test under -short and fails it when QEMU is missing:
// a missing test bed is a broken set-up, not a reason to pass.
func requiresQEMU(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("starts QEMU; skipped with -short")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		tb.Fatal("qemu-system-x86_64 not found: run `make deps`")
	}
}

// vmConfig describes a test QEMU. It boots no guest: with -S the vCPUs
// never run; without, SeaBIOS runs and finds nothing to boot.
type vmConfig struct {
	// Machine is "pc" or "q35"; empty means "pc".
	Machine string
	// Accel is "tcg" (the default) or "kvm".
	Accel string
	// MemMiB is the RAM size; 0 means 256.
	MemMiB int
	// Running leaves out -S.
	Running bool
	// Incoming adds -incoming defer.
	Incoming bool
	// Args are appended to the command line.
	Args []string
}

// testVM is a QEMU process started by [startVM].
type testVM struct {
	PID     int
	Socket  string
	MemPath string
	Args    []string

	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has been reaped
	stderr *lockedBuffer
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startVM starts QEMU with a shared RAM file in /dev/shm and a QMP socket,
// and waits for the socket. Cleanup kills the process by its PID and
// removes the RAM file and socket, also when the test fails.
func startVM(tb testing.TB, cfg vmConfig) *testVM {
	tb.Helper()
	requiresQEMU(tb)
	if cfg.Machine == "" {
		cfg.Machine = "pc"
	}
	if cfg.Accel == "" {
		cfg.Accel = "tcg"
	}
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 256
	}
	// Socket paths are limited to 108 bytes, too few for t.TempDir under
	// long test names.
	dir, err := os.MkdirTemp("", "kvmckpt-qmp")
	if err != nil {
		tb.Fatal(err)
	}
	var rnd [6]byte
	rand.Read(rnd[:])
	vm := &testVM{
		Socket:  filepath.Join(dir, "qmp.sock"),
		MemPath: "/dev/shm/" + shmPrefix + hex.EncodeToString(rnd[:]),
		exited:  make(chan struct{}),
		stderr:  &lockedBuffer{},
	}
	vm.Args = []string{
		"-machine", cfg.Machine + ",accel=" + cfg.Accel,
		"-m", fmt.Sprintf("%dM", cfg.MemMiB),
		"-object", fmt.Sprintf("memory-backend-file,id=mem0,size=%dM,mem-path=%s,share=on", cfg.MemMiB, vm.MemPath),
		"-machine", "memory-backend=mem0",
		"-nographic", "-nodefaults", "-display", "none",
		"-qmp", "unix:" + vm.Socket + ",server=on,wait=off",
	}
	if !cfg.Running {
		vm.Args = append(vm.Args, "-S")
	}
	if cfg.Incoming {
		vm.Args = append(vm.Args, "-incoming", "defer")
	}
	vm.Args = append(vm.Args, cfg.Args...)

	vm.cmd = exec.Command("qemu-system-x86_64", vm.Args...)
	vm.cmd.Stdout = vm.stderr
	vm.cmd.Stderr = vm.stderr
	if err := vm.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		tb.Fatalf("start QEMU: %v", err)
	}
	vm.PID = vm.cmd.Process.Pid
	go func() {
		vm.cmd.Wait()
		close(vm.exited)
	}()
	tb.Cleanup(func() {
		vm.kill(tb)
		os.Remove(vm.MemPath)
		os.RemoveAll(dir)
		if tb.Failed() {
			tb.Logf("QEMU %d output:\n%s", vm.PID, vm.stderr.String())
		}
	})

	// QEMU creates the socket file before it listens on it; wait until a
	// connection goes through. QEMU greets the probe and forgets it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", vm.Socket); err == nil {
			c.Close()
			return vm
		}
		select {
		case <-vm.exited:
			tb.Fatalf("QEMU exited at start-up: %s\nqemu-system-x86_64 %s", vm.stderr.String(), strings.Join(vm.Args, " "))
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("QEMU did not create %s within 10s", vm.Socket)
		}
	}
}

// kill kills QEMU by PID and reaps it.
func (vm *testVM) kill(tb testing.TB) {
	select {
	case <-vm.exited:
		return
	default:
	}
	if err := vm.cmd.Process.Kill(); err != nil {
		tb.Logf("kill QEMU %d: %v", vm.PID, err)
	}
	select {
	case <-vm.exited:
	case <-time.After(10 * time.Second):
		tb.Errorf("QEMU %d did not exit after SIGKILL", vm.PID)
	}
}

// waitExit waits up to d for QEMU to exit by itself and reports whether it
// did.
func (vm *testVM) waitExit(d time.Duration) bool {
	select {
	case <-vm.exited:
		return true
	case <-time.After(d):
		return false
	}
}

// dial opens a session to vm, closed by Cleanup.
func (vm *testVM) dial(tb testing.TB) *Session {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Dial(ctx, "unix:"+vm.Socket)
	if err != nil {
		tb.Fatalf("Dial: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// testContext returns a context that ends with the test or after d.
func testContext(tb testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}

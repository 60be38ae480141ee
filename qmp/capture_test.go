package qmp

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/cachedir"
)

var capture = flag.Bool("qmp.capture", false, "regenerate the monitor output in testdata/ from real QEMU processes (slow)")

// fixtureOutput is one HMP command whose output becomes a fixture.
type fixtureOutput struct {
	file string
	hmp  string
	cpu  int
}

// fixtureVM is a QEMU to capture fixtures from once ready says so.
type fixtureVM struct {
	name    string
	cfg     vmConfig
	needs   string // a file the VM needs; the capture is skipped without it
	timeout time.Duration
	ready   func(ctx context.Context, s *Session, vm *testVM) bool
	outputs []fixtureOutput
}

const ovmfPath = "/usr/share/qemu/OVMF.fd"

// captureSerial is where the Linux guest's console goes.
var captureSerial = filepath.Join(os.TempDir(), "kvmckpt-qmp-capture-serial.txt")

// kernelPath is the guest kernel `make deps` caches (internal/vmtest's
// default flavour). vmtest is not imported: it may one day import qmp.
func kernelPath() string {
	if k := os.Getenv("KVMCKPT_KERNEL"); strings.Contains(k, "/") {
		return k
	}
	path, _ := cachedir.Path("kernels", "amd64", "vmlinuz")
	return path
}

func fixtureVMs() []fixtureVM {
	mtree := func(file string) fixtureOutput { return fixtureOutput{file, "info mtree -f", -1} }
	regs := func(file string) fixtureOutput { return fixtureOutput{file, "info registers", 0} }
	now := func(context.Context, *Session, *testVM) bool { return true }
	serial := captureSerial
	return []fixtureVM{
		{name: "pc-1g", cfg: vmConfig{Machine: "pc", MemMiB: 1024}, ready: now,
			outputs: []fixtureOutput{mtree("mtree-pc-1g.txt"), regs("registers-pc-reset.txt")}},
		{name: "q35-3g", cfg: vmConfig{Machine: "q35", MemMiB: 3072}, ready: now,
			outputs: []fixtureOutput{mtree("mtree-q35-3g.txt")}},
		{name: "pc-4g", cfg: vmConfig{Machine: "pc", MemMiB: 4096}, ready: now,
			outputs: []fixtureOutput{mtree("mtree-pc-4g.txt")}},
		{name: "q35-3g-kvm", cfg: vmConfig{Machine: "q35", Accel: "kvm", MemMiB: 3072}, needs: "/dev/kvm", ready: now,
			outputs: []fixtureOutput{mtree("mtree-q35-3g-kvm.txt")}},
		{
			// UEFI firmware in long mode, with PCI devices whose BARs it
			// has placed and the BIOS area it has made read-only.
			name: "q35-2g-ovmf",
			cfg: vmConfig{Machine: "q35", MemMiB: 2048, Running: true, Args: []string{
				"-smp", "2", "-bios", ovmfPath, "-device", "VGA", "-device", "virtio-rng-pci",
				"-netdev", "user,id=n0,restrict=on", "-device", "e1000,netdev=n0",
			}},
			needs:   ovmfPath,
			timeout: 2 * time.Minute,
			ready: func(ctx context.Context, s *Session, _ *testVM) bool {
				out, err := s.HumanMonitorCommand(ctx, "info mtree -f", -1)
				return err == nil && strings.Contains(out, "(prio 0, rom): mem0 @")
			},
			outputs: []fixtureOutput{mtree("mtree-q35-2g-ovmf.txt"), regs("registers-q35-ovmf.txt")},
		},
		{
			// Linux with 5-level paging, after it panicked for want of
			// a root file system.
			name: "q35-linux-la57",
			cfg: vmConfig{Machine: "q35", MemMiB: 1024, Running: true, Args: []string{
				"-cpu", "max,+la57", "-kernel", kernelPath(), "-append", "console=ttyS0",
				"-serial", "file:" + serial,
			}},
			needs:   kernelPath(),
			timeout: 5 * time.Minute,
			ready: func(context.Context, *Session, *testVM) bool {
				b, _ := os.ReadFile(serial)
				return strings.Contains(string(b), "end Kernel panic")
			},
			outputs: []fixtureOutput{regs("registers-linux-la57.txt")},
		},
	}
}

// TestCaptureFixtures regenerates the monitor output fixtures:
//
//	go test ./qmp/ -run TestCaptureFixtures -qmp.capture -v
func TestCaptureFixtures(t *testing.T) {
	if !*capture {
		t.Skip("regenerates testdata/; run with -qmp.capture")
	}
	os.Remove(captureSerial)
	t.Cleanup(func() { os.Remove(captureSerial) })
	for _, f := range fixtureVMs() {
		t.Run(f.name, func(t *testing.T) {
			if f.needs != "" {
				if _, err := os.Stat(f.needs); err != nil {
					t.Skipf("needs %s: %v", f.needs, err)
				}
			}
			t.Parallel()
			vm := startVM(t, f.cfg)
			s := vm.dial(t)
			timeout := f.timeout
			if timeout == 0 {
				timeout = 30 * time.Second
			}
			ctx := testContext(t, timeout)
			for !f.ready(ctx, s, vm) {
				select {
				case <-ctx.Done():
					t.Fatalf("not ready within %v", timeout)
				case <-time.After(time.Second):
				}
			}
			if f.cfg.Running {
				if err := s.Stop(ctx); err != nil {
					t.Fatal(err)
				}
			}
			for _, o := range f.outputs {
				out, err := s.HumanMonitorCommand(ctx, o.hmp, o.cpu)
				if err != nil {
					t.Fatalf("%s: %v", o.hmp, err)
				}
				if err := os.WriteFile(filepath.Join("testdata", o.file), []byte(out), 0o644); err != nil {
					t.Fatal(err)
				}
				t.Logf("wrote testdata/%s (%d bytes)", o.file, len(out))
			}
		})
	}
}

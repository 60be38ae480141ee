package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"github.com/kvmckpt/kvmckpt/qmp"
)

// RequiresQEMU skips a test under -short, and fails it when QEMU, a kernel
// or the initramfs is missing: a missing test bed is a broken set-up, not a
// reason to pass.
func RequiresQEMU(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("boots a guest; skipped with -short")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		tb.Fatal("qemu-system-x86_64 not found: run `make deps`")
	}
	if _, err := KernelPath(""); err != nil {
		tb.Fatalf("%v", err)
	}
	if _, err := InitramfsPath(); err != nil {
		tb.Fatalf("%v", err)
	}
}

// Boot starts a guest for a test and closes it when the test ends. On
// failure the tail of the serial console goes to the test log.
func Boot(tb testing.TB, cfg Config) *Guest {
	tb.Helper()
	RequiresQEMU(tb)
	g, err := Start(context.Background(), cfg)
	if err != nil {
		tb.Fatalf("boot guest: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("serial console of %s guest (last lines):\n%s", cfg.Machine, g.SerialTail(30))
		}
		g.Close()
	})
	return g
}

// BootTimeout is how long a test waits for a guest's ready marker; under
// TCG a guest that fills a few hundred MiB is ready in well under a minute.
const BootTimeout = 3 * time.Minute

var readyRE = regexp.MustCompile(`KW (READY|ERROR.*)`)

// WaitReady waits for the workload's ready marker and fails the test on a
// workload error.
func (g *Guest) WaitReady(tb testing.TB) {
	tb.Helper()
	m, _, err := g.WaitSerial(context.Background(), readyRE, 0, BootTimeout)
	if err != nil {
		tb.Fatal(err)
	}
	if m != "KW READY" {
		tb.Fatalf("workload failed: %s", m)
	}
}

// Truth waits for and parses the workload's ground truth.
func (g *Guest) Truth(tb testing.TB) *Truth {
	tb.Helper()
	g.WaitReady(tb)
	t, err := ParseTruth(g.Serial())
	if err != nil {
		tb.Fatal(err)
	}
	return t
}

var truth2RE = regexp.MustCompile(`KW TRUTH2 END`)

// LaterTruth waits for the workload's second page snapshot and parses the
// truth again with it.
func (g *Guest) LaterTruth(tb testing.TB) *Truth {
	tb.Helper()
	if _, _, err := g.WaitSerial(context.Background(), truth2RE, 0, time.Minute); err != nil {
		tb.Fatal(err)
	}
	t, err := ParseTruth(g.Serial())
	if err != nil {
		tb.Fatal(err)
	}
	return t
}

// Main runs a package's tests and then fails the run if the test bed left
// a QEMU process or a RAM file behind. Use it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	stopLibvirt()
	if left := Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "vmtest: left behind after the tests: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// Status asks the guest's QEMU for its run state over a QMP session of its
// own (QEMU serves one QMP client at a time: nothing else may be connected).
func (g *Guest) Status(tb testing.TB) qmp.Status {
	tb.Helper()
	ctx := context.Background()
	s, err := qmp.Dial(ctx, g.QMPPath)
	if err != nil {
		tb.Fatalf("status of guest: %v", err)
	}
	defer s.Close()
	st, err := s.Status(ctx)
	if err != nil {
		tb.Fatalf("status of guest: %v", err)
	}
	return st
}

// IsNotFound reports whether err means the test bed is not set up.
func IsNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// MigrationCapabilities asks the guest's QEMU for its migration
// capabilities, as [Guest.Status] asks for its run state.
func (g *Guest) MigrationCapabilities(tb testing.TB) map[string]bool {
	tb.Helper()
	ctx := context.Background()
	s, err := qmp.Dial(ctx, g.QMPPath)
	if err != nil {
		tb.Fatalf("migration capabilities of guest: %v", err)
	}
	defer s.Close()
	caps, err := s.MigrationCapabilities(ctx)
	if err != nil {
		tb.Fatalf("migration capabilities of guest: %v", err)
	}
	return caps
}

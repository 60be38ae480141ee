package qmp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// These tests start real QEMU processes (no guest kernel; SeaBIOS at most)
// through startVM; -short skips them.

func TestSessionQEMU(t *testing.T) {
	vm := startVM(t, vmConfig{Machine: "pc"})
	s := vm.dial(t)
	ctx := testContext(t, 20*time.Second)

	v, err := s.Version(ctx)
	if err != nil || !strings.HasPrefix(v, "7.") && !strings.HasPrefix(v, "8.") && !strings.HasPrefix(v, "9.") {
		t.Errorf("Version() = %q, %v", v, err)
	}
	t.Logf("QEMU %s", v)

	m, err := s.MachineType(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(m.Type, "pc-i440fx-") || m.Chipset != ChipsetI440FX || m.Arch != "x86_64" {
		t.Errorf("MachineType() = %+v", m)
	}

	checkStatus := func(want Status) {
		t.Helper()
		st, err := s.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st != want {
			t.Errorf("Status() = %+v, want %+v", st, want)
		}
		if err := st.CheckSaveable(); err != nil {
			t.Errorf("CheckSaveable(%q) = %v", st.State, err)
		}
	}
	checkStatus(Status{Running: false, State: "prelaunch"})
	if err := s.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	checkStatus(Status{Running: true, State: "running"})
	if err := s.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	checkStatus(Status{Running: false, State: "paused"})
	if err := s.Stop(ctx); err != nil {
		t.Errorf("second Stop() = %v", err)
	}

	var qe *Error
	if err := s.Run(ctx, "no-such-command", nil, nil); !errors.As(err, &qe) || qe.Class != ClassCommandNotFound {
		t.Errorf("unknown command: got %v, want class CommandNotFound", err)
	}
	if err := s.Run(ctx, "qom-get", map[string]string{"path": "/machine", "property": "no-such-property"}, nil); !errors.As(err, &qe) || qe.Class != ClassGenericError {
		t.Errorf("unknown property: got %v, want class GenericError", err)
	}

	// Identity: the session's peer, a second connection queued behind it,
	// and the command line behind the PID.
	for name, f := range map[string]func() (int, error){
		"Session.PeerPID": s.PeerPID,
		"PeerPID":         func() (int, error) { return PeerPID("unix:" + vm.Socket) },
	} {
		pid, err := f()
		if err != nil || pid != vm.PID {
			t.Errorf("%s() = %d, %v; want %d", name, pid, err, vm.PID)
		}
	}
	args, err := ProcessCmdline(vm.PID)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(args[1:], vm.Args) || !strings.HasSuffix(args[0], "qemu-system-x86_64") {
		t.Errorf("ProcessCmdline() = %q, want qemu-system-x86_64 %q", args, vm.Args)
	}
	// QEMU serves one client at a time: a second session gets no greeting.
	dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if s2, err := Dial(dctx, vm.Socket); !errors.Is(err, ErrNotQMP) || !errors.Is(err, ErrTimeout) {
		t.Errorf("second Dial: got %v, want ErrNotQMP and ErrTimeout", err)
		if err == nil {
			s2.Close()
		}
	}
	// The queued connections must not disturb the session.
	if _, err := s.Status(ctx); err != nil {
		t.Errorf("Status() after PeerPID: %v", err)
	}

	if err := s.Quit(ctx); err != nil {
		t.Errorf("Quit() = %v", err)
	}
	if !vm.waitExit(5 * time.Second) {
		t.Error("QEMU still running after Quit")
	}
	if _, err := s.Status(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Status() after Quit: got %v, want ErrClosed", err)
	}
}

func TestRAMQEMU(t *testing.T) {
	tests := []struct {
		machine string
		memMiB  int
		chipset Chipset
		want    []Mapping
	}{
		{"pc", 1024, ChipsetI440FX, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 1*gib - 1*mib},
		}},
		{"q35", 3072, ChipsetQ35, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 2*gib - 1*mib},
			{"mem0", 4 * gib, 2 * gib, 1 * gib},
		}},
		{"pc", 4096, ChipsetI440FX, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 3*gib - 1*mib},
			{"mem0", 4 * gib, 3 * gib, 1 * gib},
		}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s-%dM", tt.machine, tt.memMiB), func(t *testing.T) {
			t.Parallel()
			vm := startVM(t, vmConfig{Machine: tt.machine, MemMiB: tt.memMiB})
			s := vm.dial(t)
			ctx := testContext(t, 20*time.Second)

			m, err := s.MachineType(ctx)
			if err != nil || m.Chipset != tt.chipset {
				t.Errorf("MachineType() = %+v, %v; want chipset %s", m, err, tt.chipset)
			}

			backends, err := s.RAMBackends(ctx)
			if err != nil {
				t.Fatal(err)
			}
			want := []Backend{{ID: "mem0", Type: "memory-backend-file", Size: uint64(tt.memMiB) * mib,
				MemPath: vm.MemPath, Share: true, region: "mem0"}}
			if !slices.Equal(backends, want) {
				t.Errorf("RAMBackends() = %+v, want %+v", backends, want)
			}

			maps, err := s.RAMLayout(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(maps, tt.want) {
				t.Errorf("RAMLayout() = %v, want %v", maps, tt.want)
			}
			t.Logf("%s %d MiB: %v", m.Type, tt.memMiB, maps)
		})
	}
}

func TestCPURegistersQEMU(t *testing.T) {
	vm := startVM(t, vmConfig{Args: []string{"-smp", "2"}})
	s := vm.dial(t)
	ctx := testContext(t, 20*time.Second)

	idx, err := s.CPUIndexes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(idx, []int{0, 1}) {
		t.Errorf("CPUIndexes = %v, want [0 1]", idx)
	}
	// No balloon device: a clear error, for a caller to tell from others.
	if _, err := s.BalloonActual(ctx); !errors.Is(err, ErrNoBalloon) {
		t.Errorf("BalloonActual without a balloon: %v, want ErrNoBalloon", err)
	}
	if err := s.SetBalloon(ctx, 1<<30); !errors.Is(err, ErrNoBalloon) {
		t.Errorf("SetBalloon without a balloon: %v, want ErrNoBalloon", err)
	}
	// At reset every vCPU is in real mode at the reset vector (SDM Vol. 3A
	// table 10-1).
	for cpu := 0; cpu < 2; cpu++ {
		r, err := s.CPURegisters(ctx, cpu)
		if err != nil {
			t.Fatal(err)
		}
		if want := resetRegisters(cpu); r != want {
			t.Errorf("CPU %d: %+v, want %+v", cpu, r, resetRegisters(cpu))
		}
		if r.PagingLevels() != 0 {
			t.Errorf("CPU %d: PagingLevels() = %d", cpu, r.PagingLevels())
		}
	}
	var qe *Error
	if _, err := s.CPURegisters(ctx, 2); !errors.As(err, &qe) || qe.Class != ClassGenericError {
		t.Errorf("CPU 2 of 2: got %v, want a GenericError", err)
	}

	// SeaBIOS switches to 32-bit protected mode.
	if err := s.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := s.CPURegisters(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		if r.CR0&CR0PE != 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("SeaBIOS did not enter protected mode: %+v", r)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// copyFile copies the source guest's RAM file over the destination's, as a
// restore does before loading the device state.
func copyFile(tb testing.TB, dst, src string) {
	tb.Helper()
	in, err := os.Open(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		tb.Fatal(err)
	}
	if err := out.Close(); err != nil {
		tb.Fatal(err)
	}
}

// runSeaBIOS lets the guest run until SeaBIOS is in protected mode, and
// pauses it.
func runSeaBIOS(ctx context.Context, tb testing.TB, s *Session) {
	tb.Helper()
	if err := s.Cont(ctx); err != nil {
		tb.Fatal(err)
	}
	for {
		r, err := s.CPURegisters(ctx, 0)
		if err != nil {
			tb.Fatal(err)
		}
		if r.CR0&CR0PE != 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Stop(ctx); err != nil {
		tb.Fatal(err)
	}
}

func TestSaveLoadDeviceStateQEMU(t *testing.T) {
	for _, machine := range []string{"pc", "q35"} {
		t.Run(machine, func(t *testing.T) {
			t.Parallel()
			testSaveLoad(t, machine)
		})
	}
}

func testSaveLoad(t *testing.T, machine string) {
	src := startVM(t, vmConfig{Machine: machine})
	dst := startVM(t, vmConfig{Machine: machine, Incoming: true})
	ss := src.dial(t)
	ds := dst.dial(t)
	ctx := testContext(t, 30*time.Second)

	runSeaBIOS(ctx, t, ss)
	regs, err := ss.CPURegisters(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	layout, err := ss.RAMLayout(ctx)
	if err != nil {
		t.Fatal(err)
	}

	var stream bytes.Buffer
	start := time.Now()
	n, err := ss.SaveDeviceState(ctx, &stream)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: device state %d bytes in %v", machine, n, time.Since(start))
	if n != int64(stream.Len()) {
		t.Errorf("SaveDeviceState returned %d, wrote %d bytes", n, stream.Len())
	}
	if !bytes.HasPrefix(stream.Bytes(), []byte("QEVM")) {
		t.Errorf("stream starts with %q, want QEVM", stream.Bytes()[:min(stream.Len(), 8)])
	}
	// The 256 MiB of shared RAM must not be in it; firmware RAM blocks
	// (pc.bios, pc.rom) and device state are.
	if n < 4096 || n > 8*mib {
		t.Errorf("device state is %d bytes", n)
	}
	// QEMU will not migrate the source again before it ran.
	if st, err := ss.Status(ctx); err != nil || st.State != "postmigrate" || !errors.Is(st.CheckSaveable(), ErrNotSaveable) {
		t.Errorf("source after save: %+v, %v", st, err)
	}
	if _, err := ss.SaveDeviceState(ctx, io.Discard); err == nil {
		t.Error("save in postmigrate: no error")
	}
	caps, err := ss.MigrationCapabilities(ctx)
	if err != nil || !caps[CapIgnoreShared] {
		t.Errorf("capabilities after save: %v, %v", caps, err)
	}

	// Restore into the second QEMU, with the RAM file copied over.
	copyFile(t, dst.MemPath, src.MemPath)
	if err := ds.LoadDeviceState(ctx, bytes.NewReader(stream.Bytes())); err != nil {
		t.Fatal(err)
	}
	st, err := ds.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Saved paused, so restored paused (-S or not).
	if st != (Status{Running: false, State: "paused"}) {
		t.Errorf("destination after load: %+v", st)
	}
	got, err := ds.CPURegisters(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got != regs {
		t.Errorf("registers after load:\n got %+v\nwant %+v", got, regs)
	}
	if l, err := ds.RAMLayout(ctx); err != nil || !slices.Equal(l, layout) {
		t.Errorf("destination layout %v, %v; source %v", l, err, layout)
	}
	if err := ds.LoadDeviceState(ctx, bytes.NewReader(stream.Bytes())); !errors.Is(err, ErrNotIncoming) {
		t.Errorf("second load: got %v, want ErrNotIncoming", err)
	}
	if err := ds.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := ds.Status(ctx); err != nil || st.State != "running" {
		t.Errorf("destination after cont: %+v, %v", st, err)
	}

	// The source resumes, and can be saved again.
	if err := ss.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ss.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := ss.SaveDeviceState(ctx, io.Discard); err != nil || n == 0 {
		t.Errorf("second save: %d, %v", n, err)
	}
}

// failingWriter fails once more than n bytes have been written.
type failingWriter struct{ n int }

var errWriter = errors.New("disk full")

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		k := w.n
		w.n = 0
		return k, errWriter
	}
	w.n -= len(p)
	return len(p), nil
}

// blockingWriter blocks every write until ctx ends, then fails it, like a
// stalled disk given up on. (Accepting the bytes instead would let QEMU
// finish the migration in a race with the cancel.)
type blockingWriter struct{ ctx context.Context }

func (w blockingWriter) Write(p []byte) (int, error) {
	<-w.ctx.Done()
	return 0, w.ctx.Err()
}

func TestSaveDeviceStateAbortQEMU(t *testing.T) {
	vm := startVM(t, vmConfig{})
	s := vm.dial(t)
	ctx := testContext(t, 30*time.Second)
	checkIdle := func(what string) {
		t.Helper()
		mig, err := s.MigrationStatus(ctx)
		if err != nil || !mig.terminal() || mig.Status == "completed" {
			t.Errorf("%s: migration %+v, %v; want failed or cancelled", what, mig, err)
		}
		t.Logf("%s: migration %+v", what, mig)
	}

	n, err := s.SaveDeviceState(ctx, &failingWriter{n: 1000})
	if !errors.Is(err, errWriter) {
		t.Errorf("failing writer: got %d, %v; want the writer's error", n, err)
	}
	checkIdle("failing writer")

	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	n, err = s.SaveDeviceState(cctx, blockingWriter{cctx})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: got %d, %v; want context.Canceled", n, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancelled save took %v", d)
	}
	checkIdle("cancelled")

	// An incompatible capability is refused before anything starts.
	if err := s.SetMigrationCapabilities(ctx, map[string]bool{"pause-before-switchover": true}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SaveDeviceState(ctx, io.Discard); !errors.Is(err, ErrCapability) {
		t.Errorf("pause-before-switchover: got %v, want ErrCapability", err)
	}
	if err := s.SetMigrationCapabilities(ctx, map[string]bool{"pause-before-switchover": false, CapIgnoreShared: false}); err != nil {
		t.Fatal(err)
	}

	// A save that fails once QEMU stopped the guest for the final pass
	// leaves a guest that was not running in "postmigrate"; it has to
	// run before the next save. One that fails earlier leaves it as it
	// was.
	st, err := s.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after failed saves: %q", st.State)
	switch st.State {
	case "prelaunch":
	case "postmigrate":
		if !errors.Is(st.CheckSaveable(), ErrNotSaveable) {
			t.Error("postmigrate is saveable")
		}
		if err := s.Cont(ctx); err != nil {
			t.Fatal(err)
		}
		if err := s.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	default:
		t.Errorf("after failed saves: %+v", st)
	}
	var buf bytes.Buffer
	if n, err := s.SaveDeviceState(ctx, &buf); err != nil || !bytes.HasPrefix(buf.Bytes(), []byte("QEVM")) {
		t.Errorf("save after aborts: %d, %v", n, err)
	}
}

func TestLoadDeviceStateErrorsQEMU(t *testing.T) {
	t.Run("not incoming", func(t *testing.T) {
		t.Parallel()
		vm := startVM(t, vmConfig{})
		s := vm.dial(t)
		if err := s.LoadDeviceState(testContext(t, 10*time.Second), strings.NewReader("QEVM")); !errors.Is(err, ErrNotIncoming) {
			t.Errorf("got %v, want ErrNotIncoming", err)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		t.Parallel()
		vm := startVM(t, vmConfig{Incoming: true})
		s := vm.dial(t)
		err := s.LoadDeviceState(testContext(t, 20*time.Second), strings.NewReader(strings.Repeat("garbage ", 1000)))
		if !errors.Is(err, ErrMigrationFailed) {
			t.Errorf("got %v, want ErrMigrationFailed", err)
		}
		t.Log(err)
		if !vm.waitExit(5 * time.Second) {
			t.Error("QEMU still running after a failed load")
		}
	})
	t.Run("truncated", func(t *testing.T) {
		t.Parallel()
		src := startVM(t, vmConfig{})
		dst := startVM(t, vmConfig{Incoming: true})
		ctx := testContext(t, 20*time.Second)
		var buf bytes.Buffer
		if _, err := src.dial(t).SaveDeviceState(ctx, &buf); err != nil {
			t.Fatal(err)
		}
		err := dst.dial(t).LoadDeviceState(ctx, bytes.NewReader(buf.Bytes()[:buf.Len()/2]))
		if !errors.Is(err, ErrMigrationFailed) {
			t.Errorf("got %v, want ErrMigrationFailed", err)
		}
		t.Log(err)
	})
	t.Run("reader fails", func(t *testing.T) {
		t.Parallel()
		vm := startVM(t, vmConfig{Incoming: true})
		s := vm.dial(t)
		r := io.MultiReader(strings.NewReader("QEVM\x00\x00\x00\x03"), iotestErrReader{})
		err := s.LoadDeviceState(testContext(t, 20*time.Second), r)
		if !errors.Is(err, ErrMigrationFailed) || !errors.Is(err, errReader) {
			t.Errorf("got %v, want ErrMigrationFailed and the reader's error", err)
		}
		t.Log(err)
	})
}

var errReader = errors.New("checkpoint file unreadable")

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errReader }

// TestLoadRunStateQEMU checks the run state a load ends in, as
// process_incoming_migration_bh decides it from the saved state and -S.
func TestLoadRunStateQEMU(t *testing.T) {
	tests := []struct {
		name   string
		source string // "prelaunch", "paused" or "running"
		destS  bool   // destination started with -S
		want   Status
	}{
		{"paused, -S", "paused", true, Status{false, "paused"}},
		{"paused", "paused", false, Status{false, "paused"}},
		{"running, -S", "running", true, Status{false, "paused"}},
		{"running", "running", false, Status{true, "running"}},
		{"prelaunch", "prelaunch", false, Status{false, "prelaunch"}},
	}
	for _, tt := range tests {
		// Not parallel: guests that run spin a host CPU each.
		t.Run(tt.name, func(t *testing.T) {
			src := startVM(t, vmConfig{})
			dst := startVM(t, vmConfig{Incoming: true, Running: !tt.destS})
			ss, ds := src.dial(t), dst.dial(t)
			ctx := testContext(t, 30*time.Second)
			switch tt.source {
			case "paused":
				runSeaBIOS(ctx, t, ss)
			case "running":
				if err := ss.Cont(ctx); err != nil {
					t.Fatal(err)
				}
			}
			var buf bytes.Buffer
			if _, err := ss.SaveDeviceState(ctx, &buf); err != nil {
				t.Fatal(err)
			}
			copyFile(t, dst.MemPath, src.MemPath)
			if err := ds.LoadDeviceState(ctx, &buf); err != nil {
				t.Fatal(err)
			}
			st, err := ds.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st != tt.want {
				t.Errorf("after load: %+v, want %+v", st, tt.want)
			}
		})
	}
}

// TestKVMQEMU repeats the reads under KVM, where QEMU fetches the vCPU
// state from the kernel and tags memory map ranges with " KVM".
func TestKVMQEMU(t *testing.T) {
	requiresQEMU(t)
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no KVM: %v", err)
	}
	f.Close()
	vm := startVM(t, vmConfig{Accel: "kvm"})
	s := vm.dial(t)
	ctx := testContext(t, 20*time.Second)
	r, err := s.CPURegisters(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := resetRegisters(0); r != want {
		t.Errorf("registers at reset: %+v, want %+v", r, want)
	}
	maps, err := s.RAMLayout(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Mapping{{"mem0", 0, 0, 0xc0000}, {"mem0", 1 * mib, 1 * mib, 255 * mib}}; !slices.Equal(maps, want) {
		t.Errorf("RAMLayout() = %v, want %v", maps, want)
	}
}

// resetRegisters is what "info registers" shows of a vCPU at reset (SDM
// Vol. 3A table 10-1): real mode at the reset vector, CS selector F000
// with base FFFF0000.
func resetRegisters(cpu int) Registers {
	r := Registers{CPU: cpu, RIP: 0xfff0, RFLAGS: 2, CR0: 0x60000010}
	r.Seg[SegCS] = Segment{Selector: 0xf000, Base: 0xffff0000}
	return r
}

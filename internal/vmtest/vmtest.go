// Package vmtest boots real Linux guests in QEMU for kvmckpt's tests, demo
// and benchmarks.
//
// A guest runs the Debian kernel fetched by `make deps` and the initramfs
// built by `make initramfs` (busybox and kvmckpt's workload, see
// internal/workload). Its RAM is a memory-backend-file with share=on in
// /dev/shm under a unique name, the way kvmckpt expects an operator's QEMU
// to be set up; its serial console goes to a file, its QMP monitor to a unix
// socket.
//
// Every QEMU process is tracked by PID and killed, and every RAM file
// removed, by [Guest.Close]; the test helpers register Close with Cleanup so
// that happens even when a test fails.
package vmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	// ErrNotFound means a kernel, the initramfs or QEMU is missing.
	ErrNotFound = errors.New("not found (run `make deps initramfs`)")
	// ErrTimeout means the guest did not print what was waited for in time.
	ErrTimeout = errors.New("timed out")
	// ErrExited means QEMU ended while it was being waited on.
	ErrExited = errors.New("qemu exited")
)

// RAMPrefix starts the name of every RAM file the test bed creates in
// /dev/shm, so leftovers can be found.
const RAMPrefix = "kvmckpt-test-"

// Workload holds the guest workload's settings (see internal/workload).
// Sizes are in MiB.
type Workload struct {
	Churn, Anon, Tmpfs, Text int
	// Interval is the verification period in seconds (0: the default).
	Interval int
	// Truth makes the workload print ground truth and then stay quiet.
	Truth bool
	Seed  int
	// WSet and Rate make the workload keep writing a WSet MiB working set
	// at Rate MiB/s and prove, every Interval, that its pages are those
	// of one moment ("KW WRITER OK"), for live checkpoints.
	WSet, Rate int
	// Files makes the workload read that many MiB of files from the disk
	// (Config.Disk, made by [MakeDisk]) into its page cache and keep
	// checking them.
	Files int
	// Dirty makes the workload keep that many MiB of dirty file data on
	// the scratch disk (Config.Scratch).
	Dirty int
	// Spin makes the core tests' process (/coretarget) keep a thread
	// spinning in user mode, running on a vCPU whenever the guest pauses.
	Spin bool
}

func (w Workload) args() []string {
	a := []string{
		"kw.churn=" + strconv.Itoa(w.Churn), "kw.anon=" + strconv.Itoa(w.Anon),
		"kw.tmpfs=" + strconv.Itoa(w.Tmpfs), "kw.text=" + strconv.Itoa(w.Text),
	}
	if w.Interval > 0 {
		a = append(a, "kw.interval="+strconv.Itoa(w.Interval))
	}
	if w.Seed > 0 {
		a = append(a, "kw.seed="+strconv.Itoa(w.Seed))
	}
	if w.Truth {
		a = append(a, "kw.truth=1")
	}
	if w.WSet > 0 {
		a = append(a, "kw.wset="+strconv.Itoa(w.WSet), "kw.rate="+strconv.Itoa(w.Rate))
	}
	if w.Spin {
		a = append(a, "kw.spin=1")
	}
	if w.Files > 0 {
		a = append(a, "kw.files="+strconv.Itoa(w.Files))
	}
	if w.Dirty > 0 {
		a = append(a, "kw.dirty="+strconv.Itoa(w.Dirty))
	}
	return a
}

// Config describes a guest.
type Config struct {
	// Kernel is a flavour cached by `make deps` ("amd64", "cloud-amd64") or
	// a path to a bzImage. Empty means $KVMCKPT_KERNEL, else "amd64".
	Kernel string
	// QEMU is the emulator: empty means qemu-system-x86_64 from PATH (the
	// system's, bookworm's 7.2), a version such as "10.0" the one `make
	// deps` unpacked into the cache from bookworm-backports (see
	// [QEMUPath]), anything with a slash a path.
	QEMU string
	// Initramfs is the path of the initramfs; empty means the one built by
	// the Makefile ($KVMCKPT_INITRAMFS, else build/initramfs.cpio.gz at the
	// module root).
	Initramfs string
	// Machine is "pc" (default) or "q35".
	Machine string
	CPUs    int    // default 1
	MemMiB  int    // default 1024
	CPU     string // -cpu model; "max" turns on 5-level paging; empty: QEMU's default
	// Workload settings go on the kernel command line.
	Workload Workload
	// Append adds kernel command-line arguments, for example page_poison=1.
	Append []string
	// NoKernel boots no kernel at all: the guest stays in its firmware
	// (SeaBIOS finds nothing to boot), as a guest in early boot or with
	// another operating system looks to kvmckpt.
	NoKernel bool
	// Incoming starts QEMU as a restore target: -incoming defer and -S.
	Incoming bool
	// Dir holds the QMP socket and the serial log; empty means a new
	// temporary directory, removed by Close.
	Dir string
	// ExtraArgs are appended to QEMU's command line.
	ExtraArgs []string
	// Balloon adds a virtio balloon (its driver is among the modules the
	// guest loads): "on", or "reporting" for one with free page reporting.
	// It gives pages back under OOM (deflate-on-oom).
	Balloon string
	// Disk attaches a raw disk image read-only as a virtio-blk disk
	// (/dev/vda in the guest).
	Disk string
	// Scratch attaches a raw disk image read-write (/dev/vdb beside Disk,
	// else /dev/vda): one from [MakeScratch], for Workload.Dirty. A
	// restore target shares it with its source once the source is gone,
	// as a restored guest shares its disk with the saved one.
	Scratch string
	// RAMDir is the directory of the RAM file: empty means /dev/shm; a
	// hugetlbfs mount gives the guest huge-page RAM.
	RAMDir string
	// NUMANodes, if 2 or more, splits MemMiB evenly into that many guest
	// NUMA nodes, each with a RAM backend and file of its own; vCPU i
	// goes to node i mod NUMANodes.
	NUMANodes int
	// RAM is the kind of RAM: "" a memory-backend-file with share=on
	// (one per NUMA node); "default" QEMU's own (-m alone: an anonymous
	// memory-backend-ram named pc.ram); "mixed" two NUMA nodes, the first
	// a memory-backend-ram, the second a shared memory-backend-memfd.
	// Guests of the last two kinds have no RAM files.
	RAM string
}

// withDefaults fills in the machine (pc), vCPUs (1) and RAM (1 GiB).
func (cfg Config) withDefaults() Config {
	if cfg.Machine == "" {
		cfg.Machine = "pc"
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 1024
	}
	return cfg
}

// Guest is a running QEMU.
type Guest struct {
	Config     Config
	Args       []string // QEMU's full command line
	PID        int
	QMPPath    string
	RAMPath    string   // the first RAM file
	RAMPaths   []string // every RAM file, one per NUMA node
	SerialPath string
	Accel      string

	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	ownDir  string
	closed  sync.Once
}

var seq atomic.Int64

// Start boots a guest. The caller must Close it.
func Start(ctx context.Context, cfg Config) (*Guest, error) {
	cfg = cfg.withDefaults()
	kernel, err := KernelPath(cfg.Kernel)
	if err != nil {
		return nil, err
	}
	initrd := cfg.Initramfs
	if initrd == "" {
		initrd, err = InitramfsPath()
		if err != nil {
			return nil, err
		}
	}
	qemu, err := QEMUPath(cfg.QEMU)
	if err != nil {
		return nil, err
	}
	g := &Guest{Config: cfg, done: make(chan struct{})}
	dir := cfg.Dir
	if dir == "" {
		dir, err = os.MkdirTemp("", "kvmckpt-vm-")
		if err != nil {
			return nil, err
		}
		g.ownDir = dir
	}
	g.QMPPath = filepath.Join(dir, "qmp.sock")
	g.SerialPath = filepath.Join(dir, "serial.log")
	if !cfg.NoKernel {
		if initrd, err = withModules(kernel, initrd, dir); err != nil {
			g.Close()
			return nil, err
		}
	}
	ramDir := cfg.RAMDir
	if ramDir == "" {
		ramDir = "/dev/shm"
	}
	g.RAMPath = filepath.Join(ramDir, fmt.Sprintf("%s%d-%d", RAMPrefix, os.Getpid(), seq.Add(1)))
	g.RAMPaths = []string{g.RAMPath}
	g.Accel = Accel()
	machine := fmt.Sprintf("%s,accel=%s,memory-backend=mem0", cfg.Machine, g.Accel)
	memArgs := []string{"-object", fmt.Sprintf("memory-backend-file,id=mem0,size=%dM,mem-path=%s,share=on", cfg.MemMiB, g.RAMPath)}
	if n := cfg.NUMANodes; n >= 2 {
		if cfg.MemMiB%n != 0 {
			g.Close()
			return nil, fmt.Errorf("%d MiB do not split evenly into %d NUMA nodes", cfg.MemMiB, n)
		}
		machine = fmt.Sprintf("%s,accel=%s", cfg.Machine, g.Accel)
		memArgs, g.RAMPaths = nil, nil
		for i := range n {
			path := fmt.Sprintf("%s-node%d", g.RAMPath, i)
			g.RAMPaths = append(g.RAMPaths, path)
			node := fmt.Sprintf("node,nodeid=%d,memdev=mem%d", i, i)
			for c := i; c < cfg.CPUs; c += n {
				node += fmt.Sprintf(",cpus=%d", c)
			}
			memArgs = append(memArgs,
				"-object", fmt.Sprintf("memory-backend-file,id=mem%d,size=%dM,mem-path=%s,share=on", i, cfg.MemMiB/n, path),
				"-numa", node)
		}
		g.RAMPath = g.RAMPaths[0]
	}
	switch cfg.RAM {
	case "":
	case "default":
		machine = fmt.Sprintf("%s,accel=%s", cfg.Machine, g.Accel)
		memArgs, g.RAMPaths, g.RAMPath = nil, nil, ""
	case "mixed":
		half := cfg.MemMiB / 2
		machine = fmt.Sprintf("%s,accel=%s", cfg.Machine, g.Accel)
		memArgs = []string{
			"-object", fmt.Sprintf("memory-backend-ram,id=mem0,size=%dM", half),
			"-numa", "node,nodeid=0,memdev=mem0,cpus=0",
			"-object", fmt.Sprintf("memory-backend-memfd,id=mem1,size=%dM,share=on", cfg.MemMiB-half),
			"-numa", "node,nodeid=1,memdev=mem1",
		}
		for c := 1; c < cfg.CPUs; c++ {
			memArgs[3] += fmt.Sprintf(",cpus=%d", c)
		}
		g.RAMPaths, g.RAMPath = nil, ""
	default:
		g.Close()
		return nil, fmt.Errorf("RAM kind %q: want \"\", \"default\" or \"mixed\"", cfg.RAM)
	}

	appendLine := append([]string{"console=ttyS0", "quiet", "panic=-1"}, cfg.Workload.args()...)
	appendLine = append(appendLine, cfg.Append...)
	g.Args = []string{
		qemu,
		"-machine", machine,
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", fmt.Sprintf("%dM", cfg.MemMiB),
	}
	g.Args = append(g.Args, memArgs...)
	if !cfg.NoKernel {
		g.Args = append(g.Args,
			"-kernel", kernel,
			"-initrd", initrd,
			"-append", strings.Join(appendLine, " "))
	}
	g.Args = append(g.Args,
		"-nodefaults", "-display", "none", "-no-reboot",
		"-serial", "file:"+g.SerialPath,
		"-qmp", "unix:"+g.QMPPath+",server=on,wait=off",
	)
	if cfg.CPU != "" {
		g.Args = append(g.Args, "-cpu", cfg.CPU)
	}
	if cfg.Incoming {
		g.Args = append(g.Args, "-incoming", "defer", "-S")
	}
	switch cfg.Balloon {
	case "":
	case "on":
		g.Args = append(g.Args, "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on")
	case "reporting":
		g.Args = append(g.Args, "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on")
	default:
		g.Close()
		return nil, fmt.Errorf("balloon %q: want \"\", \"on\" or \"reporting\"", cfg.Balloon)
	}
	if cfg.Disk != "" {
		g.Args = append(g.Args, "-drive", "file="+cfg.Disk+",if=none,id=disk0,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=disk0")
	}
	if cfg.Scratch != "" {
		g.Args = append(g.Args, "-drive", "file="+cfg.Scratch+",if=none,id=disk1,format=raw", "-device", "virtio-blk-pci,drive=disk1")
	}
	g.Args = append(g.Args, cfg.ExtraArgs...)
	if err := g.start(); err != nil {
		g.Close()
		return nil, err
	}
	// QEMU opens its monitor socket before it creates the RAM backends'
	// files: a guest is started once both exist, so that no caller (nor
	// Leftovers) looks for a RAM file that is not there yet.
	ready := func() bool {
		for _, p := range append([]string{g.QMPPath}, g.RAMPaths...) {
			if _, err := os.Stat(p); err != nil {
				return false
			}
		}
		return true
	}
	if err := g.waitFor(ctx, ready, 30*time.Second); err != nil {
		err = fmt.Errorf("wait for QMP socket and RAM files: %w\n%s", err, g.SerialTail(20))
		g.Close()
		return nil, err
	}
	return g, nil
}

// StartWithArgs starts QEMU with a command line of the caller's (for
// example one recorded in a checkpoint). It still owns the process and the
// RAM file named by ramPath: Close kills the one and removes the other.
func StartWithArgs(ctx context.Context, args []string, qmpPath, serialPath, ramPath string) (*Guest, error) {
	g := &Guest{Args: args, QMPPath: qmpPath, SerialPath: serialPath, RAMPath: ramPath, RAMPaths: []string{ramPath}, done: make(chan struct{})}
	if err := g.start(); err != nil {
		g.Close()
		return nil, err
	}
	if err := g.waitFor(ctx, func() bool { _, err := os.Stat(g.QMPPath); return err == nil }, 30*time.Second); err != nil {
		g.Close()
		return nil, fmt.Errorf("wait for QMP socket: %w", err)
	}
	return g, nil
}

func (g *Guest) start() error {
	g.cmd = exec.Command(g.Args[0], g.Args[1:]...)
	var stderr bytes.Buffer
	g.cmd.Stderr = &lockedWriter{w: &stderr}
	// Own process group, so a signal to the test process's group does not
	// reach QEMU before Close does, and Pdeathsig so QEMU dies with us.
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		return fmt.Errorf("start qemu: %w", err)
	}
	g.PID = g.cmd.Process.Pid
	track(g.PID)
	go func() {
		err := g.cmd.Wait()
		if err != nil && stderr.Len() > 0 {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
		}
		g.waitErr = err
		close(g.done)
	}()
	return nil
}

type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Exited reports whether QEMU has ended, and how.
func (g *Guest) Exited() (bool, error) {
	select {
	case <-g.done:
		return true, g.waitErr
	default:
		return false, nil
	}
}

// Done is closed when QEMU ends.
func (g *Guest) Done() <-chan struct{} { return g.done }

// Wait waits for QEMU to end, at most timeout.
func (g *Guest) Wait(timeout time.Duration) error {
	select {
	case <-g.done:
		return g.waitErr
	case <-time.After(timeout):
		return fmt.Errorf("wait for qemu %d: %w", g.PID, ErrTimeout)
	}
}

func (g *Guest) waitFor(ctx context.Context, cond func() bool, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return nil
		}
		if exited, err := g.Exited(); exited {
			return fmt.Errorf("%w: %v", ErrExited, err)
		}
		if time.Now().After(deadline) {
			return ErrTimeout
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Serial returns everything the guest printed so far.
func (g *Guest) Serial() string {
	b, _ := os.ReadFile(g.SerialPath)
	return string(b)
}

// SerialTail returns the last n lines of the serial console.
func (g *Guest) SerialTail(n int) string {
	lines := strings.Split(strings.TrimRight(g.Serial(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitSerial waits until the serial output, from byte offset from on,
// matches re, and returns the match and the offset just past it.
func (g *Guest) WaitSerial(ctx context.Context, re *regexp.Regexp, from int, timeout time.Duration) (string, int, error) {
	var match string
	var end int
	err := g.waitFor(ctx, func() bool {
		s := g.Serial()
		if from > len(s) {
			return false
		}
		loc := re.FindStringIndex(s[from:])
		if loc == nil {
			return false
		}
		match, end = s[from+loc[0]:from+loc[1]], from+loc[1]
		return true
	}, timeout)
	if err != nil {
		return "", 0, fmt.Errorf("wait for %q on serial: %w\nlast lines:\n%s", re, err, g.SerialTail(15))
	}
	return match, end, nil
}

// Close kills QEMU (by PID) and removes its RAM file and, when it made it,
// its directory. It is safe to call more than once.
func (g *Guest) Close() error {
	g.closed.Do(func() {
		if g.cmd != nil && g.cmd.Process != nil {
			if exited, _ := g.Exited(); !exited {
				_ = g.cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-g.done:
				case <-time.After(3 * time.Second):
					_ = g.cmd.Process.Kill()
					<-g.done
				}
			}
			untrack(g.PID)
		}
		for _, p := range g.RAMPaths {
			_ = os.Remove(p)
		}
		if g.ownDir != "" {
			_ = os.RemoveAll(g.ownDir)
		}
	})
	return nil
}

// tracked holds the PIDs of QEMU processes this process started and has not
// closed yet; see [Leftovers].
var tracked sync.Map

func track(pid int)   { tracked.Store(pid, true) }
func untrack(pid int) { tracked.Delete(pid) }

// Leftovers lists what the test bed started in this process and did not
// clean up: QEMU processes still alive and RAM files still in /dev/shm.
func Leftovers() []string {
	var left []string
	tracked.Range(func(k, _ any) bool {
		pid := k.(int)
		if syscall.Kill(pid, 0) == nil {
			left = append(left, fmt.Sprintf("qemu process %d", pid))
		}
		return true
	})
	files, _ := filepath.Glob(fmt.Sprintf("/dev/shm/%s%d-*", RAMPrefix, os.Getpid()))
	for _, f := range files {
		left = append(left, "RAM file "+f)
	}
	return left
}

// withModules returns the initramfs a guest of kernel boots with: initrd
// followed by the kernel's modules (modules.cpio.gz beside it, from `make
// deps`; the kernel reads concatenated archives as one), written to dir.
// A kernel without them (a bzImage of the caller's) boots initrd alone.
func withModules(kernel, initrd, dir string) (string, error) {
	mods := filepath.Join(filepath.Dir(kernel), "modules.cpio.gz")
	if _, err := os.Stat(mods); err != nil {
		return initrd, nil
	}
	out := filepath.Join(dir, "initrd.cpio.gz")
	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	for _, p := range []string{initrd, mods} {
		in, err := os.Open(p)
		if err != nil {
			f.Close()
			return "", err
		}
		_, err = io.Copy(f, in)
		in.Close()
		if err != nil {
			f.Close()
			return "", err
		}
	}
	return out, f.Close()
}

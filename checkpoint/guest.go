package checkpoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/ramblock"
	"github.com/kvmckpt/kvmckpt/writer"
)

var (
	// ErrBusy means another kvmckpt is working on the same guest.
	ErrBusy = errors.New("another kvmckpt is working on this guest")
	// ErrGuestState means the guest is in a run state kvmckpt cannot work in.
	ErrGuestState = errors.New("guest not in a state to checkpoint")
	// ErrRAMBackend means kvmckpt cannot reach the guest's RAM: neither
	// a shared file it can open nor QEMU's memory it can read.
	ErrRAMBackend = errors.New("guest RAM cannot be reached")
	// ErrUnsafePath means a directory or file kvmckpt would use could be
	// changed by another user, or is not of the kind it must be.
	ErrUnsafePath = errors.New("unsafe path")
)

// ramHint shows the QEMU options with which kvmckpt reaches guest RAM
// without reading QEMU's memory (which needs the right to ptrace QEMU, and
// QEMU in kvmckpt's pid namespace), and saves fastest.
const ramHint = "run kvmckpt as root in QEMU's pid namespace, or start QEMU with its RAM in a shared file, for example:\n" +
	"  -object memory-backend-file,id=mem0,size=2G,mem-path=/dev/shm/vm.ram,share=on -machine memory-backend=mem0 -m 2G"

// guest is a QEMU session with its RAM mapped, held under the per-guest lock.
type guest struct {
	sess     *qmp.Session
	target   Target
	lock     *os.File
	lockPath string
	prior    qmp.Status
	backends []qmp.Backend
	layout   []qmp.Mapping
	// blocks are the backends' memory, in the order of backends; ram
	// and files are each block's mapping and file, nil for a block that
	// is QEMU's own memory.
	blocks []ramblock.Block
	files  []*os.File
	ram    [][]byte
	mem    *introspect.PhysMem
	log    *slog.Logger
	// kernelPGD and la57 locate the guest kernel's page tables, once
	// introspection found them (see writer.Header.KernelPGD).
	kernelPGD uint64
	la57      bool
	// cpus are the vCPUs' registers at the pause, read once
	// introspection found the kernel (see writer.Header.CPUs).
	cpus []writer.CPU
	// offline has a bit for every guest frame the guest gave to its
	// balloon (PageOffline), nil when it has none; balloonPages is the
	// balloon's size as QEMU reports it.
	offline      *pagemap.Bitmap
	balloonPages uint64
	// balloonPrior is the guest's memory before a squeeze inflated its
	// balloon, 0 without one (see writer.Header.BalloonTarget).
	balloonPrior uint64
	// parent is the checkpoint an incremental save compares with.
	parent *parent
	// ramSent is what QEMU sent of each backend's RAM in the device
	// state's stream (page records), when it was filtered.
	ramSent map[string]uint64
	// afterResume is run when a save returns, the guest running again.
	afterResume []func()
	// instance names the QEMU process for the life of the host's boot
	// (see [qemuInstance]); "" if unknown.
	instance string
	// stale is the pause record of a killed kvmckpt, if any.
	stale string
}

// LockPath names the lock file of the guest behind a QMP socket, by the
// socket's device and inode so that every path to the same socket shares
// it. A kvmckpt holds an exclusive flock on it while it works on the guest.
// It returns "" if the socket does not exist.
//
// The file is in [RunDir], a directory only the user running kvmckpt can
// write: lock files double as pause records that decide whether a guest is
// resumed, so nobody else may create, hold or replace them.
func LockPath(socket string) string {
	p, _ := lockPath(SocketPath(socket))
	return p
}

func lockPath(socket string) (string, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(socket, &st); err != nil {
		return "", fmt.Errorf("QMP socket %s: %w", socket, err)
	}
	sum := sha256.Sum256(fmt.Appendf(nil, "%d:%d", st.Dev, st.Ino))
	return filepath.Join(RunDir(), "kvmckpt-"+hex.EncodeToString(sum[:8])+".lock"), nil
}

// RunDirEnv names the variable that overrides [RunDir].
const RunDirEnv = "KVMCKPT_RUN_DIR"

// RunDir is where kvmckpt keeps its lock files: $KVMCKPT_RUN_DIR if set;
// for root /run/kvmckpt; for another user $XDG_RUNTIME_DIR/kvmckpt, else
// kvmckpt-UID in the temporary directory. [ensureRunDir] makes it and
// checks it before any use.
func RunDir() string {
	if d := os.Getenv(RunDirEnv); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/kvmckpt"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return filepath.Join(d, "kvmckpt")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("kvmckpt-%d", os.Geteuid()))
}

// ensureRunDir makes dir (mode 0700) if it is missing and checks that it
// is a directory, not a link, owned by this user and writable by nobody
// else (group and others may read it). The error wraps [ErrUnsafePath].
func ensureRunDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("make lock directory: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("lock directory: %w", err)
	}
	fix := fmt.Sprintf("remove it and kvmckpt makes it anew (or set %s to a directory only you can write)", RunDirEnv)
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("%w: lock directory %s is not a directory (a link or a file); %s", ErrUnsafePath, dir, fix)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%w: lock directory %s belongs to uid %d, not to you (uid %d); %s", ErrUnsafePath, dir, st.Uid, os.Geteuid(), fix)
	case st.Mode&0o022 != 0:
		return fmt.Errorf("%w: lock directory %s has mode %04o: others may create or replace its lock files; chmod 700 %s, or %s", ErrUnsafePath, dir, st.Mode&0o7777, dir, fix)
	}
	return nil
}

// SocketPath strips an optional "unix:" prefix.
func SocketPath(p string) string { return strings.TrimPrefix(p, "unix:") }

// Target names a guest: the path of its QMP socket, or a libvirt domain
// (with the connection URI, "" for libvirt's default).
type Target struct {
	QMP     string
	Domain  string
	Connect string
}

func (t Target) String() string {
	if t.Domain != "" {
		return "libvirt domain " + t.Domain
	}
	return SocketPath(t.QMP)
}

// flag is the option naming t on kvmckpt's command line.
func (t Target) flag() string {
	if t.Domain != "" {
		s := "--domain " + t.Domain
		if t.Connect != "" {
			s += " --connect " + t.Connect
		}
		return s
	}
	return "--qmp " + t.QMP
}

// lockPath names t's lock file: the socket's (see [LockPath]), or one
// named by the libvirt connection and domain.
func (t Target) lockPath() (string, error) {
	if t.Domain == "" {
		return lockPath(SocketPath(t.QMP))
	}
	sum := sha256.Sum256([]byte("libvirt\x00" + t.Connect + "\x00" + t.Domain))
	return filepath.Join(RunDir(), "kvmckpt-"+hex.EncodeToString(sum[:8])+".lock"), nil
}

// openGuest connects to QEMU and takes the per-guest lock. The caller must
// close it.
func openGuest(ctx context.Context, t Target, log *slog.Logger) (*guest, error) {
	if (t.QMP == "") == (t.Domain == "") {
		return nil, errors.New("name the guest by its QMP socket or its libvirt domain, not both or neither")
	}
	lp, err := t.lockPath()
	if err != nil {
		return nil, err
	}
	lf, err := lockFile(lp)
	if err != nil {
		return nil, err
	}
	var sess *qmp.Session
	if t.Domain != "" {
		sess, err = qmp.DialLibvirt(ctx, t.Connect, t.Domain)
	} else {
		sess, err = qmp.Dial(ctx, SocketPath(t.QMP))
	}
	if err != nil {
		// Still locked: nobody else can have written a record into it.
		if st, serr := lf.Stat(); serr == nil && st.Size() == 0 {
			_ = os.Remove(lp)
		}
		lf.Close()
		return nil, err
	}
	g := &guest{sess: sess, target: t, lock: lf, lockPath: lp, log: logger(log), instance: qemuInstance(sess)}
	if g.prior, err = sess.Status(ctx); err != nil {
		g.close()
		return nil, err
	}
	g.checkStale()
	return g, nil
}

// openSaveable opens a guest that is in a run state a checkpoint can be
// taken in.
func openSaveable(ctx context.Context, t Target, log *slog.Logger) (*guest, error) {
	g, err := openGuest(ctx, t, log)
	if err != nil {
		return nil, err
	}
	if err := g.resumeAfterKilledSave(ctx); err != nil {
		g.close()
		return nil, err
	}
	if err := g.prior.CheckSaveable(); err != nil {
		g.close()
		return nil, fmt.Errorf("%w: %w", ErrGuestState, err)
	}
	return g, nil
}

// lockFile opens and locks the lock file at path, in a directory that
// [ensureRunDir] checked. It neither follows a link nor blocks: the lock is
// taken with LOCK_NB, and the open with O_NONBLOCK, so whatever is at the
// path (a FIFO included) cannot stall kvmckpt. A holder removes the file
// when it is done and holds no pause record (see [guest.close]), so a file
// opened just before that removal is locked in vain: the lock must be on
// the file that is at path once it is held.
func lockFile(path string) (*os.File, error) {
	if err := ensureRunDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	for range 10 {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open lock file %s: %w", path, err)
		}
		f := os.NewFile(uintptr(fd), path)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || int(st.Uid) != os.Geteuid() {
			f.Close()
			return nil, fmt.Errorf("%w: lock file %s is not a regular file of yours; remove it", ErrUnsafePath, path)
		}
		if err := syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				return nil, fmt.Errorf("%w (lock %s held); wait for it to finish", ErrBusy, path)
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		held, err1 := f.Stat()
		now, err2 := os.Lstat(path)
		if err1 == nil && err2 == nil && os.SameFile(held, now) {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("%w: lock file %s keeps being replaced", ErrBusy, path)
}

// The lock file doubles as a record of a pause in progress: kvmckpt writes
// one line into it before it asks QEMU to pause a running guest, rewrites it
// once QEMU has, and empties it when the guest runs again. A line found by
// the next kvmckpt, which holds the lock, means the one before it was killed
// while the guest was paused for it, or about to be. The line names the
// QEMU process: the lock file is named by the socket's inode, which a later
// QEMU's socket may reuse, and that QEMU's guest must not be resumed for a
// pause it never had.
const (
	pausingRecord = "pausing a running guest: pid %d at %s; %s\n"
	pauseRecord   = "paused a running guest: pid %d at %s; %s\n"
)

// qemuInstance names the QEMU process serving sess for the life of the
// host's boot: pid, start time and boot ID, as a pid alone can be reused.
// It returns "" if that cannot be told, for example when QEMU is in another
// pid namespace.
func qemuInstance(sess *qmp.Session) string {
	pid, err := sess.PeerPID()
	if err != nil {
		return ""
	}
	start, err := qmp.ProcessStart(pid)
	if err != nil {
		return ""
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return fmt.Sprintf("qemu pid %d started %d boot %s", pid, start, bytes.TrimSpace(boot))
}

// checkStale reports a pause left by a killed kvmckpt and takes the guest's
// run state from before it as the prior state, so that this run puts the
// guest back to running. A record of another QEMU is dropped.
func (g *guest) checkStale() {
	b, err := io.ReadAll(io.LimitReader(g.lock, 4096))
	rec := strings.TrimSpace(string(b))
	if err != nil || rec == "" {
		return
	}
	switch {
	case g.prior.Running:
		g.clearPauseRecord()
		return
	case g.instance == "":
		// Keep the record: a later run may tell.
		g.log.Warn("an earlier kvmckpt recorded a pause of a guest on this socket, and this QEMU cannot be told apart from "+
			"the one it paused; if that kvmckpt was killed, run `kvmckpt resume "+g.target.flag()+"`", "record", rec)
		return
	case !strings.HasSuffix(rec, "; "+g.instance):
		g.log.Debug("dropped the pause record of another QEMU", "record", rec)
		g.clearPauseRecord()
		return
	}
	g.stale = rec
	g.log.Warn("an earlier kvmckpt was stopped while it held this guest paused; this run puts the guest back to running ("+
		"or run `kvmckpt resume "+g.target.flag()+"`)", "record", g.stale)
	g.prior.Running = true
	g.prior.State = "running"
}

// resumeAfterKilledSave handles a kvmckpt killed after QEMU had sent the
// device state: the guest it paused is in postmigrate, which QEMU will not
// migrate again until the guest has run. It was running before, so it runs
// again now and is paused afresh by this save.
func (g *guest) resumeAfterKilledSave(ctx context.Context) error {
	if g.stale == "" {
		return nil
	}
	st, err := g.sess.Status(ctx)
	if err != nil || st.State != "postmigrate" {
		return err
	}
	g.log.Warn("the guest is still in postmigrate from the killed kvmckpt's save; resuming it before pausing it again")
	if err := g.sess.Cont(ctx); err != nil {
		return fmt.Errorf("resume guest left in postmigrate by a killed kvmckpt: %w", err)
	}
	g.clearPauseRecord()
	return nil
}

func (g *guest) writePauseRecord(format string) {
	inst := g.instance
	if inst == "" {
		inst = "qemu unknown"
	}
	rec := fmt.Sprintf(format, os.Getpid(), time.Now().UTC().Format(time.RFC3339), inst)
	if err := g.lock.Truncate(0); err == nil {
		if _, err := g.lock.WriteAt([]byte(rec), 0); err == nil {
			_ = g.lock.Sync()
		}
	}
}

func (g *guest) clearPauseRecord() {
	_ = g.lock.Truncate(0)
	g.stale = ""
}

// mapRAM finds the guest's RAM backends and layout and opens each
// backend's memory (see [guest.openBlock]). writable opens it for writing
// too (restore).
func (g *guest) mapRAM(ctx context.Context, writable bool) error {
	if g.mem != nil {
		return nil // mapped already (a live save maps before its rounds)
	}
	var err error
	if g.backends, err = g.sess.RAMBackends(ctx); err != nil {
		return err
	}
	if g.layout, err = g.sess.RAMLayout(ctx); err != nil {
		return err
	}
	if len(g.backends) == 0 {
		return fmt.Errorf("%w: QEMU reports no memory backend; %s", ErrRAMBackend, ramHint)
	}
	index := map[string]int{}
	for i, b := range g.backends {
		index[b.ID] = i
		blk, err := g.openBlock(ctx, b, writable)
		if err != nil {
			return err
		}
		g.log.Debug("opened guest RAM", "backend", b.ID, "type", b.Type, "at", blk.String())
		g.blocks = append(g.blocks, blk)
		g.ram = append(g.ram, blk.Mapped())
		g.files = append(g.files, blk.File())
	}
	var maps []introspect.Mapping
	for _, m := range g.layout {
		i, ok := index[m.Backend]
		if !ok {
			continue
		}
		// Offsets into the block, which starts at the backend's offset
		// in its file.
		off := m.Offset - g.backends[i].FileOffset
		maps = append(maps, introspect.Mapping{GPA: introspect.PAddr(m.GPA), Backend: i, Offset: off, Size: m.Size})
	}
	if len(maps) == 0 {
		return fmt.Errorf("%w: no RAM backend appears in the guest-physical memory map", ErrRAMBackend)
	}
	backends := make([]introspect.Backend, len(g.blocks))
	for i, b := range g.blocks {
		backends[i] = b
	}
	g.mem, err = introspect.NewPhysMemOf(backends, maps)
	return err
}

// openBlock opens a backend's memory. A shared memory-backend-file is
// opened at its mem-path, as before QEMU 10 gave RAM blocks' addresses;
// any other backend (memory-backend-ram, QEMU's default; a memfd; a file
// mapped private) is found at its address in QEMU's memory (HMP gpa2hva)
// and opened as /proc/PID/maps shows it: a shared file through QEMU's
// open descriptor, else QEMU's memory itself.
func (g *guest) openBlock(ctx context.Context, b qmp.Backend, writable bool) (ramblock.Block, error) {
	if b.Type == "memory-backend-file" && b.Share && b.MemPath != "" {
		flag := os.O_RDONLY
		if writable {
			flag = os.O_RDWR
		}
		f, err := os.OpenFile(b.MemPath, flag|syscall.O_NOFOLLOW|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open RAM file of backend %q: %w", b.ID, err)
		}
		blk, err := ramblock.OpenFile(f, int64(b.FileOffset), b.Size, writable, "RAM file "+b.MemPath)
		if err != nil {
			return nil, fmt.Errorf("RAM file of backend %q: %w", b.ID, err)
		}
		return blk, nil
	}
	why := fmt.Sprintf("backend %q (%s, share=%v) is read from QEMU's memory", b.ID, b.Type, b.Share)
	pid, err := g.sess.PeerPID()
	if err != nil {
		return nil, fmt.Errorf("%w: %s, but QEMU's process cannot be told: %v; %s", ErrRAMBackend, why, err, ramHint)
	}
	var first *qmp.Mapping
	for i := range g.layout {
		if g.layout[i].Backend == b.ID {
			first = &g.layout[i]
			break
		}
	}
	if first == nil {
		return nil, fmt.Errorf("%w: %s, but it is not in the guest-physical memory map", ErrRAMBackend, why)
	}
	hva, err := g.sess.HostAddress(ctx, first.GPA)
	if err != nil {
		return nil, err
	}
	into := first.Offset - b.FileOffset
	if hva < into {
		return nil, fmt.Errorf("%w: %s: QEMU gives host address %#x for guest-physical %#x, below the block's start", ErrRAMBackend, why, hva, first.GPA)
	}
	blk, err := ramblock.Locate(pid, hva-into, b.Size, writable)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrRAMBackend, why, err)
	}
	return blk, nil
}

// mappedAll reports whether every block is mapped into kvmckpt.
func (g *guest) mappedAll() bool {
	for _, m := range g.ram {
		if m == nil {
			return false
		}
	}
	return true
}

// ramInStream reports whether QEMU may put backends' RAM into the device
// state's stream even with x-ignore-shared on: it leaves out shared
// memory-backend-file RAM in QEMU 7.2 and 10 alike, but QEMU 8.1 and
// later send a shared memfd, and every version sends memory that is not
// shared (migration/ram.c: ramblock_is_ignored in 7.2,
// migrate_ram_is_ignored in 10.0). Such a stream is filtered on its way
// to the checkpoint (see [guest.saveDevice]), so what the running QEMU
// really leaves out is seen, not assumed.
func (g *guest) ramInStream() bool {
	for _, b := range g.backends {
		if b.Type != "memory-backend-file" || !b.Share || b.MemPath == "" {
			return true
		}
	}
	return false
}

// pageSpace is the guest's RAM as one run of pages, the backends one after
// another: the space of a checkpoint's bitmap, read and written through
// the blocks.
type pageSpace struct {
	blocks []ramblock.Block
	starts []int64 // byte offset of each block; one more, the total
}

func (g *guest) pageSpace() *pageSpace {
	s := &pageSpace{blocks: g.blocks}
	var at int64
	for _, b := range g.blocks {
		s.starts = append(s.starts, at)
		at += int64(b.Size())
	}
	s.starts = append(s.starts, at)
	return s
}

func (s *pageSpace) do(p []byte, off int64, f func(ramblock.Block, []byte, int64) (int, error)) (int, error) {
	done := 0
	for done < len(p) {
		at := off + int64(done)
		i := sort.Search(len(s.blocks), func(i int) bool { return s.starts[i+1] > at })
		if i == len(s.blocks) || at < 0 {
			return done, fmt.Errorf("guest RAM offset %#x: %w", at, io.ErrUnexpectedEOF)
		}
		n := int(min(int64(len(p)-done), s.starts[i+1]-at))
		k, err := f(s.blocks[i], p[done:done+n], at-s.starts[i])
		done += k
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

func (s *pageSpace) ReadAt(p []byte, off int64) (int, error) {
	return s.do(p, off, ramblock.Block.ReadAt)
}

func (s *pageSpace) WriteAt(p []byte, off int64) (int, error) {
	return s.do(p, off, ramblock.Block.WriteAt)
}

// pause stops the guest if it runs. The returned function puts it back in
// its prior run state.
func (g *guest) pause(ctx context.Context) (restore func(context.Context) error, err error) {
	if !g.prior.Running {
		return func(context.Context) error { return nil }, nil
	}
	resume := func(ctx context.Context) error {
		if err := g.sess.Cont(ctx); err != nil {
			return err // says "resume guest"
		}
		g.clearPauseRecord()
		return nil
	}
	if g.stale == "" {
		g.writePauseRecord(pausingRecord)
		// Not given up at the first signal: a stop that QEMU carried out
		// while we gave up waiting would leave the guest paused behind
		// our back. But not waited for without end either.
		sctx, cancel := settleContext(ctx)
		err := g.sess.Stop(sctx)
		cancel()
		var qe *qmp.Error
		switch {
		case errors.As(err, &qe):
			// QEMU answered: it did not pause the guest.
			g.clearPauseRecord()
			return nil, fmt.Errorf("pause guest: %w", err)
		case err != nil:
			// No answer: QEMU may pause the guest once it reads the
			// command. The record stays, so the next kvmckpt on this
			// guest puts it back to running.
			return nil, fmt.Errorf("pause guest: %w; QEMU may still pause the guest: the next kvmckpt on it resumes it, or run `kvmckpt resume %s`", err, g.target.flag())
		}
	}
	// Paused now, by us or by the killed kvmckpt before us.
	g.writePauseRecord(pauseRecord)
	if err := ctx.Err(); err != nil {
		sctx, cancel := settleContext(ctx)
		defer cancel()
		if rerr := resume(sctx); rerr != nil {
			return nil, fmt.Errorf("%w; and the guest could not be resumed: %v", err, rerr)
		}
		return nil, err
	}
	return resume, nil
}

// settleGrace is how long kvmckpt keeps trying to put a guest back in its
// run state after a signal asked it to stop.
var settleGrace = 5 * time.Second

// settleContext returns the context for putting the guest back after ctx
// may have ended (a signal, a failure): not cancelled with ctx, so that a
// signal does not leave the guest paused, but ended settleGrace after ctx
// is, so that a QEMU that does not answer (stopped with SIGSTOP, say)
// cannot hold kvmckpt past a signal. Each command is bounded by the
// session's command timeout too.
func settleContext(ctx context.Context) (context.Context, context.CancelFunc) {
	sctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	var timer *time.Timer
	var mu sync.Mutex
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		timer = time.AfterFunc(settleGrace, func() {
			cancel(fmt.Errorf("%w: QEMU did not answer within %v of the signal", qmp.ErrTimeout, settleGrace))
		})
	})
	return sctx, func() {
		stop()
		mu.Lock()
		if timer != nil {
			timer.Stop()
		}
		mu.Unlock()
		cancel(context.Canceled)
	}
}

func (g *guest) close() {
	for _, b := range g.blocks {
		_ = b.Close()
	}
	if g.sess != nil {
		g.sess.Close()
	}
	if g.lock != nil {
		// Remove the lock file, still locked, unless it keeps a pause
		// record for the next kvmckpt.
		if st, err := g.lock.Stat(); err == nil && st.Size() == 0 {
			_ = os.Remove(g.lockPath)
		}
		g.lock.Close()
	}
}

// pageSpan is a backend's place in the page space of all backends
// together, in order: the space of a checkpoint's bitmap.
type pageSpan struct{ first, n uint64 }

// clip returns the part of the run [start, start+count) that lies in s, as
// an offset into s and a length; ok is false if none does.
func (s pageSpan) clip(start, count uint64) (off, n uint64, ok bool) {
	lo, hi := max(start, s.first), min(start+count, s.first+s.n)
	if lo >= hi {
		return 0, 0, false
	}
	return lo - s.first, hi - lo, true
}

// pageSpans places every backend in the page space; total is its size.
func (g *guest) pageSpans() (spans []pageSpan, total uint64) {
	for _, b := range g.backends {
		n := b.Size / introspect.PageSize
		spans = append(spans, pageSpan{first: total, n: n})
		total += n
	}
	return spans, total
}

// pages is the number of 4 KiB pages of all backends together.
func (g *guest) pages() uint64 {
	_, total := g.pageSpans()
	return total
}

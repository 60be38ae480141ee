package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// The two baselines run in a process of their own, like kvmckpt does, so
// that each one's CPU time and peak RSS can be read from its rusage: the
// bench re-executes its own binary (or its test binary) with childEnv set
// to a JSON [childSpec], and the child prints a JSON [childResult].
const childEnv = "KVMCKPT_BENCH_CHILD"

// Child modes.
const (
	modeQEMUSave      = "qemu-save"
	modeNaiveSave     = "naive-save"
	modeMappedRAMSave = "mapped-ram-save"
	modeQEMULive      = "qemu-live"
)

// multifdChannels is how many channels QEMU's mapped-ram save and restore
// use: one per host core here.
const multifdChannels = 2

// childSpec is what a child process is asked to do.
type childSpec struct {
	Mode string `json:"mode"`
	// QMP is the guest's QMP socket.
	QMP string `json:"qmp"`
	// Output is the file to write (qemu-save), or the prefix of the
	// files to write (naive-save: PREFIX.dev and PREFIX.ram-ID).
	Output string `json:"output"`
	// Timeout bounds the whole save.
	Timeout time.Duration `json:"timeout"`
	// Copier is how qemu-save writes the stream: copierWrite or
	// copierSplice.
	Copier string `json:"copier,omitempty"`
}

// childResult is what a child process did.
type childResult struct {
	// PauseMS is from the stop command until the cont command returned.
	PauseMS float64 `json:"pause_ms"`
	// StreamMS is the migration stream (qemu-save) or the RAM copy
	// (naive-save), up to the last byte in the page cache.
	StreamMS float64 `json:"stream_ms"`
	// DeviceStateMS is the device-state migration of naive-save.
	DeviceStateMS float64 `json:"device_state_ms,omitempty"`
	SyncMS        float64 `json:"sync_ms"`
	// StreamBytes is the size of the migration stream (qemu-save) or the
	// RAM bytes written (naive-save).
	StreamBytes int64    `json:"stream_bytes"`
	Files       []string `json:"files"`
	// IgnoreSharedWasOn reports that x-ignore-shared was on before a
	// qemu-save, which then turned it off for its migration.
	IgnoreSharedWasOn bool `json:"x_ignore_shared_was_on"`
	// MaxBandwidthBefore is QEMU's migration bandwidth limit before
	// qemu-save lifted it (bytes/s).
	MaxBandwidthBefore int64 `json:"max_bandwidth_before,omitempty"`
	// DowntimeMS and Iterations are QEMU's own figures for a live
	// migration (qemu-live): its downtime and dirty-bitmap syncs.
	DowntimeMS float64 `json:"downtime_ms,omitempty"`
	Iterations int64   `json:"iterations,omitempty"`
}

// childMain runs the child process $KVMCKPT_BENCH_CHILD asks for, if it
// is set: main and TestMain call it first and exit with its code.
func childMain() (isChild bool, code int) {
	v, ok := os.LookupEnv(childEnv)
	if !ok {
		return false, 0
	}
	var spec childSpec
	if err := json.Unmarshal([]byte(v), &spec); err != nil {
		fmt.Fprintf(os.Stderr, "bench child: decode %s: %v\n", childEnv, err)
		return true, 2
	}
	if spec.Timeout <= 0 {
		spec.Timeout = 10 * time.Minute
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, spec.Timeout)
	defer cancel()
	var res *childResult
	var err error
	switch spec.Mode {
	case modeQEMUSave:
		res, err = qemuSave(ctx, spec)
	case modeNaiveSave:
		res, err = naiveSave(ctx, spec)
	case modeMappedRAMSave:
		res, err = mappedRAMSave(ctx, spec)
	case modeQEMULive:
		res, err = qemuLive(ctx, spec)
	default:
		err = fmt.Errorf("unknown mode %q", spec.Mode)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench child %s: %v\n", spec.Mode, err)
		return true, 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintf(os.Stderr, "bench child %s: %v\n", spec.Mode, err)
		return true, 1
	}
	return true, 0
}

// unlimitedBandwidth is what libvirt sets QEMU's max-bandwidth to for
// `virsh save` ("Increase migration bandwidth to unlimited since target is
// a file", qemuMigrationSrcToFile; QEMU_DOMAIN_MIG_BANDWIDTH_MAX MiB/s).
// QEMU's default, 128 MiB/s in 7.2 (MAX_THROTTLE, migration/migration.c),
// would make the baseline wait on a rate limit rather than the disk.
const unlimitedBandwidth = math.MaxInt64 / (1 << 20) * (1 << 20)

// qemuSave saves the guest the way `virsh save` does: the guest is stopped,
// QEMU migrates it with its default capabilities (x-ignore-shared off, so
// every RAM page goes into the stream; pages that read as zero go as a
// header only, migration/ram.c save_zero_page) at unlimited bandwidth into
// a stream that this process copies into the file, the file is fsynced,
// and the guest continues.
//
// For `virsh save`, libvirt hands QEMU the file's descriptor (or, with
// --bypass-cache, a pipe to its iohelper; qemuMigrationSrcToFile), so the
// stream reaches the file by write(2) through the page cache. Here it comes
// over a unix socket to this process, which writes it with read(2) and
// write(2) of 1 MiB (copier "write"), or moves it with splice(2) (copier
// "splice", faster than anything libvirt does). It does not use QEMU's
// "exec:cat > FILE": when a command channel closes, QEMU sends its helper
// SIGTERM at once and SIGKILL 10 ms later if it has not exited
// (io/channel-command.c, qio_channel_command_abort), which can cut off the
// end of the stream that cat has not yet written.
func qemuSave(ctx context.Context, spec childSpec) (res *childResult, err error) {
	return qemuMigrate(ctx, spec, false)
}

// qemuLive is QEMU's own live migration into a file, as qemuSave but
// without the stop: QEMU copies RAM while the guest runs, in pre-copy
// iterations, until what is left fits its downtime limit (the default,
// 300 ms), then stops the guest and sends the rest. The pause is QEMU's
// own downtime figure (from its stop to the end of the stream) plus the
// fsync and the cont that follow, as for every tool here.
func qemuLive(ctx context.Context, spec childSpec) (res *childResult, err error) {
	return qemuMigrate(ctx, spec, true)
}

func qemuMigrate(ctx context.Context, spec childSpec, live bool) (res *childResult, err error) {
	s, caps, err := dialRunning(ctx, spec.QMP)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	bg := context.WithoutCancel(ctx)
	res = &childResult{IgnoreSharedWasOn: caps[qmp.CapIgnoreShared]}
	if res.IgnoreSharedWasOn {
		if err := s.SetMigrationCapabilities(ctx, map[string]bool{qmp.CapIgnoreShared: false}); err != nil {
			return nil, err
		}
		defer s.SetMigrationCapabilities(bg, map[string]bool{qmp.CapIgnoreShared: true})
	}
	var params struct {
		MaxBandwidth int64 `json:"max-bandwidth"`
	}
	if err := s.Run(ctx, "query-migrate-parameters", nil, &params); err != nil {
		return nil, fmt.Errorf("query migration parameters: %w", err)
	}
	res.MaxBandwidthBefore = params.MaxBandwidth
	if err := s.Run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(unlimitedBandwidth)}, nil); err != nil {
		return nil, fmt.Errorf("lift migration bandwidth limit: %w", err)
	}
	defer s.Run(bg, "migrate-set-parameters", map[string]any{"max-bandwidth": params.MaxBandwidth}, nil)

	// A socket path must fit in sun_path (108 bytes), so it goes in a
	// short temporary directory rather than next to the output.
	sockDir, err := os.MkdirTemp("", "kvmckpt-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "migrate.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen for the migration stream: %w", err)
	}
	defer ln.Close()
	f, err := os.OpenFile(spec.Output, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", spec.Output, err)
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(spec.Output)
		}
	}()
	copied := make(chan copyResult, 1)
	go func() { copied <- receive(ln, f, spec.Copier) }()

	t0 := time.Now()
	if !live {
		if err := s.Stop(ctx); err != nil {
			return nil, err
		}
		defer resumeOnError(bg, s, &err)
	}
	if err := s.Run(ctx, "migrate", map[string]string{"uri": "unix:" + sock}, nil); err != nil {
		ln.Close()
		<-copied
		return nil, fmt.Errorf("start migration: %w", err)
	}
	// A live migration that fails or is cancelled lets the guest run
	// again itself; one that completed leaves it stopped (postmigrate).
	c, err := waitMigration(ctx, s, copied)
	if err != nil {
		_ = s.Run(bg, "migrate_cancel", nil, nil)
		ln.Close()
		return nil, err
	}
	done := time.Now()
	if live {
		defer resumeOnError(bg, s, &err)
		st, err := s.MigrationStatus(ctx)
		if err != nil {
			return nil, err
		}
		res.DowntimeMS = float64(st.Downtime)
		if st.RAM != nil {
			res.Iterations = st.RAM.DirtySyncCount
		}
	}
	res.StreamMS = ms(done.Sub(t0))
	res.StreamBytes = c.n
	t1 := time.Now()
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync %s: %w", spec.Output, err)
	}
	res.SyncMS = ms(time.Since(t1))
	if err := s.Cont(ctx); err != nil {
		return nil, err
	}
	res.PauseMS = ms(time.Since(t0))
	if live {
		res.PauseMS = res.DowntimeMS + ms(time.Since(done))
	}
	res.Files = []string{spec.Output}
	return res, nil
}

// resumeOnError, deferred right after a stop, lets the guest run again if
// the caller returns an error in *err.
func resumeOnError(ctx context.Context, s *qmp.Session, err *error) {
	if *err == nil {
		return
	}
	if cerr := s.Cont(ctx); cerr != nil {
		*err = errors.Join(*err, cerr)
	}
}

type copyResult struct {
	n   int64
	err error
}

// Copiers of QEMU's save stream.
const (
	copierWrite  = "write"
	copierSplice = "splice"
)

// receive accepts one connection on ln and copies it into f until EOF,
// with read(2) and write(2), or with splice(2) (what io.Copy does from a
// unix socket to a file on Linux, os.File.ReadFrom).
func receive(ln *net.UnixListener, f *os.File, copier string) copyResult {
	if err := ln.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		return copyResult{0, err}
	}
	c, err := ln.Accept()
	if err != nil {
		return copyResult{0, fmt.Errorf("accept migration connection: %w", err)}
	}
	// Closing our end, also on a failed write, makes QEMU's writes fail,
	// so the migration fails instead of blocking.
	defer c.Close()
	var n int64
	if copier == copierSplice {
		n, err = io.Copy(f, c)
	} else {
		// Hide ReadFrom and WriteTo, which would splice.
		n, err = io.CopyBuffer(struct{ io.Writer }{f}, struct{ io.Reader }{c}, make([]byte, 1<<20))
	}
	return copyResult{n, err}
}

// waitMigration polls an outgoing migration until it completed. The copy
// may end first: QEMU closes the stream just after it sets the state to
// completed, which the last poll may not have seen; a copy that failed
// ends the wait at once.
func waitMigration(ctx context.Context, s *qmp.Session, copied <-chan copyResult) (copyResult, error) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var res *copyResult
	var late <-chan time.Time // after the copy ended, how long QEMU has to say why
	for {
		st, err := s.MigrationStatus(ctx)
		if err != nil {
			return copyResult{}, err
		}
		switch st.Status {
		case "completed":
			if res == nil {
				// QEMU closes its end just after (migrate_fd_cleanup),
				// which ends the copy.
				select {
				case r := <-copied:
					res = &r
				case <-ctx.Done():
					return copyResult{}, fmt.Errorf("wait for the end of the migration stream: %w", ctx.Err())
				}
			}
			if res.err != nil {
				return *res, fmt.Errorf("copy migration stream: %w", res.err)
			}
			return *res, nil
		case "failed", "cancelled":
			return copyResult{}, fmt.Errorf("%w: %s %s", qmp.ErrMigrationFailed, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return copyResult{}, fmt.Errorf("wait for migration: %w", ctx.Err())
		case r := <-copied:
			if r.err != nil {
				return r, fmt.Errorf("copy migration stream after %d bytes: %w", r.n, r.err)
			}
			res, copied = &r, nil
			late = time.After(10 * time.Second)
		case <-late:
			return *res, fmt.Errorf("migration stream ended after %d bytes, but QEMU does not report the migration completed", res.n)
		case <-tick.C:
		}
	}
}

// dialRunning opens a QMP session to a running guest and reads its
// migration capabilities, which a save changes and must put back.
func dialRunning(ctx context.Context, sock string) (*qmp.Session, map[string]bool, error) {
	s, err := qmp.Dial(ctx, sock)
	if err != nil {
		return nil, nil, err
	}
	st, err := s.Status(ctx)
	if err == nil && !st.Running {
		err = fmt.Errorf("guest is %s, not running", st.State)
	}
	var caps map[string]bool
	if err == nil {
		caps, err = s.MigrationCapabilities(ctx)
	}
	if err != nil {
		s.Close()
		return nil, nil, err
	}
	return s, caps, nil
}

// naiveSave is what a tool that does not look inside the guest could do
// with the same RAM file kvmckpt reads: stop the guest, save QEMU's device
// state without the shared RAM (x-ignore-shared, as kvmckpt does), copy the
// whole RAM file leaving out only what reads as zero (holes are skipped
// with SEEK_DATA, all-zero 4 KiB blocks by seeking past them, so the copy
// is sparse), fsync, continue. One thread, no compression.
func naiveSave(ctx context.Context, spec childSpec) (res *childResult, err error) {
	s, caps, err := dialRunning(ctx, spec.QMP)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	bg := context.WithoutCancel(ctx)
	// SaveDeviceState turns x-ignore-shared on and leaves it on; put it
	// back, so that QEMU's own save after this one still carries the RAM.
	defer s.SetMigrationCapabilities(bg, map[string]bool{qmp.CapIgnoreShared: caps[qmp.CapIgnoreShared]})
	backends, err := s.RAMBackends(ctx)
	if err != nil {
		return nil, err
	}
	type ramCopy struct {
		src, dst *os.File
		size     int64
	}
	var copies []ramCopy
	res = &childResult{}
	var files []*os.File
	create := func(path string) (*os.File, error) {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		files = append(files, f)
		res.Files = append(res.Files, path)
		return f, nil
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
		if err != nil {
			for _, p := range res.Files {
				os.Remove(p)
			}
		}
	}()
	for _, b := range backends {
		if b.MemPath == "" || !b.Share || b.FileOffset != 0 {
			return nil, fmt.Errorf("backend %s is not a shared RAM file (mem-path %q, share=%v, offset %d)", b.ID, b.MemPath, b.Share, b.FileOffset)
		}
		src, err := os.Open(b.MemPath)
		if err != nil {
			return nil, err
		}
		defer src.Close()
		dst, err := create(spec.Output + ".ram-" + b.ID)
		if err != nil {
			return nil, err
		}
		copies = append(copies, ramCopy{src, dst, int64(b.Size)})
	}
	dev, err := create(spec.Output + ".dev")
	if err != nil {
		return nil, err
	}

	t0 := time.Now()
	if err := s.Stop(ctx); err != nil {
		return nil, err
	}
	defer resumeOnError(bg, s, &err)
	if _, err := s.SaveDeviceState(ctx, dev); err != nil {
		return nil, err
	}
	res.DeviceStateMS = ms(time.Since(t0))
	t1 := time.Now()
	for _, c := range copies {
		n, err := sparseCopy(ctx, c.dst, c.src, c.size)
		if err != nil {
			return nil, fmt.Errorf("copy RAM file %s: %w", c.src.Name(), err)
		}
		res.StreamBytes += n
	}
	res.StreamMS = ms(time.Since(t1))
	t2 := time.Now()
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("fsync %s: %w", f.Name(), err)
		}
	}
	res.SyncMS = ms(time.Since(t2))
	if err := s.Cont(ctx); err != nil {
		return nil, err
	}
	res.PauseMS = ms(time.Since(t0))
	return res, nil
}

// blockSize is the unit of the sparse copy: a guest page.
const blockSize = 4096

// sparseCopy copies the first size bytes of src to dst, leaving holes in
// dst where src has holes or all-zero 4 KiB blocks, and returns the bytes
// written. dst ends up size bytes long.
func sparseCopy(ctx context.Context, dst, src *os.File, size int64) (int64, error) {
	if size%blockSize != 0 {
		return 0, fmt.Errorf("size %d is not a multiple of %d", size, blockSize)
	}
	holes, err := pagemap.Holes(src, size)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	var written int64
	copyRange := func(start, end int64) error {
		for off := start; off < end; off += int64(len(buf)) {
			if err := ctx.Err(); err != nil {
				return err
			}
			b := buf[:min(int64(len(buf)), end-off)]
			if _, err := src.ReadAt(b, off); err != nil {
				return err
			}
			n, err := writeNonZero(dst, b, off)
			written += n
			if err != nil {
				return err
			}
		}
		return nil
	}
	var pos int64
	for _, h := range holes {
		hs, he := int64(h.Start)*blockSize, int64(h.End())*blockSize
		if err := copyRange(pos, hs); err != nil {
			return written, err
		}
		pos = he
	}
	if err := copyRange(pos, size); err != nil {
		return written, err
	}
	if err := dst.Truncate(size); err != nil {
		return written, err
	}
	return written, nil
}

// writeNonZero writes the runs of b's 4 KiB blocks that are not all zero
// to w at off+their offset in b, and returns the bytes written.
func writeNonZero(w io.WriterAt, b []byte, off int64) (int64, error) {
	var written int64
	run := -1 // start of the current run of non-zero blocks
	flush := func(end int) error {
		if run < 0 {
			return nil
		}
		n, err := w.WriteAt(b[run:end], off+int64(run))
		written += int64(n)
		run = -1
		return err
	}
	for i := 0; i < len(b); i += blockSize {
		end := min(i+blockSize, len(b))
		if pagemap.IsZero(b[i:end]) {
			if err := flush(i); err != nil {
				return written, err
			}
		} else if run < 0 {
			run = i
		}
	}
	return written, flush(len(b))
}

// setMappedRAM turns on what QEMU's mapped-ram file migration needs, on
// the saving and the loading QEMU alike (docs/devel/migration/mapped-ram.rst):
// the mapped-ram and multifd capabilities, multifdChannels channels, and
// direct-io, so that pages bypass the host's page cache (virsh save
// --image-format sparse --parallel-channels N --bypass-cache). The caller
// puts the capabilities and parameters back where the QEMU lives on.
func setMappedRAM(ctx context.Context, s *qmp.Session) error {
	if err := s.SetMigrationCapabilities(ctx, map[string]bool{"mapped-ram": true, "multifd": true}); err != nil {
		return fmt.Errorf("turn on mapped-ram (QEMU 8.2 or later): %w", err)
	}
	params := map[string]any{"multifd-channels": multifdChannels, "direct-io": true}
	if err := s.Run(ctx, "migrate-set-parameters", params, nil); err != nil {
		return fmt.Errorf("set multifd channels and direct-io: %w", err)
	}
	return nil
}

// mappedRAMSave is QEMU's best save to a file: the guest is stopped, QEMU
// writes every RAM page at its own offset of the file (zero pages are
// left out, so the file is sparse) over multifd channels with O_DIRECT,
// the file is fsynced, and the guest continues. Capabilities and
// parameters are put back as they were.
func mappedRAMSave(ctx context.Context, spec childSpec) (res *childResult, err error) {
	s, caps, err := dialRunning(ctx, spec.QMP)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	bg := context.WithoutCancel(ctx)
	res = &childResult{IgnoreSharedWasOn: caps[qmp.CapIgnoreShared]}
	var before struct {
		MaxBandwidth    int64 `json:"max-bandwidth"`
		MultifdChannels int   `json:"multifd-channels"`
		DirectIO        bool  `json:"direct-io"`
	}
	if err := s.Run(ctx, "query-migrate-parameters", nil, &before); err != nil {
		return nil, fmt.Errorf("query migration parameters: %w", err)
	}
	res.MaxBandwidthBefore = before.MaxBandwidth
	defer s.Run(bg, "migrate-set-parameters", map[string]any{"max-bandwidth": before.MaxBandwidth,
		"multifd-channels": before.MultifdChannels, "direct-io": before.DirectIO}, nil)
	defer s.SetMigrationCapabilities(bg, map[string]bool{"mapped-ram": caps["mapped-ram"], "multifd": caps["multifd"], qmp.CapIgnoreShared: caps[qmp.CapIgnoreShared]})
	if err := s.SetMigrationCapabilities(ctx, map[string]bool{qmp.CapIgnoreShared: false}); err != nil {
		return nil, err
	}
	if err := setMappedRAM(ctx, s); err != nil {
		return nil, err
	}
	if err := s.Run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(unlimitedBandwidth)}, nil); err != nil {
		return nil, fmt.Errorf("lift migration bandwidth limit: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(spec.Output)
		}
	}()
	t0 := time.Now()
	if err := s.Stop(ctx); err != nil {
		return nil, err
	}
	defer resumeOnError(bg, s, &err)
	if err := s.Run(ctx, "migrate", map[string]string{"uri": "file:" + spec.Output}, nil); err != nil {
		return nil, fmt.Errorf("start migration: %w", err)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for done := false; !done; {
		st, err := s.MigrationStatus(ctx)
		if err != nil {
			return nil, err
		}
		switch st.Status {
		case "completed":
			done = true
			continue
		case "failed", "cancelled":
			return nil, fmt.Errorf("%w: %s %s", qmp.ErrMigrationFailed, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			_ = s.Run(bg, "migrate_cancel", nil, nil)
			return nil, fmt.Errorf("wait for migration: %w", ctx.Err())
		case <-tick.C:
		}
	}
	res.StreamMS = ms(time.Since(t0))
	t1 := time.Now()
	f, err := os.Open(spec.Output)
	if err != nil {
		return nil, err
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("fsync %s: %w", spec.Output, err)
	}
	res.SyncMS = ms(time.Since(t1))
	if err := s.Cont(ctx); err != nil {
		return nil, err
	}
	res.PauseMS = ms(time.Since(t0))
	if st, err := os.Stat(spec.Output); err == nil {
		res.StreamBytes = st.Size()
	}
	res.Files = []string{spec.Output}
	return res, nil
}

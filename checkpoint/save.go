package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/kvmckpt/kvmckpt/migstream"

	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// After says what a save does with the guest once the checkpoint is
// durable.
type After int

const (
	// AfterPriorState puts the guest back in the run state it had.
	AfterPriorState After = iota
	// AfterKeepPaused leaves it paused.
	AfterKeepPaused
	// AfterQuit ends QEMU, like `virsh save`.
	AfterQuit
)

// SaveOptions say which guest to save where.
type SaveOptions struct {
	ScanOptions
	// Output is the checkpoint file. An older file of that name survives
	// any failure.
	Output string
	After  After
	// Compression is "auto" (default: LZ4 as far as it shortens the
	// pages' writing on this disk, see [writer.CompressionAuto]), "lz4"
	// (the smallest file) or "none".
	Compression writer.Compression
	// Key, if not nil, encrypts the checkpoint (32 bytes, AES-256-GCM).
	Key []byte
	// Progress, if not nil, is called as pages are written.
	Progress func(done, total uint64)
	// Live copies the used pages while the guest runs, in pre-copy
	// rounds, and pauses it only for the final round (see live.go).
	Live bool
	// MaxPause is the pause a live save aims for; 0 means
	// [DefaultMaxPause].
	MaxPause time.Duration
	// NoPredict turns off the delayed copy of hot groups in a live save.
	NoPredict bool
	// Squeeze, if not empty, inflates the guest's balloon before the
	// save so the guest gives up its page cache, and puts it back after:
	// "auto" sizes it from the guest's own counters, else a size to take
	// ("512M"; see [ParseSqueeze]).
	Squeeze string
	// Parent, if not empty, makes the checkpoint incremental: it stores
	// only the pages in use whose content differs from what the parent
	// checkpoint restores, and names the parent. Parents lists files
	// where the parent's own parents may be, besides beside it.
	Parent  string
	Parents []string
}

// SaveResult is what a save did. The JSON names are part of the CLI.
type SaveResult struct {
	PagesTotal       uint64 `json:"pages_total"`
	PagesSaved       uint64 `json:"pages_saved"`
	PagesFree        uint64 `json:"pages_free"`
	PagesFreeBuddy   uint64 `json:"pages_free_buddy"`
	PagesFreePCP     uint64 `json:"pages_free_pcp"`
	PagesOffline     uint64 `json:"pages_offline"`
	BalloonPages     uint64 `json:"balloon_pages"`
	PagesZero        uint64 `json:"pages_zero"`
	PagesHole        uint64 `json:"pages_hole"`
	BytesWritten     int64  `json:"bytes_written"`
	DeviceStateBytes int64  `json:"device_state_bytes"`
	PauseMS          int64  `json:"pause_ms"`
	DurationMS       int64  `json:"duration_ms"`
	ScanMS           int64  `json:"scan_ms"`
	PagesMS          int64  `json:"pages_ms"`
	DeviceStateMS    int64  `json:"device_state_ms"`
	SyncMS           int64  `json:"sync_ms"`
	// PagesStages is where pages_ms went (not for a live save).
	PagesStages  *PagesStages `json:"pages_stages,omitempty"`
	Output       string       `json:"output"`
	Profile      string       `json:"profile"`
	KernelBanner string       `json:"kernel_banner"`
	// FullSave is true when the guest kernel could not be introspected
	// and every non-zero page was saved (Warnings say why).
	FullSave bool `json:"full_save"`
	// RAMInDeviceState counts, per backend whose RAM QEMU may send with
	// the device state (QEMU's own memory; a memfd on QEMU 8.1 and
	// later), the page records QEMU did send, x-ignore-shared
	// notwithstanding, and kvmckpt dropped: what that RAM cost the pause.
	RAMInDeviceState map[string]uint64 `json:"ram_pages_in_device_state,omitempty"`
	// Live is what the pre-copy rounds of a live save did.
	Live *LiveReport `json:"live,omitempty"`
	// Squeeze is what the balloon took before the save (--squeeze).
	Squeeze *SqueezeReport `json:"squeeze,omitempty"`
	// Parent is what an incremental save (--parent) compared with.
	Parent *ParentReport `json:"parent,omitempty"`
	// GuestState is the guest's run state when kvmckpt left it.
	GuestState string   `json:"guest_state"`
	Warnings   []string `json:"warnings,omitempty"`
}

// Save checkpoints a guest: it pauses it, finds the pages in use, writes
// them and QEMU's device state durably to opt.Output, and then does what
// opt.After says. On any failure the guest goes back to its prior run state
// and no partial file is left.
func Save(ctx context.Context, opt SaveOptions) (*SaveResult, error) {
	start := time.Now()
	if opt.Output == "" {
		return nil, errors.New("save: no output file")
	}
	if opt.Live && writer.IsStored(opt.Output) {
		return nil, fmt.Errorf("save: a live checkpoint is written in place, round after round, which %s cannot take: save it to a local file, or save without --live", opt.Output)
	}
	log := logger(opt.Log)
	g, err := openSaveable(ctx, opt.target(), log)
	if err != nil {
		return nil, err
	}
	defer g.close()
	if removed, err := writer.CleanStale(opt.Output); err != nil {
		log.Warn("cleaning stale temporary files", "err", err)
	} else {
		for _, r := range removed {
			log.Info("removed a temporary file left by an interrupted save", "path", r)
		}
	}
	// The output replaces whatever is at its path: never memory in use,
	// such as the guest's own RAM file.
	if err := checkNotMapped(opt.Output, "output", "write the checkpoint elsewhere"); err != nil {
		return nil, err
	}
	// A store that cannot take the checkpoint says so before the pause.
	if err := writer.CheckTarget(opt.Output); err != nil {
		return nil, fmt.Errorf("save: %w", err)
	}
	caps, err := g.sess.MigrationCapabilities(ctx)
	if err != nil {
		return nil, err
	}
	// The parent's page hashes are read, or computed, before the pause.
	if opt.Parent != "" {
		switch {
		case opt.Key != nil:
			return nil, errors.New("an incremental checkpoint (--parent) cannot be encrypted: save it without a key, or a whole encrypted one")
		}
		if g.parent, err = openParent(ctx, opt.Parent, opt.Output, opt.Parents); err != nil {
			return nil, err
		}
		defer g.parent.close()
	}
	var squeezed *SqueezeReport
	if opt.Squeeze != "" {
		var release func()
		if squeezed, release, err = g.squeeze(ctx, opt); err != nil {
			return nil, err
		}
		// The balloon goes back whatever happens, after the guest runs
		// (but for a QEMU asked to quit).
		defer func() {
			if opt.After != AfterQuit {
				release()
			}
		}()
		g.balloonPrior = squeezed.PriorBytes
	}
	var live *liveSave
	if opt.Live {
		if live, err = g.precopy(ctx, opt); err != nil {
			return nil, err
		}
		defer live.w.Abort()
	}
	// What the save holds until the guest runs again: the checkpoint it
	// replaced, whose blocks the file system frees when let go.
	defer func() {
		for _, release := range g.afterResume {
			release()
		}
	}()
	restore, err := g.pause(ctx)
	if err != nil {
		return nil, err
	}
	paused := time.Now()
	var res *SaveResult
	var saveErr error
	if live != nil {
		g.log.Debug("paused for the final round", "since_pause_ms", time.Since(paused).Milliseconds())
		res, saveErr = g.finishLive(ctx, live, opt, caps)
	} else {
		res, saveErr = g.save(ctx, opt, caps)
	}
	// Whatever happened, and even if a signal cancelled ctx, the guest goes
	// back to a defined run state.
	bg, cancelBG := settleContext(ctx)
	defer cancelBG()
	var afterErr error
	switch {
	case saveErr != nil || opt.After == AfterPriorState:
		afterErr = restore(bg)
	case opt.After == AfterQuit:
		afterErr = g.sess.Quit(bg)
		g.clearPauseRecord()
	default:
		// Paused on purpose: not a pause to report later.
		g.clearPauseRecord()
	}
	if saveErr != nil {
		if afterErr != nil {
			return nil, fmt.Errorf("%w; and the guest could not be resumed: %v (the next kvmckpt on this guest resumes it, or run `kvmckpt resume %s`)", saveErr, afterErr, opt.target().flag())
		}
		return nil, saveErr
	}
	if afterErr != nil {
		return nil, fmt.Errorf("checkpoint %s is complete, but: %w", opt.Output, afterErr)
	}
	res.PauseMS = time.Since(paused).Milliseconds()
	if opt.After == AfterQuit {
		res.GuestState = "quit"
	} else if st, err := g.sess.Status(bg); err == nil {
		res.GuestState = st.State
	}
	res.DurationMS = time.Since(start).Milliseconds()
	res.Squeeze = squeezed
	return res, nil
}

func (g *guest) save(ctx context.Context, opt SaveOptions, caps map[string]bool) (*SaveResult, error) {
	t0 := time.Now()
	scan, err := g.scan(ctx, opt.ScanOptions)
	if err != nil {
		return nil, err
	}
	tScan := time.Since(t0)
	h, err := g.header(ctx, scan.Banner, scan.Profile)
	if err != nil {
		return nil, err
	}
	h.FillByte = scan.FillByte
	h.Pages = writer.PageCounts{
		FreeBuddy: scan.FreeBuddy, FreePCP: scan.FreePCP,
		Zero: scan.PagesZero, Hole: scan.PagesHole,
	}
	// Page hashes, so that the checkpoint can be a parent without being
	// read again: hashed as the pages are written (not encrypted files).
	comp := opt.Compression
	if comp == "" {
		comp = writer.CompressionAuto
	}
	wopt := writer.Options{Compression: comp, Key: opt.Key, Zeros: scan.hole, PageHashes: opt.Key == nil}
	store := scan.save
	var parentRep *ParentReport
	if p := g.parent; p != nil {
		th := time.Now()
		if wopt.InUse, store, err = p.changed(ctx, g, &h, scan.save, scan.hole); err != nil {
			return nil, err
		}
		h.Parent = p.ref
		parentRep = &ParentReport{
			Path: p.path, ID: p.ref.ID, Depth: p.ref.Depth, Links: len(p.chain.Links),
			PagesInUse: scan.save.Count(), PagesChanged: store.Count(),
			ParentMS: p.took.Milliseconds(), HashMS: time.Since(th).Milliseconds(),
		}
	}
	// With a fill byte other than zero, holes of the RAM file are saved
	// (they must come back as zeros); the writer writes them without
	// reading them through the mapping, which would make the host allocate.
	w, err := writer.Create(opt.Output, h, wopt)
	if err != nil {
		return nil, err
	}
	defer w.Abort()
	g.afterResume = append(g.afterResume, w.ReleaseReplaced)
	// A stream that carries the RAM costs a pass of QEMU's over all of
	// it: run it beside the pages, into memory (filtered, it is small).
	var dev *deviceCapture
	if g.ramInStream() {
		dev = g.captureDevice(ctx, caps)
		defer dev.stop()
	}
	t1 := time.Now()
	if g.mappedAll() {
		err = w.WritePagesContext(ctx, g.ram, store, opt.Progress)
	} else {
		err = w.WritePagesFrom(ctx, g.pageSpace(), store, opt.Progress)
	}
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("save interrupted: %w", err)
	}
	tPages := time.Since(t1)
	t2 := time.Now()
	var devBytes int64
	var tDev time.Duration
	if dev != nil {
		buf, took, err := dev.wait()
		if err != nil {
			return nil, err
		}
		if devBytes, err = w.WriteDeviceState(bytes.NewReader(buf)); err != nil {
			return nil, fmt.Errorf("write device state: %w", err)
		}
		tDev = took
	} else {
		if devBytes, err = g.saveDevice(ctx, w.WriteDeviceState, caps); err != nil {
			return nil, err
		}
		tDev = time.Since(t2)
	}
	t3 := time.Now()
	if err := w.Commit(); err != nil {
		return nil, err
	}
	st := w.Stats()
	stages := newPagesStages(st, tPages)
	g.log.Debug("pages written", "pages_ms", tPages.Milliseconds(), "stages", stages)
	return &SaveResult{
		PagesTotal:       scan.PagesTotal,
		PagesSaved:       st.PagesWritten,
		PagesFree:        scan.PagesFree,
		PagesFreeBuddy:   scan.FreeBuddy,
		PagesFreePCP:     scan.FreePCP,
		PagesOffline:     scan.PagesOffline,
		BalloonPages:     scan.BalloonPages,
		PagesZero:        scan.PagesZero,
		PagesHole:        scan.PagesHole,
		BytesWritten:     st.BytesWritten,
		DeviceStateBytes: devBytes,
		ScanMS:           tScan.Milliseconds(),
		PagesMS:          tPages.Milliseconds(),
		PagesStages:      stages,
		DeviceStateMS:    tDev.Milliseconds(),
		SyncMS:           time.Since(t3).Milliseconds(),
		Output:           opt.Output,
		Profile:          scan.Profile,
		KernelBanner:     scan.Banner,
		Warnings:         scan.Warnings,
		FullSave:         scan.FullSave,
		RAMInDeviceState: g.ramSent,
		Parent:           parentRep,
	}, nil
}

// ParentReport is what an incremental save compared with. The JSON names
// are part of the CLI.
type ParentReport struct {
	Path string `json:"path"`
	// ID is the parent's identity, which the new checkpoint names.
	ID string `json:"id"`
	// Depth is the new checkpoint's: its number of parents.
	Depth int `json:"depth"`
	// Links is the number of checkpoints of the parent's chain.
	Links int `json:"links"`
	// PagesInUse are the guest's pages in use; PagesChanged those whose
	// content differs from what the parent restores: the pages saved.
	PagesInUse   uint64 `json:"pages_in_use"`
	PagesChanged uint64 `json:"pages_changed"`
	// ParentMS is what reading the parent's page hashes took, before the
	// pause; HashMS what hashing the guest's pages took, in it.
	ParentMS int64 `json:"parent_ms"`
	HashMS   int64 `json:"hash_ms"`
}

// maxDeviceState bounds a device state held in memory: QEMU's small RAM
// blocks (migstream's MaxKept) and the devices' sections.
const maxDeviceState = migstream.DefaultMaxKept + 64<<20

// deviceCapture is a device state being saved into memory while the pages
// are written.
type deviceCapture struct {
	cancel context.CancelFunc
	done   chan struct{}
	buf    bytes.Buffer
	took   time.Duration
	err    error
}

func (g *guest) captureDevice(ctx context.Context, caps map[string]bool) *deviceCapture {
	ctx, cancel := context.WithCancel(ctx)
	d := &deviceCapture{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		t := time.Now()
		_, d.err = g.saveDevice(ctx, func(r io.Reader) (int64, error) {
			n, err := io.Copy(&d.buf, io.LimitReader(r, maxDeviceState+1))
			if err == nil && n > maxDeviceState {
				err = fmt.Errorf("device state larger than %d MiB", maxDeviceState>>20)
			}
			return n, err
		}, caps)
		d.took = time.Since(t)
	}()
	return d
}

// wait returns the device state and how long QEMU took to send it.
func (d *deviceCapture) wait() ([]byte, time.Duration, error) {
	<-d.done
	return d.buf.Bytes(), d.took, d.err
}

// stop cancels the capture, if it still runs, and waits for it: QEMU's
// migration is cancelled and the capabilities put back.
func (d *deviceCapture) stop() {
	d.cancel()
	<-d.done
}

// saveDevice streams QEMU's device state, saved with x-ignore-shared on,
// into the checkpoint and puts the migration capabilities back as they
// were, so a later ordinary migration of this guest still carries its
// RAM. When QEMU may send backends' RAM all the same (see
// [guest.ramInStream]), the stream is filtered of it on its way to the
// checkpoint, with the stream's rate limit lifted: every page QEMU sends
// passes through the pipe during the pause.
func (g *guest) saveDevice(ctx context.Context, write func(io.Reader) (int64, error), caps map[string]bool) (int64, error) {
	pr, pw := io.Pipe()
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := write(pr)
		pr.CloseWithError(err)
		done <- result{n, err}
	}()
	var qerr error
	var filtered migstream.Stats
	if g.ramInStream() {
		fr, fw := io.Pipe()
		ferr := make(chan error, 1)
		var blocks []migstream.Block
		sent := map[string]uint64{}
		go func() {
			var err error
			filtered, err = migstream.Filter(fr, pw, migstream.Options{
				IgnoreShared: true,
				Drop:         g.isBackendBlock,
				Blocks: func(b []migstream.Block) error {
					blocks = b
					return g.checkStreamBlocks(b)
				},
				Page: func(blk int, _ uint64, _ bool) { sent[blocks[blk].ID]++ },
			})
			if err != nil {
				err = fmt.Errorf("filter the migration stream of its RAM: %w", err)
			}
			fr.CloseWithError(err)
			pw.CloseWithError(err)
			ferr <- err
		}()
		_, qerr = g.sess.SaveStream(ctx, fw, true, true)
		fw.CloseWithError(qerr)
		if err := <-ferr; qerr == nil {
			qerr = err
		}
		g.ramSent = map[string]uint64{}
		for _, b := range g.backends {
			g.ramSent[b.ID] = sent[b.RegionName()]
		}
		g.log.Debug("filtered the device state: pages of the backends QEMU sent despite x-ignore-shared, dropped",
			"pages", g.ramSent, "qemu_pages_kept", filtered.KeptPages)
	} else {
		_, qerr = g.sess.SaveDeviceState(ctx, pw)
		pw.CloseWithError(qerr)
	}
	r := <-done
	if ignore, ok := caps[qmp.CapIgnoreShared]; ok {
		sctx, cancel := settleContext(ctx)
		defer cancel()
		if err := g.sess.SetMigrationCapabilities(sctx, map[string]bool{qmp.CapIgnoreShared: ignore}); err != nil {
			g.log.Warn("could not reset the migration capability", "capability", qmp.CapIgnoreShared, "err", err)
		}
	}
	if qerr != nil {
		return 0, qerr // says "save device state" itself
	}
	if r.err != nil {
		return 0, fmt.Errorf("write device state: %w", r.err)
	}
	return r.n, nil
}

// isBackendBlock reports whether a RAM block of QEMU's stream is one of
// the backends, whose pages the checkpoint holds.
func (g *guest) isBackendBlock(b migstream.Block) bool {
	for _, be := range g.backends {
		if be.RegionName() == b.ID {
			return true
		}
	}
	return false
}

// checkStreamBlocks checks that QEMU's stream lists every backend, of its
// size: a backend it left out would be restored with no pages, and one of
// another size is not the RAM kvmckpt read.
func (g *guest) checkStreamBlocks(blocks []migstream.Block) error {
	for _, be := range g.backends {
		i := slices.IndexFunc(blocks, func(b migstream.Block) bool { return b.ID == be.RegionName() })
		switch {
		case i < 0:
			return fmt.Errorf("%w: QEMU's migration stream does not list RAM backend %q", migstream.ErrFormat, be.ID)
		case blocks[i].Size != be.Size:
			return fmt.Errorf("%w: QEMU's migration stream gives RAM backend %q %d bytes, query-memdev %d",
				migstream.ErrFormat, be.ID, blocks[i].Size, be.Size)
		}
	}
	return nil
}

// PagesStages is where a stop-and-copy save's pages phase went, from the
// writer's pipeline: workers read the pages in use (mapping them in),
// hash, compress and checksum them; one goroutine writes them in order;
// the disk writes. The workers' times are summed over the workers.
// The JSON names are part of the CLI.
type PagesStages struct {
	Workers int `json:"workers"`
	// The workers' time: reading pages (and copying them into chunk
	// buffers), hashing, LZ4, encrypting, CRCs, and waiting for work.
	ReadMS     float64 `json:"read_ms"`
	HashMS     float64 `json:"hash_ms"`
	CompressMS float64 `json:"compress_ms"`
	SealMS     float64 `json:"seal_ms,omitempty"`
	ChecksumMS float64 `json:"checksum_ms"`
	IdleMS     float64 `json:"idle_ms"`
	// The writing goroutine's time waiting for the next chunk (the
	// workers are behind) and for a buffer (the disk is behind).
	WaitChunkMS float64 `json:"wait_chunk_ms"`
	WaitDiskMS  float64 `json:"wait_disk_ms"`
	// DiskMS is the time the disk's writes took.
	DiskMS float64 `json:"disk_ms"`
	// Chunks by how they were stored; raw_by_choice are those --compress
	// auto stored raw because the disk would have waited for LZ4.
	ChunksLZ4         int `json:"chunks_lz4"`
	ChunksRaw         int `json:"chunks_raw"`
	ChunksRawByChoice int `json:"chunks_raw_by_choice"`
	// RawMBps is the pages' raw bytes over pages_ms, StoredMBps what
	// reached the file, both in MB/s (10^6 bytes).
	RawMBps    float64 `json:"raw_mb_per_s"`
	StoredMBps float64 `json:"stored_mb_per_s"`
}

func newPagesStages(st writer.Stats, took time.Duration) *PagesStages {
	ms := func(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }
	rate := func(n int64) float64 {
		if took <= 0 {
			return 0
		}
		return math.Round(float64(n)/took.Seconds()/1e4) / 100
	}
	s := st.Stages
	return &PagesStages{
		Workers: s.Workers,
		ReadMS:  ms(s.Read), HashMS: ms(s.Hash), CompressMS: ms(s.Compress), SealMS: ms(s.Seal),
		ChecksumMS: ms(s.Checksum), IdleMS: ms(s.Idle),
		WaitChunkMS: ms(s.WaitChunk), WaitDiskMS: ms(s.WaitDisk), DiskMS: ms(s.Disk),
		ChunksLZ4: st.ChunksLZ4, ChunksRaw: st.ChunksRaw, ChunksRawByChoice: s.RawChunks,
		RawMBps: rate(st.PageBytes), StoredMBps: rate(st.StoredBytes),
	}
}

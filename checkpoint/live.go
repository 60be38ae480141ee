package checkpoint

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"sync"
	"time"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/profiles"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// A live save copies the guest's used pages while it runs, in pre-copy
// rounds, and pauses it only for the last: the technique of live
// migration, applied to a checkpoint file.
//
// Pages are handled in groups of liveGroupPages consecutive RAM pages; a
// group's chunk in the file (writer.Live, keyed by group) holds its used,
// non-zero pages. Round one writes every group; each later round reads
// every used page again, and rewrites the groups whose signature changed:
// a keyed hash (hash/maphash, seeded at random for each save, so that a
// guest cannot craft two pages that collide) of which pages are used and
// of their contents. A group that changed in two rounds running is hot:
// its rewrite is deferred to the final round instead of repeated every
// round (the delayed copy of "Live Memory Migration for Virtual Machine
// Based on Dirty Pages Delayed Copy Method", Zhang et al. 2013); NoPredict
// turns that off.
//
// Rounds stop when the work left (the groups that changed in the last
// round, at the round's measured write rate, plus reading every used page
// once) fits the pause target, when a round changes as much as the one
// before (not converging), or after maxLiveRounds. Then the guest is
// paused, its free lists walked again, and every group whose signature
// differs from its chunk's is written: the file holds the guest as it was
// at that pause, whatever happened in between (pages freed, pages newly
// used, pages written after their copy). Dirty detection by content costs
// a read of the used pages in the pause; a cheaper tracker (QEMU's dirty
// log, soft-dirty) could find the groups to look at instead, behind
// liveTracker.

// liveGroupPages is the pages of a group, and the chunk size of a live
// checkpoint: small enough that a page written does not rewrite much, large
// enough for LZ4.
const liveGroupPages = 64

// maxLiveRounds bounds the pre-copy rounds.
const maxLiveRounds = 30

// LiveReport is what the rounds of a live save did. The JSON names are
// part of the CLI.
type LiveReport struct {
	Rounds int `json:"rounds"`
	// BytesPerRound and PagesPerRound are what each pre-copy round
	// wrote (stored bytes, pages), the final round last.
	BytesPerRound []int64  `json:"bytes_per_round"`
	PagesPerRound []uint64 `json:"pages_per_round"`
	// PagesDeferredHot counts the pages of hot groups that rounds
	// deferred to the final round instead of copying again.
	PagesDeferredHot uint64 `json:"pages_deferred_hot"`
	// FinalDirtyPages are the pages the final round, in the pause, wrote.
	FinalDirtyPages uint64 `json:"final_dirty_pages"`
	// StopReason says why the rounds ended: "converged", "not
	// converging" (the guest writes faster than kvmckpt copies: the
	// final pause is longer) or "max rounds".
	StopReason string `json:"stop_reason"`
	// RoundsMS is the time of the pre-copy rounds, the guest running.
	RoundsMS int64 `json:"rounds_ms"`
	// FinalMS is the final round's scan and writes, in the pause.
	FinalMS int64 `json:"final_ms"`
	// PunchedBytes are stale chunks punched out of the file.
	PunchedBytes int64 `json:"punched_bytes"`
	// Predict says whether hot groups were deferred (not --no-predict).
	Predict bool `json:"predict"`
}

// liveGroup is the state of one group.
type liveGroup struct {
	stored   uint64 // signature of its chunk in the file; 0: none
	seen     uint64 // signature the round before saw
	dirtyRun int    // rounds running in which it changed
}

// liveSave is a live save in progress: the rounds' state, for the final
// round.
type liveSave struct {
	g       *guest
	w       *writer.Live
	k       *introspect.Kernel
	prof    *profiles.Profile
	seed    maphash.Seed
	groups  []liveGroup
	predict bool
	report  LiveReport
	workers int
}

// precopy runs the pre-copy rounds on the running guest. It returns the
// live save, whose writer the caller must Abort on failure.
func (g *guest) precopy(ctx context.Context, opt SaveOptions) (*liveSave, error) {
	t0 := time.Now()
	if opt.Key != nil {
		return nil, fmt.Errorf("%w: a live checkpoint cannot be encrypted yet; save without --live, or without --encrypt-key", ErrLive)
	}
	if err := g.mapRAM(ctx, false); err != nil {
		return nil, err
	}
	regs, err := g.sess.CPURegisters(ctx, 0)
	if err != nil {
		return nil, err
	}
	prof, err := g.profile(ctx, opt.ScanOptions, regs)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLive, err)
	}
	k, err := introspect.OpenKernel(g.mem, regs.CR3, regs.LA57(), prof)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLive, err)
	}
	h, err := g.header(ctx, prof.Banner, prof.Name)
	if err != nil {
		return nil, err
	}
	if fp, err := k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout}); err == nil && fp.FillByte != 0 {
		// Holes would then have to be saved as zeros, and are not read.
		return nil, fmt.Errorf("%w: the guest poisons free pages (page_poison=1); save it without --live", ErrLive)
	}
	w, err := writer.CreateLive(opt.Output, h, writer.Options{Compression: opt.Compression, ChunkPages: liveGroupPages})
	if err != nil {
		return nil, err
	}
	_, total := g.pageSpans()
	ls := &liveSave{
		g: g, w: w, k: k, prof: prof, seed: maphash.MakeSeed(),
		groups:  make([]liveGroup, (total+liveGroupPages-1)/liveGroupPages),
		predict: !opt.NoPredict,
		workers: max(1, runtime.GOMAXPROCS(0)),
	}
	ls.report.Predict = ls.predict
	maxPause := opt.MaxPause
	if maxPause <= 0 {
		maxPause = DefaultMaxPause
	}
	var prevDirty uint64
	for round := 1; ; round++ {
		if err := ctx.Err(); err != nil {
			w.Abort()
			return nil, fmt.Errorf("live save interrupted: %w", err)
		}
		// The lists of a running guest change under the walk: a zone
		// that does not add up is copied whole this round, and the final
		// walk, on the paused guest, decides.
		free := pagemap.NewBitmap(total)
		if fp, err := k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout}); err == nil {
			free = g.fileFree(fp.Free)
		}
		rs := time.Now()
		st, err := ls.round(ctx, free, false)
		if err != nil {
			w.Abort()
			return nil, err
		}
		if err := w.Sync(); err != nil {
			return nil, err
		}
		took := time.Since(rs)
		ls.report.Rounds = round
		ls.report.BytesPerRound = append(ls.report.BytesPerRound, st.bytes)
		ls.report.PagesPerRound = append(ls.report.PagesPerRound, st.pages)
		ls.report.PagesDeferredHot += st.deferredPages
		g.log.Debug("pre-copy round", "round", round, "pages", st.pages, "bytes", st.bytes, "changed_pages", st.changedPages,
			"deferred_pages", st.deferredPages, "read_pages", st.readPages, "ms", took.Milliseconds())
		// What the final round would have to do: read every used page,
		// and write what changed in this round (hot groups included).
		readTime := time.Duration(float64(took) * float64(st.readPages) / float64(max(st.readPages+st.pages, 1)))
		writeRate := float64(st.bytes) / max(took.Seconds()-readTime.Seconds(), 1e-3) // bytes/s
		if st.pages == 0 {
			writeRate = 500 << 20
		}
		estimate := readTime/time.Duration(ls.workers) + time.Duration(float64(st.changedPages*introspect.PageSize)/max(writeRate, 1)*float64(time.Second))
		switch {
		case round > 1 && estimate <= maxPause:
			ls.report.StopReason = "converged"
		case round > 2 && st.changedPages >= prevDirty*19/20:
			ls.report.StopReason = "not converging"
		case round >= maxLiveRounds:
			ls.report.StopReason = "max rounds"
		}
		if ls.report.StopReason != "" {
			break
		}
		prevDirty = st.changedPages
	}
	ls.report.RoundsMS = time.Since(t0).Milliseconds()
	return ls, nil
}

// testHookSkipFinalRound makes the final round write nothing, so that a
// test can show a torn checkpoint fails the guest's proof of atomicity.
var testHookSkipFinalRound bool

// DefaultMaxPause is the pause a live save aims for unless told otherwise.
const DefaultMaxPause = 100 * time.Millisecond

// ErrLive means a live save cannot be made of this guest; a stop-and-copy
// save may still be.
var ErrLive = errors.New("live save not possible")

// roundStats are what one round did.
type roundStats struct {
	pages, readPages uint64 // pages written; pages read and hashed
	changedPages     uint64 // pages of groups that changed
	deferredPages    uint64
	bytes            int64
	zeroPages        uint64
}

// groupWork is a group a worker found changed, for the writer goroutine.
type groupWork struct {
	idx   uint64
	sig   uint64
	pages []uint64
	data  []byte
}

// round reads every group's used pages (used: not in free, not a hole,
// not zero: a live save is refused for a guest that poisons free pages),
// and writes the groups
// that changed since their chunk was written. In a pre-copy round, a group
// that changed in the round before too is deferred instead, when
// prediction is on; the final round writes every changed group.
func (ls *liveSave) round(ctx context.Context, free *pagemap.Bitmap, final bool) (roundStats, error) {
	g := ls.g
	spans, total := g.pageSpans()
	// Holes of the RAM files are never read (a read would allocate them).
	hole := pagemap.NewBitmap(total)
	for i, b := range g.backends {
		hs, err := pagemap.Holes(g.files[i], int64(b.Size))
		if err != nil {
			return roundStats{}, err
		}
		for _, h := range hs {
			hole.SetRange(spans[i].first+h.Start, min(h.Count, spans[i].n-min(h.Start, spans[i].n)))
		}
	}
	page := func(p uint64) []byte {
		for i, sp := range spans {
			if p >= sp.first && p < sp.first+sp.n {
				off := (p - sp.first) * introspect.PageSize
				return g.ram[i][off : off+introspect.PageSize]
			}
		}
		return nil
	}
	var (
		st   roundStats
		mu   sync.Mutex
		work = make(chan groupWork, 2*ls.workers)
		bufs = make(chan []byte, 3*ls.workers)
	)
	for range cap(bufs) {
		bufs <- make([]byte, 0, liveGroupPages*introspect.PageSize)
	}
	// One writer: writer.Live is not safe for concurrent use.
	werr := make(chan error, 1)
	go func() {
		var err error
		for wk := range work {
			if err == nil {
				if len(wk.pages) == 0 {
					err = ls.w.Drop(wk.idx)
				} else {
					before := ls.w.Stats().PutBytes
					err = ls.w.Put(wk.idx, wk.pages, wk.data)
					mu.Lock()
					st.bytes += ls.w.Stats().PutBytes - before
					st.pages += uint64(len(wk.pages))
					mu.Unlock()
				}
				if err == nil {
					ls.groups[wk.idx].stored = wk.sig
				}
			}
			bufs <- wk.data[:0]
		}
		werr <- err
	}()
	ngroups := uint64(len(ls.groups))
	var next uint64
	var wg sync.WaitGroup
	var ctxErr error
	for range ls.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local roundStats
			defer func() {
				mu.Lock()
				st.readPages += local.readPages
				st.changedPages += local.changedPages
				st.deferredPages += local.deferredPages
				st.zeroPages += local.zeroPages
				mu.Unlock()
			}()
			var pages []uint64
			for {
				mu.Lock()
				gi := next
				next++
				if gi%256 == 0 && ctx.Err() != nil {
					ctxErr = ctx.Err()
				}
				stop := ctxErr != nil
				mu.Unlock()
				if gi >= ngroups || stop {
					return
				}
				first, last := gi*liveGroupPages, min((gi+1)*liveGroupPages, total)
				var h maphash.Hash
				h.SetSeed(ls.seed)
				pages = pages[:0]
				for p := first; p < last; p++ {
					if free.Test(p) || hole.Test(p) {
						continue
					}
					b := page(p)
					local.readPages++
					if isZeroPage(b) {
						local.zeroPages++
						continue
					}
					pages = append(pages, p)
					var n [8]byte
					binary.LittleEndian.PutUint64(n[:], p)
					h.Write(n[:])
					h.Write(b)
				}
				sig := h.Sum64() | 1 // never 0, which means no chunk
				if len(pages) == 0 {
					sig = 0
				}
				grp := &ls.groups[gi]
				if sig != grp.seen {
					local.changedPages += uint64(len(pages))
					grp.dirtyRun++
				} else {
					grp.dirtyRun = 0
				}
				grp.seen = sig
				if sig == grp.stored {
					continue
				}
				if !final && ls.predict && grp.dirtyRun >= 2 {
					// Hot: changed in the round before too. Its copy
					// waits until it rests, or for the final round.
					local.deferredPages += uint64(len(pages))
					continue
				}
				buf := <-bufs
				for _, p := range pages {
					buf = append(buf, page(p)...)
				}
				work <- groupWork{idx: gi, sig: sig, pages: append([]uint64(nil), pages...), data: buf}
			}
		}()
	}
	wg.Wait()
	close(work)
	if err := <-werr; err != nil {
		return st, err
	}
	if ctxErr != nil {
		return st, fmt.Errorf("live save interrupted: %w", ctxErr)
	}
	return st, nil
}

// isZeroPage reports whether b is all zero.
func isZeroPage(b []byte) bool {
	for i := 0; i+8 <= len(b); i += 8 {
		if binary.LittleEndian.Uint64(b[i:]) != 0 {
			return false
		}
	}
	return true
}

// finishLive is the final round, on the paused guest: the free lists
// walked once more, every group that differs from its chunk written, then
// the device state and the commit.
func (g *guest) finishLive(ctx context.Context, ls *liveSave, opt SaveOptions, caps map[string]bool) (*SaveResult, error) {
	t0 := time.Now()
	_, total := g.pageSpans()
	var warnings []string
	free := pagemap.NewBitmap(total)
	var fp *introspect.FreePages
	fp, err := ls.k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout})
	switch {
	case err == nil:
		free = g.fileFree(fp.Free)
		warnings = fp.Warnings
		if fp.FillByte != 0 {
			return nil, fmt.Errorf("%w: the guest began to poison free pages during the rounds", ErrLive)
		}
	case ctx.Err() != nil:
		return nil, err
	case opt.RequireIntrospection:
		return nil, fmt.Errorf("%w: %w", ErrNoIntrospection, err)
	default:
		warnings = []string{fmt.Sprintf("the paused guest's free lists could not be read (%v); saving every non-zero page", err)}
	}
	tScan := time.Since(t0)
	var st roundStats
	if !testHookSkipFinalRound {
		if st, err = ls.round(ctx, free, true); err != nil {
			return nil, err
		}
	}
	tPages := time.Since(t0) - tScan
	ls.report.FinalDirtyPages = st.pages
	ls.report.BytesPerRound = append(ls.report.BytesPerRound, st.bytes)
	ls.report.PagesPerRound = append(ls.report.PagesPerRound, st.pages)
	t2 := time.Now()
	devBytes, err := g.saveDevice(ctx, ls.w.WriteDeviceState, caps)
	if err != nil {
		return nil, err
	}
	tDev := time.Since(t2)
	t3 := time.Now()
	if err := ls.w.Commit(); err != nil {
		return nil, err
	}
	ls.report.FinalMS = (tScan + tPages).Milliseconds()
	ws := ls.w.Stats()
	ls.report.PunchedBytes = ws.Punched
	res := &SaveResult{
		PagesTotal:       total,
		PagesSaved:       ws.PagesWritten,
		PagesFree:        free.Count(),
		PagesZero:        st.zeroPages,
		PagesHole:        total - free.Count() - st.readPages,
		BytesWritten:     ws.BytesWritten,
		DeviceStateBytes: devBytes,
		ScanMS:           tScan.Milliseconds(),
		PagesMS:          tPages.Milliseconds(),
		DeviceStateMS:    tDev.Milliseconds(),
		SyncMS:           time.Since(t3).Milliseconds(),
		Output:           opt.Output,
		Profile:          ls.prof.Name,
		KernelBanner:     ls.prof.Banner,
		Warnings:         warnings,
		FullSave:         fp == nil,
		Live:             &ls.report,
	}
	if fp != nil {
		res.PagesFreeBuddy, res.PagesFreePCP = fp.Buddy, fp.PCP
	}
	return res, nil
}

// header is the checkpoint header of the guest, without page counts.
func (g *guest) header(ctx context.Context, banner, profile string) (writer.Header, error) {
	h := writer.Header{KernelBanner: banner, Profile: profile}
	for _, b := range g.backends {
		r := writer.Region{ID: b.ID, Size: b.Size, MemPath: b.MemPath}
		for _, m := range g.layout {
			if m.Backend == b.ID {
				r.Mappings = append(r.Mappings, writer.Mapping{GPA: m.GPA, Offset: m.Offset, Size: m.Size})
			}
		}
		h.Regions = append(h.Regions, r)
	}
	var err error
	if h.QEMUVersion, err = g.sess.Version(ctx); err != nil {
		return h, err
	}
	m, err := g.sess.MachineType(ctx)
	if err != nil {
		return h, err
	}
	h.MachineType = m.Type
	if pid, err := g.sess.PeerPID(); err == nil {
		h.CommandLine, _ = qmp.ProcessCmdline(pid)
	}
	return h, nil
}

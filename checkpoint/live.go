package checkpoint

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagehash"
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
// non-zero pages. Every round reads the used pages and hashes each
// (hash/maphash, seeded at random for each save, so that a guest cannot
// craft two pages that collide). Round one writes nothing: the pages that
// change between it and round two are the guest's working set. Round two
// writes every group, those with working-set pages raw, the others
// compressed; each later round rewrites the groups with a page whose hash
// differs from the hash of its copy in the file, or with pages newly used
// or freed. A group written a second time is stored raw too, and a raw
// chunk is rewritten page by page in place (writer.Live.Patch): a page
// that changes costs a page, not a group.
//
// A page that changed in two rounds running is hot, and a group with a
// hot page is not rewritten: its copy is deferred to the final round instead of repeated every round (the delayed copy of "Live
// Memory Migration for Virtual Machine Based on Dirty Pages Delayed Copy
// Method", Zhang et al. 2013); NoPredict turns that off.
//
// Rounds stop when the work left (reading every used page once, and
// writing the pages that changed since their copy at the last round's
// write rate) fits the pause target; when the writing part is small but
// reading alone takes longer than the target ("read bound": more rounds
// cannot help); when a round changes as much as the one before (not
// converging); or after maxLiveRounds. Then the guest is paused, its free
// lists walked again, and every page whose hash differs from its copy's
// is written: the file holds the guest as it was at that pause, whatever
// happened in between (pages freed, pages newly used, pages written after
// their copy). Dirty detection by content costs a read of the used pages
// in the pause, at memory speed; a cheaper tracker (QEMU's dirty log,
// soft-dirty) could name the pages to look at instead.
//
// Where such a tracker goes: round's workers take every group in turn
// (look); a tracker would hand them only the groups it names written since
// it last did, plus, in the final round, those whose used pages changed
// with the walk, and the stop rule's read time would be that of the
// named groups. The hashes stay: they decide what a named group's copy
// must be, and they prove the tracker's answers in tests. One such
// tracker, QEMU's dirty log read off a migration into a pipe, was built
// that way and removed because nothing on a TCG host could prove it (see
// the history of tracker.go).

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
	// PagesDeferredHot counts, over the rounds, the changed pages of
	// hot groups that a round left for later instead of copying again.
	PagesDeferredHot uint64 `json:"pages_deferred_hot"`
	// FinalDirtyPages are the pages the final round, in the pause, wrote.
	FinalDirtyPages uint64 `json:"final_dirty_pages"`
	// StopReason says why the rounds ended: "converged", "read bound"
	// (reading the used pages in the pause takes longer than the
	// target), "not converging" (the guest writes faster than kvmckpt
	// copies: the final pause is longer) or "max rounds".
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
	writes int  // times its chunk was written
	raw    bool // its chunk is raw: Patch rewrites it
}

// liveSave is a live save in progress: the rounds' state, for the final
// round.
type liveSave struct {
	g    *guest
	w    *writer.Live
	k    *introspect.Kernel
	prof *profiles.Profile
	seed maphash.Seed
	// hashes holds, for each page, the keyed hash of the bytes its chunk
	// holds; 0: the page is in no chunk.
	hashes   []uint64
	zeroHash uint64
	// seen is each page's hash as the round before read it (0: unused),
	// and run how many rounds running it changed: a page that changed in
	// two rounds running is hot.
	seen    []uint64
	run     []uint8
	groups  []liveGroup
	predict bool
	report  LiveReport
	workers int
	// With a parent (save --live --parent), parent gives the hashes of
	// the pages the parent restores; keyed[p] is the keyed hash of page
	// p when it was last compared with the parent's (0: never) and
	// same[p] the answer. sums[p], in every live save, is the page hash
	// (pagehash) of a page's copy in a chunk: the file keeps them.
	parent     *pagehash.Index
	parentFill pagehash.Sum
	keyed      []uint64
	same       []bool
	sums       []pagehash.Sum
}

// zeroMark is the hash of a used page read as zero: it is in no chunk.
// parentMark is that of a page whose content is what the parent restores
// there: in no chunk either. Page hashes are odd (liveSave.pageHash).
const (
	zeroMark   = 2
	parentMark = 4
)

// stored reports whether a page hash is of a page in a chunk.
func stored(h uint64) bool { return h != 0 && h != zeroMark && h != parentMark }

// sameAsParent reports whether page p, whose content b has the keyed hash
// h, holds what the parent restores there: as last time if its keyed hash
// is the one it had when last compared, else by its page hash. b must not
// change under the call (a copy, or the paused guest's memory).
func (ls *liveSave) sameAsParent(p, h uint64, b []byte) bool {
	if ls.keyed[p] == h {
		return ls.same[p]
	}
	want, ok := ls.parent.Get(p)
	if !ok {
		want = ls.parentFill
	}
	ls.keyed[p], ls.same[p] = h, pagehash.Of(b) == want
	return ls.same[p]
}

// inUse returns the pages in use at the end of a live save with a parent
// and the hash of each: of its copy in a chunk, or the parent's.
func (ls *liveSave) inUse() *pagehash.Table {
	pages := pagemap.NewBitmap(uint64(len(ls.hashes)))
	for p, h := range ls.hashes {
		if stored(h) || h == parentMark {
			pages.Set(uint64(p))
		}
	}
	t := pagehash.New(pages)
	k := 0
	for p := range pages.All() {
		if ls.hashes[p] == parentMark {
			want, ok := ls.parent.Get(p)
			if !ok {
				want = ls.parentFill
			}
			t.Sums[k] = want
		} else {
			t.Sums[k] = ls.sums[p]
		}
		k++
	}
	return t
}

// holeBatch is the groups a round's worker takes at a time, and finds
// the RAM files' holes of: 4 MiB, a whole number of bitmap words, so
// that workers set the bits of distinct words.
const holeBatch = 16

// markHoles sets in hole the pages of [first, last) (pages of the RAM
// files one after the other, spans) that lie in a hole of their file.
func markHoles(hole *pagemap.Bitmap, finders []*pagemap.HoleFinder, spans []pageSpan, first, last uint64) error {
	for i, sp := range spans {
		from, to := max(first, sp.first), min(last, sp.first+sp.n)
		if from >= to {
			continue
		}
		hs, err := finders[i].Holes(from-sp.first, to-from)
		if err != nil {
			return err
		}
		for _, h := range hs {
			hole.SetRange(sp.first+h.Start, h.Count)
		}
	}
	return nil
}

// newLiveSave starts the rounds' state for the pages of g, written to w.
func newLiveSave(g *guest, w *writer.Live, k *introspect.Kernel, prof *profiles.Profile, predict bool) *liveSave {
	_, total := g.pageSpans()
	ls := &liveSave{
		g: g, w: w, k: k, prof: prof, seed: maphash.MakeSeed(),
		hashes:  make([]uint64, total),
		seen:    make([]uint64, total),
		run:     make([]uint8, total),
		groups:  make([]liveGroup, (total+liveGroupPages-1)/liveGroupPages),
		predict: predict,
		workers: max(1, runtime.GOMAXPROCS(0)),
	}
	ls.zeroHash = ls.pageHash(make([]byte, introspect.PageSize))
	ls.report.Predict = predict
	ls.sums = make([]pagehash.Sum, total)
	if p := g.parent; p != nil {
		ls.parent = p.sums.Index()
		ls.parentFill = pagehash.Filled(introspect.PageSize, 0)
		ls.keyed = make([]uint64, total)
		ls.same = make([]bool, total)
	}
	return ls
}

// pageHash is the keyed hash of a page's content, never 0.
func (ls *liveSave) pageHash(b []byte) uint64 { return maphash.Bytes(ls.seed, b) | 1 }

// precopy runs the pre-copy rounds on the running guest. It returns the
// live save, whose writer the caller must Abort on failure.
func (g *guest) precopy(ctx context.Context, opt SaveOptions) (_ *liveSave, err error) {
	t0 := time.Now()
	if opt.Key != nil {
		return nil, fmt.Errorf("%w: a live checkpoint cannot be encrypted yet; save without --live, or without --encrypt-key", ErrLive)
	}
	if err := g.mapRAM(ctx, false); err != nil {
		return nil, err
	}
	for i, b := range g.blocks {
		// The rounds read the RAM while the guest runs, through a
		// mapping, and find its holes in the file.
		if b.Mapped() == nil || b.File() == nil || b.FileOffset() != 0 {
			return nil, fmt.Errorf("%w: backend %q is %s, which a live save cannot read while the guest runs; save without --live, "+
				"or give QEMU its RAM in a shared memfd or file (memory-backend-memfd, or memory-backend-file with share=on)",
				ErrLive, g.backends[i].ID, b)
		}
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
	g.notePGD(k, regs.LA57())
	h, err := g.header(ctx, prof.Banner, prof.Name)
	if err != nil {
		return nil, err
	}
	if p := g.parent; p != nil {
		ph := p.chain.Header()
		if err := sameRegions(&h, &ph); err != nil {
			return nil, fmt.Errorf("%w: parent %s is of another guest: %w", ErrInvalid, p.path, err)
		}
		if ph.FillByte != 0 {
			return nil, fmt.Errorf("%w: parent %s was saved from a guest that poisons free pages; save it without --live", ErrLive, p.path)
		}
		h.Parent = p.ref
	}
	if fp, err := k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout}); err == nil && fp.FillByte != 0 {
		// Holes would then have to be saved as zeros, and are not read.
		return nil, fmt.Errorf("%w: the guest poisons free pages (page_poison=1); save it without --live", ErrLive)
	}
	maxPause := opt.MaxPause
	if maxPause <= 0 {
		maxPause = DefaultMaxPause
	}
	w, err := writer.CreateLive(opt.Output, h, writer.Options{Compression: opt.Compression, ChunkPages: liveGroupPages, PageHashes: true})
	if err != nil {
		return nil, err
	}
	g.afterResume = append(g.afterResume, w.ReleaseReplaced)
	_, total := g.pageSpans()
	ls := newLiveSave(g, w, k, prof, !opt.NoPredict)
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
		kind := roundCopy
		if round == 1 {
			kind = roundSurvey
		}
		rs := time.Now()
		st, err := ls.round(ctx, free, kind)
		if err != nil {
			w.Abort()
			return nil, err
		}
		if err = w.Sync(); err != nil {
			return nil, err
		}
		took := time.Since(rs)
		ls.report.Rounds = round
		ls.report.BytesPerRound = append(ls.report.BytesPerRound, st.bytes)
		ls.report.PagesPerRound = append(ls.report.PagesPerRound, st.pages)
		ls.report.PagesDeferredHot += st.deferredPages
		g.log.Debug("pre-copy round", "round", round, "pages", st.pages, "bytes", st.bytes, "changed_pages", st.changedPages,
			"deferred_pages", st.deferredPages, "read_pages", st.readPages, "ms", took.Milliseconds(),
			"read_ms", st.readTime.Milliseconds(), "write_ms", st.writeTime.Milliseconds())
		if kind == roundSurvey {
			continue
		}
		// What the final round would have to do: read every used page
		// and write what changed since its copy (hot groups included),
		// as this round did, the workers in parallel, at this round's
		// rate; a round that wrote little is assumed to write at the
		// page cache's speed.
		readTime := st.readTime / time.Duration(ls.workers)
		writeRate := 1e9 // bytes/s, one worker
		if st.bytes > 4<<20 && st.writeTime > 0 {
			writeRate = float64(st.bytes) / st.writeTime.Seconds()
		}
		writeTime := time.Duration(float64(st.changedPages*introspect.PageSize) / writeRate / float64(ls.workers) * float64(time.Second))
		switch {
		case readTime+writeTime <= maxPause:
			ls.report.StopReason = "converged"
		case writeTime <= max(maxPause-readTime, maxPause/5):
			// Reading the used pages alone takes longer than the
			// target: more rounds would not shorten the pause.
			ls.report.StopReason = "read bound"
		case round > 3 && st.changedPages >= prevDirty*19/20:
			ls.report.StopReason = "not converging"
		case round >= maxLiveRounds:
			ls.report.StopReason = "max rounds"
		}
		if testHookSkipFinalRound && round == 2 {
			// A checkpoint of the first copy alone, made while the
			// guest wrote: certainly torn.
			ls.report.StopReason = "test"
		}
		if ls.report.StopReason != "" {
			break
		}
		prevDirty = st.changedPages
	}
	ls.report.RoundsMS = time.Since(t0).Milliseconds()
	return ls, nil
}

// testHookSkipFinalRound ends the rounds after the first copy and makes
// the final round write nothing, so that a test can show a torn
// checkpoint fails the guest's proof of atomicity.
var testHookSkipFinalRound bool

// DefaultMaxPause is the pause a live save aims for unless told otherwise.
const DefaultMaxPause = 100 * time.Millisecond

// ErrLive means a live save cannot be made of this guest; a stop-and-copy
// save may still be.
var ErrLive = errors.New("live save not possible")

// roundKind says what a round does.
type roundKind int

const (
	// roundSurvey reads and hashes the used pages and writes nothing:
	// pages that change between it and the next round are the guest's
	// working set, whose groups the next round stores raw (see store).
	roundSurvey roundKind = iota
	// roundCopy writes what changed since its copy, but defers hot
	// groups (with prediction on).
	roundCopy
	// roundFinal, on the paused guest, writes everything that changed.
	roundFinal
)

// roundStats are what one round did.
type roundStats struct {
	pages, readPages uint64 // pages written; pages read and hashed
	changedPages     uint64 // pages that differed from their chunk's copy
	deferredPages    uint64
	bytes            int64
	zeroPages        uint64
	// readTime is the workers' time reading and hashing, writeTime
	// their time storing, each summed over the workers.
	readTime, writeTime time.Duration
}

// groupWork is a group a worker found changed, to store:
// the group's used pages now, their contents, their hashes, and which of
// them (indexes in pages) differ from the chunk's copy.
type groupWork struct {
	idx     uint64
	pages   []uint64
	data    []byte
	cur     []uint64 // the hash of each page of the group, as stored now
	changed []int
	// sparse: data holds only the changed pages, for a patch.
	sparse bool
	raw    bool
}

// round reads every group's used pages (used: not in free, not a hole,
// not zero: a live save is refused for a guest that poisons free pages)
// and hashes each; a group with a page whose hash differs from its
// chunk's copy (or that is newly used, or freed) is written. In a
// pre-copy round, a group with a page that changed in the round before
// too is deferred instead, when prediction is on; the final round
// writes every changed group.
//
// A page's stored hash is always of the bytes written: a round copies the
// page, then hashes the copy (the guest may write between the two reads).
// A group written a second time is stored raw, so that later rounds
// rewrite only its changed pages in place ([writer.Live.Patch]) instead
// of the whole chunk.
func (ls *liveSave) round(ctx context.Context, free *pagemap.Bitmap, kind roundKind) (roundStats, error) {
	g := ls.g
	spans, total := g.pageSpans()
	// Holes of the RAM files are never read (a read would allocate them):
	// each worker finds those of the batch of groups it takes (mincore
	// first, lseek for what is not in memory; see pagemap.HoleFinder).
	hole := pagemap.NewBitmap(total)
	finders := make([]*pagemap.HoleFinder, len(g.backends))
	for i := range g.backends {
		finders[i] = pagemap.NewHoleFinder(g.files[i], g.ram[i])
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
		st       roundStats
		mu       sync.Mutex
		storeErr error
	)
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
				st.readTime += local.readTime
				st.writeTime += local.writeTime
				mu.Unlock()
			}()
			// A RAM file that shrinks under the mapping (QEMU gone, its
			// file truncated) faults on read: an error, not a crash.
			defer func() {
				if r := recover(); r != nil {
					f, ok := r.(interface{ Addr() uintptr })
					if !ok {
						panic(r)
					}
					mu.Lock()
					if storeErr == nil {
						storeErr = fmt.Errorf("live save: reading guest RAM faulted at %#x: its RAM file shrank (has QEMU exited?)", f.Addr())
						ctxErr = storeErr
					}
					mu.Unlock()
				}
			}()
			defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
			var cur [liveGroupPages]uint64
			// Each worker stores the groups it finds changed: the
			// writer takes distinct keys in parallel.
			buf := make([]byte, 0, liveGroupPages*introspect.PageSize)
			// A page compared with the parent's while the guest runs
			// is copied first, so that both its hashes are of the same
			// bytes.
			var pbuf []byte
			if ls.parent != nil && kind != roundFinal {
				pbuf = make([]byte, introspect.PageSize)
			}
			look := func(gi uint64) {
				first, last := gi*liveGroupPages, min((gi+1)*liveGroupPages, total)
				n := int(last - first)
				changed, hot, recent := 0, 0, false
				t := time.Now()
				for i := range n {
					p := first + uint64(i)
					cur[i] = 0
					if !free.Test(p) && !hole.Test(p) {
						b := page(p)
						if pbuf != nil {
							copy(pbuf, b)
							b = pbuf
						}
						local.readPages++
						switch h := ls.pageHash(b); {
						case h == ls.zeroHash && isZeroPage(b):
							cur[i] = zeroMark
							local.zeroPages++
						case ls.parent != nil && ls.sameAsParent(p, h, b):
							cur[i] = parentMark
						default:
							cur[i] = h
						}
					}
					switch {
					case kind == roundSurvey:
					case cur[i] != ls.seen[p]:
						ls.run[p] = min(ls.run[p]+1, 255)
					default:
						ls.run[p] = 0
					}
					ls.seen[p] = cur[i]
					recent = recent || ls.run[p] > 0
					switch {
					case cur[i] == ls.hashes[p]:
					case stored(cur[i]) || stored(ls.hashes[p]):
						changed++
						if ls.run[p] >= 2 {
							hot++
						}
					default:
						// Unused and zero: in no chunk either way.
						ls.hashes[p] = cur[i]
					}
				}
				local.readTime += time.Since(t)
				grp := &ls.groups[gi]
				if changed == 0 || kind == roundSurvey {
					return
				}
				local.changedPages += uint64(changed)
				if kind == roundCopy && ls.predict && (hot > 0 || grp.writes == 0 && recent) {
					// Hot: a page that changed since its copy changed
					// in the round before too (or, for a group not yet
					// copied, changed since the round before), and is
					// likely to change again. The copy waits until the
					// group rests, or for the final round.
					local.deferredPages += uint64(changed)
					return
				}
				// Raw, to be patched page by page later: a group
				// written before, or with pages that changed since the
				// round before.
				wk := groupWork{idx: gi, data: buf[:0], raw: grp.writes > 0 || recent, cur: make([]uint64, n)}
				copy(wk.cur, cur[:n])
				// A raw chunk of the same pages is patched: only the
				// changed pages are copied (Patch reads no other).
				sparse := grp.raw
				for i := range n {
					sparse = sparse && stored(cur[i]) == stored(ls.hashes[first+uint64(i)])
				}
				wk.sparse = sparse
				for i := range n {
					if !stored(cur[i]) {
						continue
					}
					p := first + uint64(i)
					off := len(wk.data)
					if sparse && cur[i] == ls.hashes[p] {
						wk.data = wk.data[:off+introspect.PageSize]
						wk.pages = append(wk.pages, p)
						continue
					}
					wk.data = append(wk.data, page(p)...)
					h := cur[i]
					if kind != roundFinal {
						// The guest runs: the hash must be of the
						// bytes copied.
						h = ls.pageHash(wk.data[off:])
					}
					ls.sums[p] = pagehash.Of(wk.data[off:])
					if h != ls.hashes[p] {
						wk.changed = append(wk.changed, len(wk.pages))
					}
					wk.pages = append(wk.pages, p)
					wk.cur[i] = h
				}
				t = time.Now()
				err := ls.store(wk, &st, &mu)
				buf = wk.data
				mu.Lock()
				local.writeTime += time.Since(t)
				if err != nil && storeErr == nil {
					storeErr, ctxErr = err, err
				}
				mu.Unlock()
			}
			for {
				mu.Lock()
				at := next
				next += holeBatch
				if ctxErr == nil && ctx.Err() != nil {
					ctxErr = ctx.Err()
				}
				stop := ctxErr != nil
				mu.Unlock()
				if at >= ngroups || stop {
					return
				}
				end := min(at+holeBatch, ngroups)
				if err := markHoles(hole, finders, spans, at*liveGroupPages, min(end*liveGroupPages, total)); err != nil {
					mu.Lock()
					if storeErr == nil {
						storeErr, ctxErr = err, err
					}
					mu.Unlock()
					return
				}
				for gi := at; gi < end; gi++ {
					look(gi)
				}
			}
		}()
	}
	wg.Wait()
	if storeErr != nil {
		return st, storeErr
	}
	if ctxErr != nil {
		return st, fmt.Errorf("live save interrupted: %w", ctxErr)
	}
	return st, nil
}

// store writes a changed group: dropped if none of its pages is used any
// more, patched in place where its raw chunk holds the same pages, else
// put whole (raw if it was written before). It then records the hashes of
// what the chunk holds.
func (ls *liveSave) store(wk groupWork, st *roundStats, mu *sync.Mutex) error {
	var written uint64
	var stored int64
	switch {
	case len(wk.pages) == 0:
		if err := ls.w.Drop(wk.idx); err != nil {
			return err
		}
	default:
		// The pages of data that are not in changed hash as the chunk's
		// copies do: they are those bytes, and a patch may leave them.
		patched, err := ls.w.Patch(wk.idx, wk.pages, wk.data, wk.changed)
		if err != nil {
			return err
		}
		written, stored = uint64(len(wk.changed)), int64(len(wk.changed))*introspect.PageSize
		raw := true
		switch {
		case !patched && wk.sparse:
			// data holds only the changed pages.
			return fmt.Errorf("live save: group %d was copied for a patch of a chunk that cannot be patched", wk.idx)
		case !patched:
			put := ls.w.Put
			if wk.raw {
				put = ls.w.PutRaw
			}
			if err := put(wk.idx, wk.pages, wk.data); err != nil {
				return err
			}
			written, stored = uint64(len(wk.pages)), ls.w.ChunkBytes(wk.idx)
			raw = wk.raw
		}
		ls.groups[wk.idx].raw = raw
	}
	if len(wk.pages) == 0 {
		ls.groups[wk.idx].raw = false
	}
	copy(ls.hashes[wk.idx*liveGroupPages:], wk.cur)
	ls.groups[wk.idx].writes++
	mu.Lock()
	st.bytes += stored
	st.pages += written
	mu.Unlock()
	return nil
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
func (g *guest) finishLive(ctx context.Context, ls *liveSave, opt SaveOptions, caps map[string]bool) (_ *SaveResult, err error) {
	t0 := time.Now()
	_, total := g.pageSpans()
	var warnings []string
	free := pagemap.NewBitmap(total)
	var fp *introspect.FreePages
	fp, err = ls.k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout})
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
	// The disk writes the final round's chunks while it reads on.
	ls.w.WriteBehind()
	if !testHookSkipFinalRound {
		if st, err = ls.round(ctx, free, roundFinal); err != nil {
			return nil, err
		}
	}
	tPages := time.Since(t0) - tScan
	g.log.Debug("final round", "pages", st.pages, "bytes", st.bytes, "changed_pages", st.changedPages, "read_pages", st.readPages,
		"ms", tPages.Milliseconds(), "read_ms", st.readTime.Milliseconds(), "write_ms", st.writeTime.Milliseconds())
	ls.report.FinalDirtyPages = st.pages
	ls.report.BytesPerRound = append(ls.report.BytesPerRound, st.bytes)
	ls.report.PagesPerRound = append(ls.report.PagesPerRound, st.pages)
	var parentRep *ParentReport
	th := time.Now()
	inUse := ls.inUse()
	if err := ls.w.SetInUse(inUse); err != nil {
		return nil, err
	}
	if p := g.parent; p != nil {
		t := inUse
		parentRep = &ParentReport{
			Path: p.path, ID: p.ref.ID, Depth: p.ref.Depth, Links: len(p.chain.Links),
			PagesInUse: t.Pages.Count(), ParentMS: p.took.Milliseconds(), HashMS: time.Since(th).Milliseconds(),
		}
	}
	t2 := time.Now()
	var devBytes int64
	if devBytes, err = g.saveDevice(ctx, ls.w.WriteDeviceState, caps); err != nil {
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
		RAMInDeviceState: g.ramSent,
		Live:             &ls.report,
		Parent:           parentRep,
	}
	if parentRep != nil {
		parentRep.PagesChanged = ws.PagesWritten
	}
	if fp != nil {
		res.PagesFreeBuddy, res.PagesFreePCP = fp.Buddy, fp.PCP
	}
	return res, nil
}

// header is the checkpoint header of the guest, without page counts.
func (g *guest) header(ctx context.Context, banner, profile string) (writer.Header, error) {
	// The device state is always saved with x-ignore-shared on (and
	// filtered of any RAM QEMU sends anyway): loaded with it on.
	h := writer.Header{KernelBanner: banner, Profile: profile, DeviceStateForm: writer.DeviceStateIgnoreShared}
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
	h.KernelPGD, h.LA57, h.CPUs = g.kernelPGD, g.la57, g.cpus
	h.BalloonTarget = g.balloonPrior
	if t := g.target; t.Domain != "" {
		xml, err := qmp.LibvirtDomainXML(ctx, t.Connect, t.Domain)
		if err != nil {
			return h, err
		}
		h.LibvirtDomain, h.LibvirtXML = t.Domain, string(xml)
	}
	return h, nil
}

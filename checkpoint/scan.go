package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/profiles"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// ScanOptions say which guest to scan and how.
type ScanOptions struct {
	// QMP is the path of the guest's QMP socket ("unix:" prefix allowed);
	// or Domain names a libvirt domain, on the connection Connect ("" for
	// libvirt's default).
	QMP     string
	Domain  string
	Connect string
	// Profile is "auto" (or empty): a stored profile whose banner matches
	// the guest's, else one built from guest memory and stored; or the
	// path of a profile file.
	Profile string
	// ProfileDir is where profiles are stored; empty means the default.
	ProfileDir string
	// Map, if set, is a PNG file to draw guest memory into.
	Map string
	// WalkTimeout bounds the free-list walk; zero means 10 s.
	WalkTimeout time.Duration
	// RequireIntrospection refuses a guest whose kernel kvmckpt cannot
	// read (no Linux kernel found, a profile that does not fit, lists
	// that do not add up in every zone), with an error wrapping
	// [ErrNoIntrospection], instead of saving every non-zero page.
	RequireIntrospection bool
	Log                  *slog.Logger

	// needTasks passes over stored profiles built before kvmckpt read
	// tasks: `ps` rebuilds them from guest memory; needCounters those
	// built before it read the memory counters (save --squeeze).
	needTasks, needCounters bool
}

func (o ScanOptions) target() Target {
	return Target{QMP: o.QMP, Domain: o.Domain, Connect: o.Connect}
}

// ErrNoIntrospection means kvmckpt could not read the guest kernel's
// memory management and the caller asked for no full save instead.
var ErrNoIntrospection = errors.New("guest kernel could not be introspected")

// ScanStats are a scan's counts, in 4 KiB pages.
type ScanStats struct {
	PagesTotal uint64 `json:"pages_total"`
	// PagesUsed are the pages that must be saved: neither free in the
	// guest nor zero nor holes on the host.
	PagesUsed uint64 `json:"pages_used"`
	PagesFree uint64 `json:"pages_free"`
	FreeBuddy uint64 `json:"pages_free_buddy"`
	FreePCP   uint64 `json:"pages_free_pcp"`
	// PagesOffline are pages the guest gave to its balloon (PageOffline):
	// neither saved nor read, like free pages, and not counted in
	// PagesFree. BalloonPages is what the balloon holds as QEMU reports
	// it (query-balloon), 0 without a balloon.
	PagesOffline uint64 `json:"pages_offline"`
	BalloonPages uint64 `json:"balloon_pages"`
	PagesZero    uint64 `json:"pages_zero"`
	PagesHole    uint64 `json:"pages_hole"`
	RAMBytes     uint64 `json:"ram_bytes"`
	Banner       string `json:"kernel_banner"`
	Profile      string `json:"profile"`
	// FullSave is true when the guest kernel could not be introspected:
	// no page is called free, every non-zero page is saved, and
	// Warnings say why.
	FullSave   bool  `json:"full_save"`
	FillByte   byte  `json:"fill_byte"`
	WalkMS     int64 `json:"walk_ms"`
	PauseMS    int64 `json:"pause_ms"`
	DurationMS int64 `json:"duration_ms"`

	Zones    []introspect.ZoneReport `json:"zones"`
	Warnings []string                `json:"warnings,omitempty"`
}

// scanResult is a scan with its bitmaps over RAM file pages (all backends
// in order).
type scanResult struct {
	ScanStats
	// save has a bit for every page to be written; free for every page the
	// guest holds free.
	save, free *pagemap.Bitmap
	// zero and hole have a bit for every page that would be saved but
	// reads as zero, or is a hole in the RAM file.
	zero, hole *pagemap.Bitmap
	// frames is the walk's result by guest page frame.
	frames *introspect.FreePages
}

// Scan pauses the guest, finds the pages in use, and puts the guest back
// in its prior run state.
func Scan(ctx context.Context, opt ScanOptions) (*ScanStats, error) {
	start := time.Now()
	log := logger(opt.Log)
	g, err := openGuest(ctx, opt.target(), log)
	if err != nil {
		return nil, err
	}
	defer g.close()
	// A scan only reads guest RAM: any state with a guest in it will do,
	// postmigrate (after a save) included.
	if g.prior.State == "inmigrate" {
		return nil, fmt.Errorf("%w: %w", ErrGuestState, g.prior.CheckSaveable())
	}
	restore, err := g.pause(ctx)
	if err != nil {
		return nil, err
	}
	paused := time.Now()
	res, scanErr := g.scan(ctx, opt)
	// The guest goes back to its run state whatever happened, even when ctx
	// was cancelled by a signal.
	sctx, cancel := settleContext(ctx)
	rerr := restore(sctx)
	cancel()
	if scanErr != nil {
		if rerr != nil {
			return nil, fmt.Errorf("%w (and: %v)", scanErr, rerr)
		}
		return nil, scanErr
	}
	if rerr != nil {
		return nil, rerr
	}
	res.PauseMS = time.Since(paused).Milliseconds()
	res.DurationMS = time.Since(start).Milliseconds()
	return &res.ScanStats, nil
}

// scan builds the bitmaps of a paused guest.
func (g *guest) scan(ctx context.Context, opt ScanOptions) (*scanResult, error) {
	t0 := time.Now()
	if err := g.mapRAM(ctx, false); err != nil {
		return nil, err
	}
	g.log.Debug("mapped guest RAM", "ms", time.Since(t0).Milliseconds())
	regs, err := g.sess.CPURegisters(ctx, 0)
	if err != nil {
		return nil, err
	}
	res := &scanResult{ScanStats: ScanStats{PagesTotal: g.pages()}}
	res.RAMBytes = res.PagesTotal * introspect.PageSize
	fp, prof, err := g.introspect(ctx, opt, regs)
	switch {
	case err == nil:
		for _, w := range fp.Warnings {
			g.log.Debug(w) // returned in Warnings: the caller reports them
		}
		res.FreeBuddy, res.FreePCP = fp.Buddy, fp.PCP
		res.Banner, res.Profile = prof.Banner, prof.Name
		res.FillByte = fp.FillByte
		res.WalkMS = fp.Duration.Milliseconds()
		res.Zones, res.Warnings = fp.Zones, fp.Warnings
		res.frames = fp
		res.free = g.fileFree(fp.Free)
		if g.offline != nil {
			off := g.fileFree(g.offline)
			off.AndNot(res.free)
			res.PagesOffline = off.Count()
			res.free.Or(off)
		}
		res.BalloonPages = g.balloonPages
	case ctx.Err() != nil:
		return nil, err
	case opt.RequireIntrospection:
		return nil, fmt.Errorf("%w: %w (without --require-introspection kvmckpt would save every non-zero page)", ErrNoIntrospection, err)
	case opt.Profile != "" && opt.Profile != "auto":
		// A profile the operator chose that does not fit is their
		// mistake to hear about, not a reason to save everything.
		return nil, err
	default:
		// Nothing is called free without proof: a full save, as QEMU's
		// own would be, less the zero pages and holes.
		w := fmt.Sprintf("the guest kernel could not be introspected (%v); saving every non-zero page", err)
		g.log.Debug(w)
		res.FullSave = true
		res.Warnings = []string{w}
		res.free = pagemap.NewBitmap(res.PagesTotal)
	}
	res.PagesFree = res.free.Count() - res.PagesOffline
	res.save = pagemap.NewBitmap(res.PagesTotal)
	res.save.SetRange(0, res.PagesTotal)
	res.save.AndNot(res.free)
	g.log.Debug("free lists walked", "ms", time.Since(t0).Milliseconds(), "walk_ms", res.WalkMS)
	g.excludeHost(res)
	g.log.Debug("holes and zero pages found", "ms", time.Since(t0).Milliseconds())
	res.PagesUsed = res.save.Count()
	if opt.Map != "" {
		err := drawMap(opt.Map, res.save, res.free, func(p uint64) (bool, bool) { return res.zero.Test(p), res.hole.Test(p) })
		if err != nil {
			return nil, err
		}
	}
	return res, nil
}

// introspect finds the guest kernel, its profile, and its free pages.
// Every error it returns means the guest's memory management could not be
// read with proof (or ctx ended).
func (g *guest) introspect(ctx context.Context, opt ScanOptions, regs qmp.Registers) (*introspect.FreePages, *profiles.Profile, error) {
	t0 := time.Now()
	prof, err := g.profile(ctx, opt, regs)
	if err != nil {
		return nil, nil, err
	}
	g.log.Debug("profile ready", "profile", prof.Name, "ms", time.Since(t0).Milliseconds())
	k, err := introspect.OpenKernel(g.mem, regs.CR3, regs.LA57(), prof)
	if err != nil {
		return nil, nil, err
	}
	g.notePGD(k, regs.LA57())
	g.noteCPUs(ctx)
	fp, err := k.WalkFree(ctx, introspect.WalkOptions{Timeout: opt.WalkTimeout})
	if err != nil {
		return nil, nil, err
	}
	if err := g.findOffline(ctx, k, fp); err != nil {
		return nil, nil, err
	}
	return fp, prof, nil
}

// findOffline finds the pages the guest gave to its balloon, when it has
// one holding pages: the memory map scan costs the pause a few ms a GiB
// (6 ms for 1 GiB here), which a guest without ballooned pages is spared. A scan that
// cannot be done is a warning: those pages are then saved (QEMU has
// usually discarded them: holes, which cost nothing).
func (g *guest) findOffline(ctx context.Context, k *introspect.Kernel, fp *introspect.FreePages) error {
	g.offline, g.balloonPages = nil, 0
	actual, err := g.sess.BalloonActual(ctx)
	switch {
	case errors.Is(err, qmp.ErrNoBalloon):
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		// Not a reason to fail the save: whatever the balloon holds is
		// then saved (QEMU has usually discarded it: holes).
		fp.Warnings = append(fp.Warnings, fmt.Sprintf("the balloon's size could not be read (%v); its pages, if any, are saved", err))
		return nil
	}
	var ram uint64
	for _, b := range g.backends {
		ram += b.Size
	}
	if actual >= ram {
		return nil
	}
	g.balloonPages = (ram - actual) / introspect.PageSize
	off, n, err := k.OfflinePages(ctx, fp)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		fp.Warnings = append(fp.Warnings, fmt.Sprintf("the balloon's pages could not be told (%v); they are saved", err))
		return nil
	}
	g.log.Debug("offline pages", "pages", n, "balloon_pages", g.balloonPages)
	g.offline = off
	return nil
}

// notePGD keeps where the kernel's page tables are, for the checkpoint's
// header.
func (g *guest) notePGD(k *introspect.Kernel, la57 bool) {
	if pgd, err := k.PGD(); err == nil {
		g.kernelPGD, g.la57 = uint64(pgd), la57
	}
}

// noteCPUs keeps the vCPUs' registers, for the checkpoint's header: a
// core of the checkpoint takes a running thread's registers from them. A
// failure leaves them out (the core then says it cannot have them).
func (g *guest) noteCPUs(ctx context.Context) {
	regs, err := g.cpuRegisters(ctx)
	if err != nil {
		g.log.Debug("vCPU registers not kept", "err", err)
		return
	}
	g.cpus = g.cpus[:0]
	for _, r := range regs {
		if !r.HasGPR {
			g.log.Debug("vCPU registers not kept: QEMU printed no general-purpose registers", "cpu", r.CPU)
			g.cpus = nil
			return
		}
		g.cpus = append(g.cpus, cpuState(r))
	}
}

// cpuRegisters reads every vCPU's registers.
func (g *guest) cpuRegisters(ctx context.Context) ([]qmp.Registers, error) {
	idx, err := g.sess.CPUIndexes(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]qmp.Registers, 0, len(idx))
	for _, i := range idx {
		r, err := g.sess.CPURegisters(ctx, i)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// cpuState is the header's record of a vCPU's registers.
func cpuState(r qmp.Registers) writer.CPU {
	c := writer.CPU{Index: r.CPU, CPL: r.CPL, GPR: r.GPR, RIP: r.RIP, RFLAGS: r.RFLAGS, CR3: r.CR3,
		FSBase: r.Seg[qmp.SegFS].Base, GSBase: r.Seg[qmp.SegGS].Base}
	for i, s := range r.Seg {
		c.Selectors[i] = s.Selector
	}
	return c
}

// fileFree turns a bitmap of free guest frames into one of free RAM file
// pages. A file page that no guest-physical range maps (under a ROM, say)
// stays used: the guest kernel does not manage it.
func (g *guest) fileFree(frames *pagemap.Bitmap) *pagemap.Bitmap {
	spans, total := g.pageSpans()
	free := pagemap.NewBitmap(total)
	for _, m := range g.mem.Mappings() {
		first := uint64(m.GPA) / introspect.PageSize
		n := m.Size / introspect.PageSize
		off := spans[m.Backend].first + m.Offset/introspect.PageSize
		for pfn := first; pfn < first+n && pfn < frames.Len(); {
			s, ok := frames.NextSet(pfn)
			if !ok || s >= first+n {
				break
			}
			e, ok := frames.NextClear(s)
			if !ok || e > first+n {
				e = first + n
			}
			free.SetRange(off+(s-first), e-s)
			pfn = e
		}
	}
	return free
}

// excludeHost takes holes and all-zero pages out of the pages to save.
// Holes are found first, so the zero scan never reads (and so never makes
// the host allocate) a hole. With a fill byte other than zero, a restore
// fills every page it does not write with it, so zero pages must then be
// saved like any other.
func (g *guest) excludeHost(res *scanResult) {
	total := res.save.Len()
	res.zero, res.hole = pagemap.NewBitmap(total), pagemap.NewBitmap(total)
	spans, _ := g.pageSpans()
	for i, b := range g.backends {
		base, n := spans[i].first, spans[i].n
		cand := pagemap.NewBitmap(n)
		for s, c := range res.save.Runs() {
			if off, k, ok := spans[i].clip(s, c); ok {
				cand.SetRange(off, k)
			}
		}
		holes, err := g.blocks[i].Zeros()
		if err != nil {
			g.log.Warn("hole detection failed; holes are read as zero pages", "backend", b.ID, "err", err)
		}
		for _, h := range holes {
			c := min(h.Count, n-min(h.Start, n))
			res.hole.SetRange(base+h.Start, c)
			cand.ClearRange(h.Start, c)
		}
		if g.ram[i] == nil {
			// QEMU's own memory: telling zero pages would mean reading
			// every page twice. Those it never touched are holes
			// already; the rest are saved, and compress to nothing.
			continue
		}
		// ZeroPages maps the candidates into our address space as it
		// goes (never holes, which would then be allocated), for the
		// writer too.
		zero, err := pagemap.ZeroPages(g.ram[i], cand, 0)
		if err != nil {
			g.log.Warn("zero page detection failed; all pages are saved", "backend", b.ID, "err", err)
			zero = pagemap.NewBitmap(n)
		}
		for s, c := range zero.Runs() {
			res.zero.SetRange(base+s, c)
		}
	}
	// Only pages that would have been saved count as holes.
	res.hole.And(res.save)
	res.PagesHole = res.hole.Count()
	res.PagesZero = res.zero.Count()
	if res.FillByte == 0 {
		res.save.AndNot(res.hole)
		res.save.AndNot(res.zero)
	}
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

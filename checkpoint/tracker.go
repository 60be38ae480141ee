package checkpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/migstream"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// Trackers of a live save: what finds the pages the guest wrote since
// kvmckpt copied them.
const (
	// TrackerQEMU uses QEMU's own dirty log, read off a migration that
	// QEMU runs into a pipe (qemuTracker): the rounds and the pause read
	// only the groups QEMU names. For guests under KVM only: under TCG
	// QEMU's log was seen to miss writes.
	TrackerQEMU = "qemu"
	// TrackerHash reads every used page each round, and in the pause,
	// and compares keyed hashes: no migration, but the pause reads all
	// used memory. The default.
	TrackerHash = "hash"
)

// trackWindow bounds how far QEMU's first pass may run ahead of the first
// round's copy, in pages: QEMU cannot reach its switchover (and stop the
// guest) while kvmckpt still has the first copy to make.
const trackWindow = 16 << 10

// trackHold is the pages at the end of QEMU's first pass that wait for
// the first round to be done. Each names a page in at least 9 bytes (a
// zero page's record), so they are more than QEMU's buffer (32 KiB,
// IO_BUF_SIZE in migration/qemu-file.c) and the pipe's (64 KiB) hold.
const trackHold = 16 << 10

// trackBacklog bounds, after the first round, the groups QEMU may name
// before kvmckpt reads them: 32 MiB, which the final round writes well
// within the default pause target.
const trackBacklog = 128

// qemuTracker follows a pre-copy migration that QEMU runs into a pipe
// (qmp.Session.StartTrackedMigration). Every page record of the guest's
// RAM backends names a page the guest wrote after QEMU's previous copy of
// it: QEMU's dirty log (KVM's, or TCG's), which works on any host. The
// records are read, their pages dropped (migstream.Filter), and their
// groups marked dirty; what remains of the stream is the device state at
// the switchover, in the form writer.DeviceStateFiltered.
//
// Every page the guest writes after kvmckpt's copy of its group is named
// by a record that arrives after that copy: the dirty log holds the write
// until QEMU sends the page, which it reads after the write. So a round
// clears a group's mark before it reads the group (take), and the final
// round, after the stream's last RAM record, finds every group written
// since its copy marked.
//
// QEMU's first pass names every page. The first round copies the groups
// in the stream's order, each once QEMU's first pass has named it, so
// that those records do not mark groups already copied; and QEMU's first
// pass waits for the copy (the reader stops reading, QEMU's writes
// block), so that QEMU cannot switch over, stopping the guest, before the
// first copy is made.
type qemuTracker struct {
	g       *guest
	pipe    *os.File
	started time.Time
	// firstDone is when the first round (and its sync) ended.
	firstDone time.Time
	prevCaps  map[string]bool // capabilities changed, as they were
	params    qmp.MigrationParameters

	dirty []atomic.Uint64 // bitmap of groups named since taken
	// blockFirst is, for each block of the stream, the checkpoint page
	// of its first page, or -1 for a block that is not a backend.
	blockFirst []int64
	// order is the groups in the stream's order; pos the place, in
	// pages of the backends in that order, of each group's last page.
	order []uint64
	pos   []uint64

	totalPages  uint64        // of the backends
	named       atomic.Uint64 // backend pages named by records so far
	copied      atomic.Uint64 // pages the first round has copied
	outstanding atomic.Int64  // groups marked and not taken
	firstRun    atomic.Bool   // the first round runs: pace QEMU by it
	released    atomic.Bool   // the rounds are over: do not hold QEMU
	settled     bool          // stop has put the settings back
	ramDone     atomic.Bool

	// touched marks, by checkpoint page, the pages the guest may have
	// written: named by a record after QEMU's first pass, or by one that
	// carried data. Read only once the stream has ended.
	touched *pagemap.Bitmap
	// streamPos is each backend block's first page in the stream's
	// order of the backends' pages; lastPos the last record's place;
	// passOne holds until the places go back (QEMU's second pass).
	streamPos []uint64
	lastPos   uint64
	passOne   bool

	dev   bytes.Buffer
	done  chan struct{}
	err   error // set before done closes
	stats migstream.Stats
}

// startQEMUTracker starts the tracked migration. Its capabilities and
// parameters are put back by stop.
func (g *guest) startQEMUTracker(ctx context.Context, maxPause time.Duration) (*qemuTracker, error) {
	params, err := g.sess.GetMigrationParameters(ctx)
	if err != nil {
		return nil, err
	}
	caps, err := g.sess.MigrationCapabilities(ctx)
	if err != nil {
		return nil, err
	}
	_, prev, err := qmp.TrackedMigrationCapabilities(caps)
	if err != nil {
		return nil, err
	}
	// Recorded before anything changes, so that if this kvmckpt is
	// killed the next one cancels the migration and puts the settings
	// back (guest.recoverTracking).
	g.beginTracking(trackUndo{Caps: prev, Params: params})
	_, total := g.pageSpans()
	t := &qemuTracker{
		g: g, params: params, prevCaps: prev, totalPages: total,
		dirty:   make([]atomic.Uint64, (total/liveGroupPages+64)/64),
		done:    make(chan struct{}),
		touched: pagemap.NewBitmap(total),
		passOne: true,
	}
	// QEMU switches over once what is left fits the pause target, at
	// the rate kvmckpt reads (the stream is not rate-limited: the reader
	// paces it).
	t.started = time.Now()
	if err = g.sess.SetMigrationParameters(ctx, qmp.MigrationParameters{
		DowntimeLimit: max(1, maxPause.Milliseconds()/2), MaxBandwidth: 1 << 50,
	}); err == nil {
		t.pipe, _, err = g.sess.StartTrackedMigration(ctx)
	}
	if err != nil {
		t.stop(context.WithoutCancel(ctx))
		return nil, err
	}
	blocks := make(chan error, 1)
	go t.read(blocks)
	select {
	case err = <-blocks:
	case <-t.done:
		err = t.err
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		t.stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("track the guest's writes through a migration: %w", err)
	}
	return t, nil
}

// read reads the stream to its end; blocks gets the outcome of matching
// its RAM blocks to the backends.
func (t *qemuTracker) read(blocks chan<- error) {
	defer close(t.done)
	spans, _ := t.g.pageSpans()
	opt := migstream.Options{
		Drop: func(b migstream.Block) bool {
			for _, be := range t.g.backends {
				if be.ID == b.ID {
					return true
				}
			}
			return false
		},
		Blocks: func(bs []migstream.Block) error {
			err := t.match(bs, spans)
			blocks <- err
			return err
		},
		Page:    t.page,
		RAMDone: func() { t.ramDone.Store(true) },
	}
	t.stats, t.err = migstream.Filter(t.pipe, &t.dev, opt)
	if t.err != nil {
		t.err = fmt.Errorf("read the migration stream: %w", t.err)
		select {
		case blocks <- t.err:
		default:
		}
	}
	t.pipe.Close()
}

// match maps the stream's blocks to the backends, and orders the groups
// as the stream will name them.
func (t *qemuTracker) match(bs []migstream.Block, spans []pageSpan) error {
	t.blockFirst = make([]int64, len(bs))
	t.streamPos = make([]uint64, len(bs))
	found := 0
	var at uint64
	for i, b := range bs {
		t.blockFirst[i] = -1
		for j, be := range t.g.backends {
			if be.ID != b.ID {
				continue
			}
			if be.Size != b.Size {
				return fmt.Errorf("RAM block %q is %d bytes in the stream, the backend %d", b.ID, b.Size, be.Size)
			}
			t.blockFirst[i] = int64(spans[j].first)
			t.streamPos[i] = at
			found++
			for p := spans[j].first; p < spans[j].first+spans[j].n; p += liveGroupPages - p%liveGroupPages {
				last := min(p-p%liveGroupPages+liveGroupPages, spans[j].first+spans[j].n) - 1
				t.order = append(t.order, p/liveGroupPages)
				t.pos = append(t.pos, at+last-spans[j].first)
			}
			at += spans[j].n
		}
	}
	if found != len(t.g.backends) {
		return fmt.Errorf("the stream carries %d of the %d RAM backends", found, len(t.g.backends))
	}
	return nil
}

// page marks the group of a page a record named, and holds QEMU back
// while kvmckpt lags: during the first round while the copy is more than
// trackWindow pages behind, and after it while more than trackBacklog
// groups wait to be read. QEMU then sends at the rate kvmckpt keeps up
// with, and its switchover (when what is left fits its downtime limit)
// leaves kvmckpt little to do in the pause. A record waits at most 100
// ms, so that the rounds, which may wait for records, always move on.
func (t *qemuTracker) page(block int, off uint64, zero bool) {
	first := t.blockFirst[block]
	if first < 0 {
		return
	}
	p := uint64(first) + off/migstream.PageSize
	if pos := t.streamPos[block] + off/migstream.PageSize; pos <= t.lastPos && t.named.Load() > 0 {
		t.passOne = false
	} else {
		t.lastPos = pos
	}
	if !zero || !t.passOne {
		t.touched.Set(p)
	}
	g := p / liveGroupPages
	bit := uint64(1) << (g % 64)
	if t.dirty[g/64].Or(bit)&bit == 0 {
		t.outstanding.Add(1)
	}
	n := t.named.Add(1)
	// QEMU's first pass must not end before the first round has been
	// copied and synced: QEMU could then switch over at once (an idle
	// guest leaves it nothing to send), pausing the guest for the rest.
	// The pass's last trackHold pages wait (at most a minute) until the
	// round is done: so many records fill QEMU's buffer and the pipe's,
	// and QEMU's writes block.
	for i := 0; i < 60000 && t.firstRun.Load() && n+trackHold >= t.totalPages && !t.released.Load(); i++ {
		time.Sleep(time.Millisecond)
	}
	for i := 0; i < 500 && !t.released.Load(); i++ {
		if t.firstRun.Load() {
			if n <= t.copied.Load()+trackWindow {
				return
			}
		} else if t.outstanding.Load() <= trackBacklog {
			return
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// take clears the mark of group g and reports whether it was set.
func (t *qemuTracker) take(g uint64) bool {
	bit := uint64(1) << (g % 64)
	if t.dirty[g/64].And(^bit)&bit == 0 {
		return false
	}
	t.outstanding.Add(-1)
	return true
}

// waitNamed waits, for at most 50 ms, until QEMU's first pass has named
// the pages up to pos; not for the pass's last trackHold pages, which
// QEMU names only after the first round.
func (t *qemuTracker) waitNamed(pos uint64) {
	if pos+trackHold >= t.totalPages {
		return
	}
	for i := 0; t.named.Load() <= pos && i < 250 && !t.ramDone.Load(); i++ {
		time.Sleep(200 * time.Microsecond)
	}
}

// status is the migration's state.
func (t *qemuTracker) status(ctx context.Context) (string, error) {
	st, err := t.g.sess.MigrationStatus(ctx)
	if err != nil {
		return "", err
	}
	if st.Status == "failed" || st.Status == "cancelled" {
		return st.Status, fmt.Errorf("%w: the migration that tracks the guest's writes %s: %s", qmp.ErrMigrationFailed, st.Status, st.ErrorDesc)
	}
	return st.Status, nil
}

// stoppedAt is when QEMU stopped the guest for the switchover, if it did
// so on its own; zero otherwise.
func (t *qemuTracker) stoppedAt() time.Time {
	s := t.g.sess.LastStop()
	if s.Before(t.started) {
		return time.Time{}
	}
	return s
}

// switchover waits for the guest, paused, to be at the switchover; it is
// called once kvmckpt or QEMU stopped the guest.
func (t *qemuTracker) switchover(ctx context.Context) error {
	for {
		st, err := t.status(ctx)
		if err != nil {
			return err
		}
		if st == "pre-switchover" {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.done:
			if t.err != nil {
				return t.err
			}
			return errors.New("the migration stream ended before the switchover")
		case <-time.After(time.Millisecond):
		}
	}
}

// finish lets QEMU send the last pages and the device state, and waits
// for the end of the stream and of the migration. Every group written
// since its copy is then marked.
func (t *qemuTracker) finish(ctx context.Context) error {
	if err := t.g.sess.MigrateContinue(ctx, "pre-switchover"); err != nil {
		return err
	}
	select {
	case <-t.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if t.err != nil {
		return t.err
	}
	if !t.ramDone.Load() {
		return errors.New("the migration stream ended without the end of its RAM")
	}
	for {
		st, err := t.status(ctx)
		if err != nil || st == "completed" {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

// stop ends the tracking: it cancels the migration if it has not
// completed, waits for QEMU to leave it, and puts the capabilities and
// parameters back. It may be called more than once: once the settings
// are back, it does nothing.
func (t *qemuTracker) stop(ctx context.Context) {
	t.released.Store(true)
	if t.settled {
		return // the migration ended and the settings are back
	}
	ctx, cancel := context.WithTimeout(ctx, abortTimeout)
	defer cancel()
	ended := func() bool {
		st, err := t.g.sess.MigrationStatus(ctx)
		switch {
		case err != nil:
			return true // nothing more to learn from QEMU
		case st.Status == "completed", st.Status == "failed", st.Status == "cancelled", st.Status == "none":
			return true
		}
		return false
	}
	if !ended() {
		if err := t.g.sess.MigrateCancel(ctx); err != nil {
			t.g.log.Warn("could not cancel the tracking migration", "err", err)
		}
		for !ended() && ctx.Err() == nil {
			time.Sleep(2 * time.Millisecond)
		}
	}
	if t.pipe != nil {
		t.pipe.Close()
	}
	t.restoreSettings(ctx)
}

func (t *qemuTracker) restoreSettings(ctx context.Context) {
	ok := true
	if len(t.prevCaps) > 0 {
		if err := t.g.sess.SetMigrationCapabilities(ctx, t.prevCaps); err != nil {
			t.g.log.Warn("could not put the migration capabilities back", "err", err)
			ok = false
		}
	}
	if err := t.g.sess.SetMigrationParameters(ctx, t.params); err != nil {
		t.g.log.Warn("could not put the migration parameters back", "err", err)
		ok = false
	}
	if ok {
		t.settled = true
		t.g.endTracking()
	}
}

// trackUndo is what a tracking migration changed, as it was: recorded in
// the guest's pause record while the migration runs.
type trackUndo struct {
	Caps   map[string]bool         `json:"caps"`
	Params qmp.MigrationParameters `json:"params"`
}

// beginTracking records that a tracking migration is about to change the
// guest's migration settings.
func (g *guest) beginTracking(u trackUndo) {
	b, err := json.Marshal(u)
	if err != nil {
		return
	}
	g.undo = string(b)
	switch {
	case g.paused:
		g.writePauseRecord(pauseRecord)
	case g.prior.Running:
		g.writePauseRecord(trackingRecord)
	default:
		g.writePauseRecord(trackingPausedRecord)
	}
}

// endTracking records that the settings are back.
func (g *guest) endTracking() {
	if g.undo == "" {
		return
	}
	g.undo = ""
	if g.paused {
		g.writePauseRecord(pauseRecord)
	} else {
		g.clearPauseRecord()
	}
}

// recoverTracking undoes the tracking migration of a killed kvmckpt, as
// its record says: the migration cancelled (QEMU may be waiting at its
// switchover with the guest paused), the settings put back. The guest's
// run state is then read again.
func (g *guest) recoverTracking(ctx context.Context) error {
	if g.staleUndo == "" {
		return nil
	}
	var u trackUndo
	if err := json.Unmarshal([]byte(g.staleUndo), &u); err != nil {
		g.log.Warn("an earlier kvmckpt's record of its migration settings cannot be read; check them with query-migrate-capabilities", "err", err)
		g.staleUndo = ""
		return nil
	}
	g.log.Warn("an earlier kvmckpt was stopped while a migration tracked this guest's writes; cancelling it and putting the migration settings back")
	t := &qemuTracker{g: g, prevCaps: u.Caps, params: u.Params}
	t.stop(ctx)
	g.staleUndo = ""
	st, err := g.sess.Status(ctx)
	if err != nil {
		return err
	}
	if st.Running {
		// QEMU let it run again on the cancel.
		g.clearPauseRecord()
		g.prior = st
	}
	return nil
}

// needsLook reports whether the final round must read group gi although
// QEMU did not name it: a page of its chunk is free now, or a page used
// now was never read as used.
func (ls *liveSave) needsLook(gi uint64, free, hole interface{ Test(uint64) bool }) bool {
	first, last := gi*liveGroupPages, min((gi+1)*liveGroupPages, uint64(len(ls.hashes)))
	for p := first; p < last; p++ {
		unused := free.Test(p) || hole.Test(p)
		h := ls.hashes[p]
		if unused && stored(h) || !unused && h == 0 {
			return true
		}
	}
	return false
}

// zeroMark is the hash of a used page read as zero: it is in no chunk.
// Page hashes are odd (liveSave.pageHash).
const zeroMark = 2

// stored reports whether a page hash is of a page in a chunk.
func stored(h uint64) bool { return h != 0 && h != zeroMark }

// abortTimeout bounds the clean-up of a tracking migration.
const abortTimeout = 5 * time.Second

// holesToRelease are the pages QEMU's first pass allocated that the
// final round may give back to the host: it read every page of the RAM
// files, holes too, and a read of a hole of a tmpfs or memfd file
// allocates a page. A page that was a hole before the save (holes, from
// the survey round) and that no record named but as zero in QEMU's first
// pass was not written since, so it is still zero, and punching it out of
// the file in the pause changes nothing the guest can see. Call it once
// the stream has ended.
func (t *qemuTracker) holesToRelease(holes *pagemap.Bitmap) *pagemap.Bitmap {
	_, total := t.g.pageSpans()
	plan := pagemap.NewBitmap(total)
	if holes == nil {
		return plan
	}
	for p := range total {
		if holes.Test(p) && !t.touched.Test(p) {
			plan.Set(p)
		}
	}
	return plan
}

// releaseHoles punches the pages of plan out of the RAM files, in pieces
// of releaseStep, until done or until stop closes (the guest is about to
// run again: a piece in progress is finished first). It returns the
// bytes released; a RAM file that cannot be opened for writing keeps its
// pages (and a warning says so).
func (g *guest) releaseHoles(plan *pagemap.Bitmap, stop <-chan struct{}) (released int64) {
	spans, _ := g.pageSpans()
	for i, sp := range spans {
		var f *os.File
		for p := sp.first; p < sp.first+sp.n; {
			if !plan.Test(p) {
				p++
				continue
			}
			start := p
			for p < sp.first+sp.n && p-start < releaseStep && plan.Test(p) {
				p++
			}
			select {
			case <-stop:
				if f != nil {
					f.Close()
				}
				return released
			default:
			}
			if f == nil {
				var err error
				if f, err = os.OpenFile(g.backends[i].MemPath, os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0); err != nil {
					g.log.Warn("the RAM file keeps the pages the tracking migration read into its holes", "file", g.backends[i].MemPath, "err", err)
					break
				}
			}
			off, n := int64(start-sp.first)*int64(introspect.PageSize), int64(p-start)*int64(introspect.PageSize)
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
				g.log.Warn("the RAM file keeps the pages the tracking migration read into its holes", "file", g.backends[i].MemPath, "err", err)
				break
			}
			released += n
		}
		if f != nil {
			f.Close()
		}
	}
	return released
}

// releaseStep is the pages one punch gives back: a few milliseconds'
// work, the most a resume waits for.
const releaseStep = 2048

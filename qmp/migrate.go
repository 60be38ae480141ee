package qmp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// CapIgnoreShared is the migration capability that leaves RAM blocks backed
// by shared memory out of the migration stream (migration/ram.c,
// ramblock_is_ignored). kvmckpt saves that RAM itself.
const CapIgnoreShared = "x-ignore-shared"

// incompatibleCaps are the migration capabilities a device-state save
// refuses, because the stream goes one way through a pipe, must complete on
// its own, and must load into a QEMU on which kvmckpt turns on only
// [CapIgnoreShared].
var incompatibleCaps = map[string]string{
	"multifd":                 "needs several connections",
	"postcopy-ram":            "needs a return path",
	"return-path":             "needs a bidirectional channel",
	"x-colo":                  "is continuous replication",
	"background-snapshot":     "is a different save mechanism",
	"pause-before-switchover": "waits for migrate-continue",
	"block":                   "copies whole disks into the stream",
	"compress":                "needs the same capability to load",
	"xbzrle":                  "needs the same capability to load",
}

// abortTimeout bounds the clean-up after a save or load is abandoned: the
// cancel command and waiting for QEMU to leave the migration.
const abortTimeout = 5 * time.Second

// MigrationCapabilities returns the state of every migration capability
// QEMU knows (query-migrate-capabilities).
func (s *Session) MigrationCapabilities(ctx context.Context) (map[string]bool, error) {
	var caps []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := s.Run(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return nil, fmt.Errorf("query migration capabilities: %w", err)
	}
	m := make(map[string]bool, len(caps))
	for _, c := range caps {
		m[c.Capability] = c.State
	}
	return m, nil
}

// SetMigrationCapabilities sets the given migration capabilities and leaves
// the others alone. Use it to restore [CapIgnoreShared] to what
// [Session.MigrationCapabilities] returned before a save, if something else
// migrates the guest later. QEMU refuses while a migration is running.
func (s *Session) SetMigrationCapabilities(ctx context.Context, caps map[string]bool) error {
	type capState struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	list := make([]capState, 0, len(caps))
	for name, on := range caps {
		list = append(list, capState{name, on})
	}
	slices.SortFunc(list, func(a, b capState) int { return strings.Compare(a.Capability, b.Capability) })
	if err := s.Run(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
		return fmt.Errorf("set migration capabilities: %w", err)
	}
	return nil
}

// MigrationStatus is the state of the current or last migration
// (query-migrate), outgoing or incoming.
type MigrationStatus struct {
	// Status is QEMU's MigrationStatus: "none", "setup", "active",
	// "completed", "failed", "cancelled", ...
	Status string `json:"status"`
	// ErrorDesc is QEMU's reason for a failure, if it gave one.
	ErrorDesc string `json:"error-desc"`
	// TotalTime is the migration's duration in milliseconds, once
	// completed.
	TotalTime int64 `json:"total-time"`
	// Downtime is how long the guest was stopped, in milliseconds, once
	// completed: from the stop to the end of the stream, as QEMU counts.
	Downtime int64 `json:"downtime"`
	// RAM is the RAM part of the migration, once it has begun.
	RAM *MigrationRAM `json:"ram,omitempty"`
}

// MigrationRAM is the RAM part of query-migrate's answer.
type MigrationRAM struct {
	// DirtySyncCount counts the dirty-bitmap syncs: the pre-copy
	// iterations, the first sync included.
	DirtySyncCount int64 `json:"dirty-sync-count"`
	// Transferred is the bytes of RAM sent.
	Transferred int64 `json:"transferred"`
	// Remaining is the bytes of the pages QEMU knows dirty and has not
	// sent yet (as of its last dirty-bitmap sync).
	Remaining int64 `json:"remaining"`
}

// terminal reports whether the migration has ended.
func (m MigrationStatus) terminal() bool {
	switch m.Status {
	case "completed", "failed", "cancelled":
		return true
	}
	return false
}

// MigrationStatus returns the state of the current or last migration.
func (s *Session) MigrationStatus(ctx context.Context) (MigrationStatus, error) {
	var m MigrationStatus
	if err := s.Run(ctx, "query-migrate", nil, &m); err != nil {
		return MigrationStatus{}, fmt.Errorf("query migration: %w", err)
	}
	if m.Status == "" {
		m.Status = "none"
	}
	return m, nil
}

// copyResult is what a pipe-copying goroutine reports when it ends.
type copyResult struct {
	n   int64
	err error
}

// poller paces status polls: quick at first, since a device-state
// migration takes tens of milliseconds, then backing off.
type poller struct{ d time.Duration }

func (p *poller) next() <-chan time.Time {
	switch {
	case p.d == 0:
		p.d = 2 * time.Millisecond
	case p.d < 50*time.Millisecond:
		p.d *= 2
	}
	return time.After(p.d)
}

// SaveDeviceState writes QEMU's device state to w as a migration stream
// (it starts with the magic "QEVM") and returns the number of bytes
// written.
//
// It turns on [CapIgnoreShared] and leaves it on; RAM in shared backends is
// not in the stream, other RAM blocks (firmware, ROMs, video memory) are.
// It refuses, with an error wrapping [ErrCapability], capabilities that
// cannot work over a pipe or that the load would need too. It passes QEMU
// one end of a pipe (getfd), runs migrate to "fd:NAME", copies the other end
// into w, and polls until QEMU reports the migration completed.
//
// Backends without share=on are not left out: check [Backend.Share] first,
// or the stream holds all of their RAM.
//
// Afterwards the guest is in run state "postmigrate" and its block devices
// are handed over; [Session.Cont] resumes it and takes them back. QEMU
// refuses to migrate a guest in "postmigrate" again, so a second save needs
// the guest to have run in between. A save of a running guest works but is
// then a live migration: pause the guest first for a state that matches its
// RAM.
//
// A failed migration gives an error wrapping [ErrMigrationFailed] with
// QEMU's reason. If ctx ends or w fails, the migration is cancelled and
// SaveDeviceState returns once QEMU has given up, the pipe is closed and
// the copying goroutine has ended; w must not block forever. A save that
// fails after QEMU stopped the guest for the final pass leaves a guest that
// was not running in "postmigrate" too (migration_iteration_finish).
func (s *Session) SaveDeviceState(ctx context.Context, w io.Writer) (int64, error) {
	return s.SaveStream(ctx, w, true, false)
}

// SaveStream is [Session.SaveDeviceState] with [CapIgnoreShared] set to
// ignoreShared (off, QEMU sends every RAM block, shared or not) and, if
// unlimited, the stream's rate limit lifted: a stream that carries RAM (a
// guest whose RAM is not all in shared files; the caller filters it, see
// package migstream) would otherwise keep the guest paused as long as its
// RAM takes at max-bandwidth (128 MiB/s by default). The limit is put back
// afterwards.
func (s *Session) SaveStream(ctx context.Context, w io.Writer, ignoreShared, unlimited bool) (n int64, err error) {
	if err := s.prepareSave(ctx, ignoreShared); err != nil {
		return 0, fmt.Errorf("save device state: %w", err)
	}
	if unlimited {
		var p struct {
			MaxBandwidth int64 `json:"max-bandwidth"`
		}
		if err := s.Run(ctx, "query-migrate-parameters", nil, &p); err != nil {
			return 0, fmt.Errorf("save device state: query migration parameters: %w", err)
		}
		if err := s.setMaxBandwidth(ctx, unlimitedBandwidth); err != nil {
			return 0, fmt.Errorf("save device state: %w", err)
		}
		defer func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abortTimeout)
			defer cancel()
			if rerr := s.setMaxBandwidth(rctx, p.MaxBandwidth); rerr != nil && err == nil {
				err = fmt.Errorf("save device state: put the migration bandwidth back to %d bytes/s: %w", p.MaxBandwidth, rerr)
			}
		}()
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("save device state: %w", err)
	}
	name, err := s.sendFD(ctx, "save", pw)
	pw.Close() // QEMU has its own copy; ours would hide the end of stream
	if err != nil {
		pr.Close()
		return 0, fmt.Errorf("save device state: %w", err)
	}
	copied := make(chan copyResult, 1)
	go func() {
		n, err := io.Copy(w, pr)
		copied <- copyResult{n, err}
	}()
	if err := s.Run(ctx, "migrate", map[string]string{"uri": "fd:" + name}, nil); err != nil {
		s.closeFD(name)
		pr.Close()
		<-copied
		return 0, fmt.Errorf("save device state: start migration: %w", err)
	}
	n, err = s.waitSave(ctx, pr, copied)
	if err != nil {
		return n, fmt.Errorf("save device state: %w", err)
	}
	return n, nil
}

// unlimitedBandwidth is the max-bandwidth of a save that carries RAM: 1
// TiB/s, within what QEMU accepts (at most SIZE_MAX, migration/options.c).
const unlimitedBandwidth = 1 << 40

func (s *Session) setMaxBandwidth(ctx context.Context, bps int64) error {
	if err := s.Run(ctx, "migrate-set-parameters", map[string]int64{"max-bandwidth": bps}, nil); err != nil {
		return fmt.Errorf("set migration bandwidth: %w", err)
	}
	return nil
}

// prepareSave checks the migration capabilities and sets
// [CapIgnoreShared] to ignoreShared.
func (s *Session) prepareSave(ctx context.Context, ignoreShared bool) error {
	caps, err := s.MigrationCapabilities(ctx)
	if err != nil {
		return err
	}
	var bad []string
	for name, on := range caps {
		if why, ok := incompatibleCaps[name]; ok && on {
			bad = append(bad, fmt.Sprintf("%s (%s)", name, why))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		return fmt.Errorf("%w: %s", ErrCapability, strings.Join(bad, ", "))
	}
	if _, ok := caps[CapIgnoreShared]; !ok {
		return fmt.Errorf("%w: QEMU lacks %s", ErrCapability, CapIgnoreShared)
	}
	if caps[CapIgnoreShared] == ignoreShared {
		return nil
	}
	return s.SetMigrationCapabilities(ctx, map[string]bool{CapIgnoreShared: ignoreShared})
}

// waitSave polls an outgoing migration to the end. It owns pr and closes it
// on every path; copied reports the goroutine copying pr to the caller's
// writer, and waitSave returns only after that goroutine ended.
func (s *Session) waitSave(ctx context.Context, pr *os.File, copied <-chan copyResult) (int64, error) {
	defer pr.Close()
	var p poller
	var res *copyResult
	for {
		st, err := s.MigrationStatus(ctx)
		if err != nil {
			if ctx.Err() != nil {
				err = ctxErr(ctx)
			}
			return s.abortSave(ctx, pr, copied, res, err)
		}
		switch st.Status {
		case "completed":
			// QEMU closes its end of the pipe when it cleans up the
			// migration, just after it reports completion.
			if res == nil {
				select {
				case r := <-copied:
					res = &r
				case <-ctx.Done():
					pr.Close()
					<-copied
					return 0, fmt.Errorf("copy migration stream: %w", ctxErr(ctx))
				}
			}
			if res.err != nil {
				return res.n, fmt.Errorf("copy migration stream: %w", res.err)
			}
			return res.n, nil
		case "failed", "cancelled":
			pr.Close()
			if res == nil {
				r := <-copied
				res = &r
			}
			return res.n, migrationError(st)
		}
		select {
		case <-ctx.Done():
			return s.abortSave(ctx, pr, copied, res, ctxErr(ctx))
		case r := <-copied:
			res = &r
			copied = nil // received; never again
			if r.err != nil {
				return s.abortSave(ctx, pr, nil, res, fmt.Errorf("write migration stream: %w", r.err))
			}
			// End of stream before "completed": QEMU closed the pipe;
			// the next poll tells why.
		case <-p.next():
		}
	}
}

// abortSave cancels an outgoing migration after cause, closes pr, waits
// for the copying goroutine (unless res says it has ended) and for QEMU to
// leave the migration, within [abortTimeout].
func (s *Session) abortSave(ctx context.Context, pr *os.File, copied <-chan copyResult, res *copyResult, cause error) (int64, error) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abortTimeout)
	defer cancel()
	// Close our end first: QEMU's pending and later writes fail at once,
	// so the migration cannot still complete after we gave up. (QEMU's
	// cancel shuts the channel down, which a pipe does not support.)
	pr.Close()
	_ = s.Run(actx, "migrate_cancel", nil, nil)
	if res == nil {
		r := <-copied
		res = &r
	}
	var p poller
	for {
		st, err := s.MigrationStatus(actx)
		if err != nil || st.terminal() {
			return res.n, cause
		}
		select {
		case <-actx.Done():
			return res.n, cause
		case <-p.next():
		}
	}
}

// migrationError describes a failed or cancelled migration.
func migrationError(st MigrationStatus) error {
	why := st.ErrorDesc
	if st.Status != "failed" {
		why = strings.TrimSuffix(st.Status+": "+why, ": ")
	}
	if why == "" {
		return ErrMigrationFailed
	}
	return fmt.Errorf("%w: %s", ErrMigrationFailed, why)
}

// LoadDeviceState loads a stream written by [Session.SaveDeviceState] into
// a QEMU started with "-incoming defer" and the same machine, devices and
// RAM backends (with the RAM file contents already in place: the stream
// does not carry shared RAM). It turns on [CapIgnoreShared], passes QEMU
// one end of a pipe, runs migrate-incoming from "fd:NAME", copies r into
// the pipe, and polls until the load completed. QEMU stops reading at the
// end of the stream; bytes after it are ignored.
//
// The guest then runs if it was running when saved and QEMU was started
// without -S; otherwise it is in the state it was saved in, "paused" for a
// guest paused for the checkpoint (migration/migration.c,
// process_incoming_migration_bh).
//
// QEMU not waiting for a migration gives an error wrapping
// [ErrNotIncoming]. QEMU exits when a load fails, giving its reason only on
// its stderr; that, a truncated r, or ctx ending (which also makes QEMU
// exit, as it cannot abandon a load) give an error wrapping
// [ErrMigrationFailed]. r must not block forever.
func (s *Session) LoadDeviceState(ctx context.Context, r io.Reader) error {
	return s.LoadStream(ctx, r, true)
}

// LoadStream is [Session.LoadDeviceState] for a stream saved with
// [CapIgnoreShared] on (ignoreShared) or off: QEMU refuses a stream whose
// capability differs from its own (migration/savevm.c,
// configuration_validate_capabilities). A stream saved with it off
// carries every RAM block; one filtered of the shared blocks' pages
// (package migstream) leaves them what was put in their files.
func (s *Session) LoadStream(ctx context.Context, r io.Reader, ignoreShared bool) error {
	st, err := s.Status(ctx)
	if err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	if st.State != "inmigrate" {
		return fmt.Errorf("load device state: %w: run state is %q (start QEMU with -incoming defer)", ErrNotIncoming, st.State)
	}
	if err := s.SetMigrationCapabilities(ctx, map[string]bool{CapIgnoreShared: ignoreShared}); err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	name, err := s.sendFD(ctx, "load", pr)
	pr.Close()
	if err != nil {
		pw.Close()
		return fmt.Errorf("load device state: %w", err)
	}
	if err := s.Run(ctx, "migrate-incoming", map[string]string{"uri": "fd:" + name}, nil); err != nil {
		s.closeFD(name)
		pw.Close()
		return fmt.Errorf("load device state: start incoming migration: %w", err)
	}
	copied := make(chan copyResult, 1)
	go func() {
		n, err := io.Copy(pw, r)
		pw.Close() // end of stream for QEMU
		copied <- copyResult{n, err}
	}()
	if err := s.waitLoad(ctx, pw, copied); err != nil {
		return fmt.Errorf("load device state: %w", err)
	}
	return nil
}

// waitLoad polls an incoming migration to the end. It closes pw on every
// path and returns only after the copying goroutine ended.
func (s *Session) waitLoad(ctx context.Context, pw *os.File, copied <-chan copyResult) error {
	var res *copyResult
	// finish ends the copy and adds its error to a failure, unless it is
	// only the consequence: the pipe closed by us or by QEMU exiting.
	finish := func(err error) error {
		pw.Close()
		if res == nil {
			r := <-copied
			res = &r
		}
		if err != nil && res.err != nil && !errors.Is(res.err, os.ErrClosed) && !errors.Is(res.err, syscall.EPIPE) {
			err = errors.Join(err, fmt.Errorf("copy migration stream after %d bytes: %w", res.n, res.err))
		}
		return err
	}
	var giveUp <-chan time.Time // set once the input ended in an error
	var p poller
	for {
		mig, err := s.MigrationStatus(ctx)
		switch {
		case isClosed(err):
			return finish(fmt.Errorf("%w: QEMU exited during the load (it exits when a load fails; the reason is on its stderr): %w",
				ErrMigrationFailed, err))
		case err != nil:
			return finish(err)
		case mig.Status == "completed":
			st, err := s.Status(ctx)
			if err != nil {
				return finish(err)
			}
			if st.State != "inmigrate" {
				// Loaded. A copy error now only means that QEMU
				// stopped reading at the end of its stream.
				return finish(nil)
			}
			// The run state changes in the same bottom half; poll on.
		case mig.Status == "failed" || mig.Status == "cancelled":
			return finish(migrationError(mig))
		}
		select {
		case <-ctx.Done():
			// There is no cancelling a load: QEMU reads the truncated
			// stream, fails and exits.
			return finish(fmt.Errorf("%w: abandoned, so QEMU will exit: %w", ErrMigrationFailed, ctxErr(ctx)))
		case r := <-copied:
			res = &r
			copied = nil
			if r.err != nil {
				// A short stream fails the load; give QEMU a moment
				// to say so.
				giveUp = time.After(abortTimeout)
			}
		case <-giveUp:
			return finish(fmt.Errorf("%w: QEMU neither finished nor failed the load", ErrMigrationFailed))
		case <-p.next():
		}
	}
}

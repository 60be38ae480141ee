package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// ErrSqueeze means the guest's memory could not be squeezed before a save.
var ErrSqueeze = errors.New("cannot squeeze the guest")

// SqueezeReport is what a squeeze did. The JSON names are part of the CLI.
type SqueezeReport struct {
	// Requested is what the balloon was asked to take, in bytes; Taken
	// what it held when the guest settled. PriorBytes is the guest's
	// memory before (query-balloon's actual), where it was put back.
	Requested  uint64 `json:"requested_bytes"`
	Taken      uint64 `json:"taken_bytes"`
	PriorBytes uint64 `json:"prior_bytes"`
	// Reclaimable is the clean page cache the guest's counters showed
	// before (auto), FreeBefore its free memory, in bytes.
	Reclaimable uint64 `json:"reclaimable_bytes,omitempty"`
	FreeBefore  uint64 `json:"free_bytes,omitempty"`
	// InflateMS is how long the guest took to fill the balloon; the save
	// started after it.
	InflateMS int64 `json:"inflate_ms"`
	// Settled says the balloon reached its target; otherwise the guest
	// stopped giving memory (it had no more to reclaim) and the save went
	// on with what it had.
	Settled bool `json:"settled"`
}

// Squeeze settings.
const (
	// squeezeMargin is memory a squeeze leaves the guest beyond what it
	// cannot give back: at least 64 MiB, or 1/32 of its RAM.
	squeezeMarginMin = 64 << 20
	// squeezeStall is how long the balloon may stay put before the
	// guest is taken to have given what it can.
	squeezeStall = 3 * time.Second
	// squeezeTimeout bounds a squeeze.
	squeezeTimeout = 5 * time.Minute
	// squeezePoll is how often query-balloon is asked.
	squeezePoll = 100 * time.Millisecond
)

// ParseSqueeze reads --squeeze's value: "auto" (or empty), or a size to
// take from the guest ("512M", "2G", bytes without a suffix).
func ParseSqueeze(s string) (auto bool, size uint64, err error) {
	if s == "" || s == "auto" {
		return true, 0, nil
	}
	mult := uint64(1)
	switch suffix := strings.ToUpper(s[len(s)-1:]); suffix {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	num := s
	if mult != 1 {
		num = s[:len(s)-1]
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || n == 0 || n > (1<<50)/mult {
		return false, 0, fmt.Errorf("squeeze %q: want auto or a size such as 512M or 2G", s)
	}
	return false, n * mult, nil
}

// squeeze inflates the guest's balloon so it gives up its page cache,
// and waits until it has. It returns the report and the function that
// puts the balloon back where it was, which the caller must call
// whatever happens (it uses its own context, so a cancelled save still
// deflates). On error the balloon is already back.
func (g *guest) squeeze(ctx context.Context, opt SaveOptions) (*SqueezeReport, func(), error) {
	if g.prior.State != "running" {
		return nil, nil, fmt.Errorf("%w: the guest is %s: only a running guest can fill its balloon (resume it, or save without --squeeze)", ErrSqueeze, g.prior.State)
	}
	prior, err := g.sess.BalloonActual(ctx)
	if errors.Is(err, qmp.ErrNoBalloon) {
		return nil, nil, fmt.Errorf("%w: %w: give QEMU a balloon (-device virtio-balloon-pci) and the guest its driver (virtio_balloon), or save without --squeeze", ErrSqueeze, err)
	}
	if err != nil {
		return nil, nil, err
	}
	rep := &SqueezeReport{PriorBytes: prior}
	auto, size, err := ParseSqueeze(opt.Squeeze)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrSqueeze, err)
	}
	margin := max(squeezeMarginMin, prior/32)
	if auto {
		c, err := g.counters(ctx, opt.ScanOptions)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: the guest's memory counters could not be read (%w): give a size, --squeeze=SIZE", ErrSqueeze, err)
		}
		rep.Reclaimable, rep.FreeBefore = c.Reclaimable()*introspect.PageSize, c.Free*introspect.PageSize
		// The balloon takes free memory first, then the page cache.
		size = rep.FreeBefore + rep.Reclaimable
		size -= min(size, margin)
	}
	size = min(size, prior-min(prior, margin))
	size &^= introspect.PageSize - 1
	rep.Requested = size
	if size == 0 {
		g.log.Debug("nothing to squeeze")
		return rep, func() {}, nil
	}
	release := func() {
		sctx, cancel := settleContext(ctx)
		defer cancel()
		if err := g.sess.SetBalloon(sctx, prior); err != nil {
			g.log.Warn("the balloon could not be put back", "err", err, "target_bytes", prior)
		}
	}
	start := time.Now()
	if err := g.sess.SetBalloon(ctx, prior-size); err != nil {
		release()
		return nil, nil, err
	}
	last, lastChange := prior, time.Now()
	deadline := time.Now().Add(squeezeTimeout)
	for {
		actual, err := g.sess.BalloonActual(ctx)
		if err != nil {
			release()
			return nil, nil, err
		}
		now := time.Now()
		if actual != last {
			last, lastChange = actual, now
		}
		if actual <= prior-size {
			rep.Settled = true
			break
		}
		if now.Sub(lastChange) > squeezeStall || now.After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			release()
			return nil, nil, ctx.Err()
		case <-time.After(squeezePoll):
		}
	}
	rep.Taken = prior - min(prior, last)
	rep.InflateMS = time.Since(start).Milliseconds()
	if rep.Taken == 0 {
		// QEMU has the device, but nothing in the guest answers it.
		release()
		return nil, nil, fmt.Errorf("%w: the guest's balloon did not move in %v: is its driver (virtio_balloon) loaded? Save without --squeeze", ErrSqueeze, squeezeStall)
	}
	g.log.Debug("squeezed", "requested", rep.Requested, "taken", rep.Taken, "ms", rep.InflateMS, "settled", rep.Settled)
	return rep, release, nil
}

// counters reads the running guest's memory counters; the guest is not
// paused (the counts are approximate by nature).
func (g *guest) counters(ctx context.Context, opt ScanOptions) (introspect.MemCounters, error) {
	if err := g.mapRAM(ctx, false); err != nil {
		return introspect.MemCounters{}, err
	}
	// RAM in QEMU's own memory is read through a mirror that holds what
	// it read until the save: reading it while the guest runs would feed
	// the save stale pages.
	for i, b := range g.blocks {
		if b.Mapped() == nil {
			return introspect.MemCounters{}, fmt.Errorf("backend %q is %s, which kvmckpt reads only with the guest paused", g.backends[i].ID, b)
		}
	}
	regs, err := g.sess.CPURegisters(ctx, 0)
	if err != nil {
		return introspect.MemCounters{}, err
	}
	opt.needCounters = true
	prof, err := g.profile(ctx, opt, regs)
	if err != nil {
		return introspect.MemCounters{}, err
	}
	k, err := introspect.OpenKernel(g.mem, regs.CR3, regs.LA57(), prof)
	if err != nil {
		return introspect.MemCounters{}, err
	}
	return k.MemCounters()
}

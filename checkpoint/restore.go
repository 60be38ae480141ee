package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// ErrInvalid means a checkpoint file is invalid or corrupt, or does not fit
// the restore target.
var ErrInvalid = errors.New("checkpoint invalid")

// RestoreOptions say which checkpoint goes into which QEMU.
type RestoreOptions struct {
	// Input is the checkpoint file.
	Input string
	// QMP is the QMP socket of a QEMU started with -incoming defer (and -S,
	// so that it waits for Resume).
	QMP string
	// Domain, instead of QMP, restores into libvirt as this domain
	// (see [RestoreDomain]), on the connection Connect.
	Domain  string
	Connect string
	// Resume starts the guest once its state is loaded.
	Resume bool
	// Key decrypts an encrypted checkpoint.
	Key []byte
	// Parents are files where the parents of an incremental checkpoint
	// may be, besides beside it under the names it gives.
	Parents  []string
	Progress func(done, total uint64)
	Log      *slog.Logger
}

// RestoreResult is what a restore did.
type RestoreResult struct {
	PagesRestored uint64 `json:"pages_restored"`
	// Links is the number of checkpoints the pages came from: 1, or
	// the chain of an incremental checkpoint.
	Links            int    `json:"links"`
	PagesTotal       uint64 `json:"pages_total"`
	DeviceStateBytes int64  `json:"device_state_bytes"`
	PagesMS          int64  `json:"pages_ms"`
	DeviceStateMS    int64  `json:"device_state_ms"`
	DurationMS       int64  `json:"duration_ms"`
	GuestState       string `json:"guest_state"`
}

// Restore loads a checkpoint into a waiting QEMU: it checks the file and
// the target's RAM against each other, writes the saved pages into the
// target's RAM file, clears every other page to the fill byte, feeds QEMU
// the device state and waits until QEMU has loaded it. Nothing reaches QEMU
// before the device state's checksum has been verified.
func Restore(ctx context.Context, opt RestoreOptions) (*RestoreResult, error) {
	start := time.Now()
	r, err := openChain(opt.Input, opt.Key, opt.Parents)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	h := r.Header()
	// Check the device state before anything touches the target: it is
	// small, and QEMU must never be fed a corrupt one.
	if _, err := io.Copy(io.Discard, r.DeviceState()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	g, err := openGuest(ctx, Target{QMP: opt.QMP}, logger(opt.Log))
	if err != nil {
		return nil, err
	}
	defer g.close()
	if g.prior.State != "inmigrate" {
		return nil, fmt.Errorf("%w: target QEMU is %q; start it with -incoming defer -S (and its own RAM file) to restore into it", ErrGuestState, g.prior.State)
	}
	if err := g.mapRAM(ctx, true); err != nil {
		return nil, err
	}
	if err := g.checkRAMPrivate(); err != nil {
		return nil, err
	}
	if err := g.matches(ctx, h); err != nil {
		return nil, err
	}
	if f := h.DeviceStateForm; f != writer.DeviceStateIgnoreShared && f != writer.DeviceStateFiltered {
		return nil, fmt.Errorf("%w: device state of form %q, which this kvmckpt does not know: restore with a newer kvmckpt", ErrInvalid, f)
	}
	t0 := time.Now()
	ropt := writer.RestoreOptions{Progress: opt.Progress}
	if g.mappedAll() {
		err = r.RestorePages(g.ram, ropt)
	} else {
		err = r.RestorePagesTo(g.pageSpace(), ropt)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: restore pages (the target's RAM now holds a partial restore; its guest was not started): %w", ErrInvalid, err)
	}
	if err := g.clearUnsaved(r, h.FillByte); err != nil {
		return nil, err
	}
	tPages := time.Since(t0)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("restore interrupted before the device state was loaded: %w", err)
	}
	t1 := time.Now()
	if err := g.sess.LoadStream(ctx, r.DeviceState(), h.DeviceStateForm == writer.DeviceStateIgnoreShared); err != nil {
		return nil, err // says "load device state"
	}
	tDev := time.Since(t1)
	if opt.Resume {
		if err := g.sess.Cont(ctx); err != nil {
			return nil, fmt.Errorf("resume restored guest: %w", err)
		}
		// A save that squeezed the guest kept its balloon inflated in the
		// device state: the running guest gets its memory back.
		if h.BalloonTarget != 0 {
			if err := g.sess.SetBalloon(ctx, h.BalloonTarget); err != nil {
				g.log.Warn("the restored guest's balloon could not be put back to its size before the squeeze", "err", err, "target_bytes", h.BalloonTarget)
			}
		}
	}
	res := &RestoreResult{
		PagesRestored:    r.Restored(),
		Links:            len(r.Links),
		PagesTotal:       h.Pages.Total,
		DeviceStateBytes: r.DeviceStateLen(),
		PagesMS:          tPages.Milliseconds(),
		DeviceStateMS:    tDev.Milliseconds(),
	}
	if st, err := g.sess.Status(ctx); err == nil {
		res.GuestState = st.State
	}
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// checkRAMPrivate refuses a target whose RAM files another process maps:
// a target started with the source's mem-path (as `inspect` once printed
// it) shares the running source's memory, and a restore would overwrite
// that guest. Only the target QEMU and kvmckpt itself may map them. When
// the target's pid cannot be told (another pid namespace), one mapper is
// taken to be the target.
func (g *guest) checkRAMPrivate() error {
	skip := []int{os.Getpid()}
	allowed := 1
	if pid, err := g.sess.PeerPID(); err == nil {
		skip = append(skip, pid)
		allowed = 0
	}
	for i, f := range g.files {
		if f == nil {
			continue // QEMU's own memory
		}
		id, ok := fdID(f)
		if !ok {
			continue
		}
		m, err := mappersOf(id, skip...)
		if err != nil {
			return err
		}
		if len(m) > allowed {
			return inUse("the target's RAM file", g.backends[i].MemPath, m[len(m)-1],
				"start the restore target with a mem-path of its own (a new file), never the source's")
		}
	}
	return nil
}

// matches checks that the target's RAM has the checkpoint's geometry:
// the same backends, of the same sizes, and the same machine type. (The
// guest-physical map itself is not compared: it depends on chipset state,
// such as the PAM registers that put RAM or ROM at 0xc0000-0xfffff, which a
// target waiting for its device state does not have yet.)
func (g *guest) matches(ctx context.Context, h writer.Header) error {
	if len(g.backends) != len(h.Regions) {
		return fmt.Errorf("%w: checkpoint has %d RAM backends, the target %d", ErrInvalid, len(h.Regions), len(g.backends))
	}
	for i, r := range h.Regions {
		b := g.backends[i]
		if b.Size != r.Size {
			return fmt.Errorf("%w: RAM backend %q is %d MiB in the checkpoint, backend %q of the target %d MiB; start the target with -m and size=%dM",
				ErrInvalid, r.ID, r.Size>>20, b.ID, b.Size>>20, r.Size>>20)
		}
	}
	m, err := g.sess.MachineType(ctx)
	if err != nil {
		return err
	}
	if h.MachineType != "" && m.Type != h.MachineType {
		return fmt.Errorf("%w: checkpoint is of a %s machine, the target is %s; start the target with -machine %s", ErrInvalid, h.MachineType, m.Type, h.MachineType)
	}
	return nil
}

// clearUnsaved makes every page the checkpoint does not hold read as the
// fill byte. For zero it punches holes, which frees the target's memory
// instead of writing it. The target's RAM file is not trusted to be zero
// to begin with: QEMU uses an existing file as it finds it.
//
// A block in QEMU's own memory gets zeros written over the pages QEMU has
// touched; those it never touched read as zero already.
func (g *guest) clearUnsaved(r *writer.Chain, fill byte) error {
	if fill != 0 {
		var err error
		if g.mappedAll() {
			err = r.FillUnsaved(g.ram)
		} else {
			err = r.FillUnsavedTo(g.pageSpace())
		}
		if err != nil {
			return fmt.Errorf("fill unsaved pages: %w", err)
		}
		return nil
	}
	grains := make([]int64, len(g.files))
	untouched := make([]*pagemap.Bitmap, len(g.blocks))
	spans, _ := g.pageSpans()
	for i, f := range g.files {
		if f != nil {
			grains[i] = punchGrain(f)
			continue
		}
		zeros, err := g.blocks[i].Zeros()
		if err != nil {
			return fmt.Errorf("clear unsaved pages: %w", err)
		}
		untouched[i] = pagemap.NewBitmap(spans[i].n)
		for _, z := range zeros {
			untouched[i].SetRange(z.Start, min(z.Count, spans[i].n-min(z.Start, spans[i].n)))
		}
	}
	var zero []byte
	for start, count := range r.UnsavedRuns() {
		for i, sp := range spans {
			p, c, ok := sp.clip(start, count)
			switch {
			case !ok:
			case g.files[i] != nil:
				zeroRange(g.files[i], g.ram[i], int64(p*introspect.PageSize), int64(c*introspect.PageSize), grains[i])
			default:
				for q := p; q < p+c; {
					if untouched[i].Test(q) {
						q++
						continue
					}
					end, ok := untouched[i].NextSet(q)
					if !ok || end > p+c {
						end = p + c
					}
					n := min(end-q, 256)
					if zero == nil {
						zero = make([]byte, 256*introspect.PageSize)
					}
					if _, err := g.blocks[i].WriteAt(zero[:n*introspect.PageSize], int64(q*introspect.PageSize)); err != nil {
						return fmt.Errorf("clear unsaved pages: %w", err)
					}
					q += n
				}
			}
		}
	}
	return nil
}

// punchGrain is the unit in which f's file system punches holes: its
// block size, the huge page size on hugetlbfs.
func punchGrain(f *os.File) int64 {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Blksize < introspect.PageSize || st.Blksize&(st.Blksize-1) != 0 {
		return introspect.PageSize
	}
	return int64(st.Blksize)
}

// zeroRange makes [off, off+n) of the file f, mapped at mem, read as zero.
// It punches a hole over the whole grains in it and writes zeros over the
// rest: a file system may punch only whole grains and leave the bytes
// around them as they were (hugetlbfs before Linux 6.0 did).
func zeroRange(f *os.File, mem []byte, off, n, grain int64) {
	lo := (off + grain - 1) / grain * grain
	hi := (off + n) / grain * grain
	if lo >= hi {
		clear(mem[off : off+n])
		return
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, lo, hi-lo); err != nil {
		// No hole punching here: write the zeros.
		clear(mem[lo:hi])
	}
	clear(mem[off:lo])
	clear(mem[hi : off+n])
}

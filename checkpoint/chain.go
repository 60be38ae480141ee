package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// An incremental checkpoint (save --parent) stores the pages in use whose
// content differs from what its parent restores, found by comparing each
// page's hash with the parent's: a version 4 file keeps the hashes of
// every page it has in use, and a parent saved without them (a whole
// checkpoint of version 1) has them computed from its chunks, before the
// guest is paused. Restoring follows the chain (writer.Chain).

// openChain opens the checkpoint at path with the parents it needs.
// Every problem with the file or a link is ErrInvalid.
func openChain(path string, key []byte, parents []string) (*writer.Chain, error) {
	c, err := writer.OpenChain(path, writer.ChainOptions{Key: key, Parents: parents})
	if err != nil {
		return nil, invalid(err)
	}
	return c, nil
}

// invalid marks an error opening a checkpoint as ErrInvalid, but for a
// store that cannot be reached: that is no fault of the checkpoint's.
func invalid(err error) error {
	if errors.Is(err, writer.ErrStoreAccess) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrInvalid, err)
}

// openWhole opens the checkpoint at path for an operation that reads one
// file alone (export, ps and core of a file): an incremental checkpoint
// is refused with the way out, flatten.
func openWhole(path string, key []byte, op string) (*writer.Reader, error) {
	r, err := writer.OpenKey(path, key)
	if err != nil {
		return nil, invalid(err)
	}
	if p := r.Parent(); p != nil {
		r.Close()
		return nil, fmt.Errorf("%w: %s is an incremental checkpoint (its parent is %s); %s needs a whole one: kvmckpt flatten %s -o FULL.kvmckpt, then %s FULL.kvmckpt", ErrInvalid, path, p.Name, op, path, op)
	}
	return r, nil
}

// parent is the checkpoint a save is incremental to.
type parent struct {
	path  string
	chain *writer.Chain
	ref   *writer.Parent
	// sums are the hashes of the pages the parent restores.
	sums *pagehash.Table
	took time.Duration
}

// openParent opens the parent of a save to output, with its own parents
// (searched beside it, and among parents), and reads or computes the
// hashes of its pages. The output must not replace a link of the chain.
func openParent(ctx context.Context, path, output string, parents []string) (*parent, error) {
	t := time.Now()
	c, err := openChain(path, nil, parents)
	if err != nil {
		return nil, err
	}
	p := &parent{path: path, chain: c}
	if err := func() error {
		if err := notALink(output, c); err != nil {
			return err
		}
		if p.ref, err = c.AsParent(); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		if p.sums, err = c.PageSums(ctx); err != nil {
			return fmt.Errorf("%w: parent %s: %w", ErrInvalid, path, err)
		}
		return nil
	}(); err != nil {
		c.Close()
		return nil, err
	}
	p.took = time.Since(t)
	return p, nil
}

// notALink refuses an output that is a file of the chain c: writing it
// would replace a link that the chain, or the output itself, needs.
func notALink(output string, c *writer.Chain) error {
	if slices.Contains(c.Paths, output) {
		return fmt.Errorf("the output %s is a link of the chain: write to another name", output)
	}
	oi, err := os.Stat(output)
	if err != nil {
		return nil
	}
	for _, l := range c.Paths {
		if li, err := os.Stat(l); err == nil && os.SameFile(oi, li) {
			return fmt.Errorf("the output %s is %s, a link of the chain: write to another file", output, l)
		}
	}
	return nil
}

func (p *parent) close() {
	if p != nil {
		p.chain.Close()
	}
}

// changed hashes the pages of the guest in save (holes read as zero
// without being read) and returns their table and those of them whose
// content differs from what the parent restores. h is the new
// checkpoint's header, which must be of the parent's guest.
func (p *parent) changed(ctx context.Context, g *guest, h *writer.Header, save, holes *pagemap.Bitmap) (*pagehash.Table, *pagemap.Bitmap, error) {
	ph := p.chain.Header()
	if err := sameRegions(h, &ph); err != nil {
		return nil, nil, fmt.Errorf("%w: parent %s is of another guest: %w", ErrInvalid, p.path, err)
	}
	if h.FillByte != ph.FillByte {
		return nil, nil, fmt.Errorf("%w: parent %s has fill byte %#x, the guest now %#x (page poisoning turned on or off): save a whole checkpoint", ErrInvalid, p.path, ph.FillByte, h.FillByte)
	}
	opt := writer.HashOptions{Zeros: holes}
	var cur *pagehash.Table
	var err error
	if g.mappedAll() {
		cur, err = writer.PageSums(ctx, g.ram, h, save, opt)
	} else {
		cur, err = writer.PageSumsFrom(ctx, g.pageSpace(), h, save, opt)
	}
	if err != nil {
		return nil, nil, err
	}
	changed, err := pagehash.Changed(cur, p.sums, pagehash.Filled(writer.PageSize, h.FillByte))
	if err != nil {
		return nil, nil, err
	}
	return cur, changed, nil
}

// sameRegions checks that two headers have the same RAM regions.
func sameRegions(h, o *writer.Header) error {
	if len(h.Regions) != len(o.Regions) {
		return fmt.Errorf("%d RAM regions, not %d", len(o.Regions), len(h.Regions))
	}
	for i, r := range h.Regions {
		if r.ID != o.Regions[i].ID || r.Size != o.Regions[i].Size {
			return fmt.Errorf("RAM region %d is %q of %d MiB, not %q of %d MiB", i, o.Regions[i].ID, o.Regions[i].Size>>20, r.ID, r.Size>>20)
		}
	}
	return nil
}

// FlattenOptions say which chain to flatten into which file.
type FlattenOptions struct {
	Input, Output string
	// Parents are files to try as the chain's parents.
	Parents     []string
	Compression writer.Compression
	Progress    func(done, total uint64)
}

// FlattenResult is what a flatten did. The JSON names are part of the CLI.
type FlattenResult struct {
	Output       string `json:"output"`
	Links        int    `json:"links"`
	PagesTotal   uint64 `json:"pages_total"`
	PagesSaved   uint64 `json:"pages_saved"`
	BytesWritten int64  `json:"bytes_written"`
	DurationMS   int64  `json:"duration_ms"`
}

// Flatten writes the checkpoint a chain restores as one checkpoint
// without a parent: the newest link's header and device state, every
// page in use from the link that holds it, and the page hashes, so that
// it can be a parent in turn. The chain is read, never changed; the
// output replaces its target only once complete, and may not be a link.
func Flatten(ctx context.Context, opt FlattenOptions) (*FlattenResult, error) {
	start := time.Now()
	if opt.Output == "" {
		return nil, errors.New("flatten: no output file")
	}
	c, err := openChain(opt.Input, nil, opt.Parents)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := notALink(opt.Output, c); err != nil {
		return nil, err
	}
	sums, err := c.PageSums(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	// The chain is restored into an unlinked sparse file beside the
	// output, then written from there: memory stays small whatever the
	// guest's size, and only the pages in use take disk blocks.
	h := c.Header()
	scratchDir := filepath.Dir(opt.Output)
	if writer.IsStored(opt.Output) {
		scratchDir = "" // the temporary directory
	}
	scratch, err := os.CreateTemp(scratchDir, ".kvmckpt-flatten-*")
	if err != nil {
		return nil, fmt.Errorf("flatten: %w", err)
	}
	os.Remove(scratch.Name())
	defer scratch.Close()
	if err := scratch.Truncate(int64(h.Pages.Total * writer.PageSize)); err != nil {
		return nil, fmt.Errorf("flatten: %w", err)
	}
	total := 2 * c.Restored()
	progress := func(base uint64) func(done, _ uint64) {
		if opt.Progress == nil {
			return nil
		}
		return func(done, _ uint64) { opt.Progress(base+done, total) }
	}
	if err := c.RestorePagesTo(scratch, writer.RestoreOptions{Progress: progress(0)}); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	h.Parent = nil
	w, err := writer.Create(opt.Output, h, writer.Options{Compression: opt.Compression, InUse: sums})
	if err != nil {
		return nil, err
	}
	defer w.Abort()
	if err := w.WritePagesFrom(ctx, scratch, sums.Pages, progress(c.Restored())); err != nil {
		return nil, err
	}
	if _, err := w.WriteDeviceState(c.DeviceState()); err != nil {
		var fe *writer.FormatError
		if errors.As(err, &fe) {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		return nil, err
	}
	if err := w.Commit(); err != nil {
		return nil, err
	}
	st := w.Stats()
	return &FlattenResult{
		Output:       opt.Output,
		Links:        len(c.Links),
		PagesTotal:   h.Pages.Total,
		PagesSaved:   st.PagesWritten,
		BytesWritten: st.BytesWritten,
		DurationMS:   time.Since(start).Milliseconds(),
	}, nil
}

package writer

import (
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"slices"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// ErrChain is wrapped by the errors of [OpenChain] about the links
// themselves: a parent missing, changed, of another guest, or a chain too
// deep or cyclic.
var ErrChain = errors.New("broken checkpoint chain")

// Chain is a checkpoint with the parents it needs: an incremental
// checkpoint and the checkpoints below it, down to one without a parent.
// It restores like a [Reader] of a whole checkpoint, each page from the
// newest link that stores it, none written twice. A checkpoint without a
// parent is a chain of one link.
type Chain struct {
	// Links are the checkpoints, the one opened first; Paths their
	// files and IDs their [Reader.ID].
	Links []*Reader
	Paths []string
	IDs   []string
	// provide[i] are the pages link i restores; nil for a single link,
	// which restores all it stores.
	provide []*pagemap.Bitmap
	// restored are the pages some link restores; the others restore as
	// the fill byte.
	restored *pagemap.Bitmap
}

// ChainOptions say where a chain's parents are.
type ChainOptions struct {
	// Key decrypts the checkpoint if it is encrypted (it then has no
	// parent: incremental checkpoints are never encrypted).
	Key []byte
	// Parents are files to try as parents, before the file a link names,
	// looked for in the link's directory.
	Parents []string
}

// OpenChain opens the checkpoint at path and, if it has a parent, its
// parents: each found among opt.Parents or by the name the link gives,
// beside the link, and accepted only if its [Reader.ID] is the one the
// link names. It checks that every link is of the same guest (the same
// RAM regions, page size and fill byte) and that the depths agree, so a
// cycle or a chain deeper than [MaxChainDepth] cannot be followed. Every
// file is opened read-only. Errors about the links wrap [ErrChain].
func OpenChain(path string, opt ChainOptions) (_ *Chain, err error) {
	r, err := OpenKey(path, opt.Key)
	if err != nil {
		return nil, err
	}
	c := &Chain{Links: []*Reader{r}, Paths: []string{path}}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	id, err := r.ID()
	if err != nil {
		return nil, err
	}
	c.IDs = append(c.IDs, id)
	cand := &candidates{paths: opt.Parents}
	defer cand.close()
	for {
		link := c.Links[len(c.Links)-1]
		p := link.Parent()
		if p == nil {
			break
		}
		if len(c.Links) > MaxChainDepth {
			return nil, fmt.Errorf("%w: more than %d links below %s", ErrChain, MaxChainDepth, path)
		}
		linkPath := c.Paths[len(c.Paths)-1]
		pr, ppath, err := cand.find(p, beside(linkPath, p.Name))
		if err != nil {
			return nil, fmt.Errorf("%w: parent of %s: %w", ErrChain, linkPath, err)
		}
		if slices.Contains(c.IDs, p.ID) {
			pr.Close()
			return nil, fmt.Errorf("%w: %s names %s as its parent, which is already in the chain (a cycle)", ErrChain, linkPath, ppath)
		}
		depth := 0
		if pp := pr.Parent(); pp != nil {
			depth = pp.Depth
		}
		c.Links, c.Paths, c.IDs = append(c.Links, pr), append(c.Paths, ppath), append(c.IDs, p.ID)
		if depth != p.Depth-1 {
			return nil, fmt.Errorf("%w: %s is at depth %d, its child %s says %d", ErrChain, ppath, depth, linkPath, p.Depth-1)
		}
		if err := sameGuest(&link.h, &pr.h); err != nil {
			return nil, fmt.Errorf("%w: %s is no parent of %s: %w", ErrChain, ppath, linkPath, err)
		}
	}
	c.plan()
	return c, nil
}

// candidates are the files offered as parents, each opened once.
type candidates struct {
	paths  []string
	opened map[string]*Reader
	ids    map[string]string
}

// find returns the checkpoint with p's ID: among the offered files, else
// the one at beside. The Reader returned is the caller's.
func (cs *candidates) find(p *Parent, beside string) (*Reader, string, error) {
	if cs.opened == nil {
		cs.opened, cs.ids = map[string]*Reader{}, map[string]string{}
	}
	var notes []string
	try := func(path string) *Reader {
		r, ok := cs.opened[path]
		if !ok {
			var err error
			if r, err = Open(path); err != nil {
				if !errors.Is(err, os.ErrNotExist) || path != beside {
					notes = append(notes, err.Error())
				} else {
					notes = append(notes, fmt.Sprintf("no file %s", path))
				}
				cs.opened[path] = nil
				return nil
			}
			id, err := r.ID()
			if err != nil {
				notes = append(notes, fmt.Sprintf("%s: %v", path, err))
				r.Close()
				cs.opened[path] = nil
				return nil
			}
			cs.opened[path], cs.ids[path] = r, id
		}
		if r == nil {
			return nil
		}
		if cs.ids[path] != p.ID {
			if path == beside {
				notes = append(notes, fmt.Sprintf("%s has another identity (%.12s, want %.12s): it was changed or replaced since the child was saved", path, cs.ids[path], p.ID))
			}
			return nil
		}
		delete(cs.opened, path) // the caller's now
		return r
	}
	for _, path := range cs.paths {
		if r := try(path); r != nil {
			return r, path, nil
		}
	}
	if !slices.Contains(cs.paths, beside) {
		if r := try(beside); r != nil {
			return r, beside, nil
		}
	}
	msg := fmt.Sprintf("%s (id %.12s) not found", p.Name, p.ID)
	for _, n := range notes {
		msg += "; " + n
	}
	return nil, "", fmt.Errorf("%s; give its path with --parent", msg)
}

func (cs *candidates) close() {
	for _, r := range cs.opened {
		if r != nil {
			r.Close()
		}
	}
}

// sameGuest checks that a parent p is of the guest of its child h: the
// same RAM regions, page size and fill byte.
func sameGuest(h, p *Header) error {
	if h.PageSize != p.PageSize || h.Pages.Total != p.Pages.Total || len(h.Regions) != len(p.Regions) {
		return fmt.Errorf("%d pages in %d regions, the child has %d in %d", p.Pages.Total, len(p.Regions), h.Pages.Total, len(h.Regions))
	}
	for i := range h.Regions {
		if h.Regions[i].ID != p.Regions[i].ID || h.Regions[i].Size != p.Regions[i].Size {
			return fmt.Errorf("region %d is %q of %d bytes, the child's %q of %d", i, p.Regions[i].ID, p.Regions[i].Size, h.Regions[i].ID, h.Regions[i].Size)
		}
	}
	if h.FillByte != p.FillByte {
		return fmt.Errorf("fill byte %#x, the child's %#x", p.FillByte, h.FillByte)
	}
	return nil
}

// plan decides which link restores which page: a page in use in the
// newest link comes from the newest link that stores it, provided every
// link above that one has it in use; a page out of use in a link on the
// way is the fill byte.
func (c *Chain) plan() {
	if len(c.Links) == 1 {
		c.restored = c.Links[0].used
		return
	}
	want := c.Links[0].InUse()
	c.restored = pagemap.NewBitmap(want.Len())
	c.provide = make([]*pagemap.Bitmap, len(c.Links))
	for i, l := range c.Links {
		if i > 0 {
			want.And(l.InUse())
		}
		p := want.Clone()
		p.And(l.used)
		want.AndNot(l.used)
		c.provide[i] = p
		c.restored.Or(p)
	}
}

// Header returns the header of the newest link.
func (c *Chain) Header() Header { return c.Links[0].Header() }

// Restored returns the number of pages the chain restores from its links.
func (c *Chain) Restored() uint64 { return c.restored.Count() }

// Provided returns the number of pages link i restores.
func (c *Chain) Provided(i int) uint64 {
	if c.provide == nil {
		return c.Links[i].h.Pages.Saved
	}
	return c.provide[i].Count()
}

// DeviceState returns the newest link's device state: see
// [Reader.DeviceState].
func (c *Chain) DeviceState() io.Reader { return c.Links[0].DeviceState() }

// DeviceStateLen is the newest link's [Reader.DeviceStateLen].
func (c *Chain) DeviceStateLen() int64 { return c.Links[0].DeviceStateLen() }

// RestorePages is [Reader.RestorePages] for the chain: each page from
// the link that holds it as the newest link has it, no page written
// twice. opts.Only must be nil.
func (c *Chain) RestorePages(dst [][]byte, opts RestoreOptions) error {
	sp, err := newSpace(dst, &c.Links[0].h)
	if err != nil {
		return fmt.Errorf("restore pages: %w", err)
	}
	return c.restore(memSink{sp}, opts)
}

// RestorePagesTo is [Chain.RestorePages] for a target written with
// WriteAt, as for [Reader.RestorePagesTo].
func (c *Chain) RestorePagesTo(dst io.WriterAt, opts RestoreOptions) error {
	return c.restore(writerAtSink{dst}, opts)
}

func (c *Chain) restore(s sink, opts RestoreOptions) error {
	if opts.Only != nil {
		return errors.New("restore pages: a chain restores all its pages")
	}
	if c.provide == nil {
		return c.Links[0].restore(s, opts)
	}
	total, base := c.restored.Count(), uint64(0)
	for i, l := range c.Links {
		o := opts
		o.Only = c.provide[i]
		if p := opts.Progress; p != nil {
			o.Progress = func(done, _ uint64) { p(base+done, total) }
		}
		if err := l.restore(s, o); err != nil {
			return fmt.Errorf("%s: %w", c.Paths[i], err)
		}
		base += c.provide[i].Count()
	}
	return nil
}

// UnsavedRuns yields the runs of pages that restore as the fill byte.
func (c *Chain) UnsavedRuns() iter.Seq2[uint64, uint64] { return c.restored.ClearRuns() }

// FillUnsaved is [Reader.FillUnsaved] for the chain.
func (c *Chain) FillUnsaved(dst [][]byte) error {
	return fillRuns(dst, &c.Links[0].h, c.restored.ClearRuns())
}

// FillUnsavedTo is [Reader.FillUnsavedTo] for the chain.
func (c *Chain) FillUnsavedTo(dst io.WriterAt) error {
	return fillRunsTo(dst, c.Links[0].h.FillByte, c.restored.ClearRuns())
}

// Verify checks every link whole ([Reader.Verify]), the newest first;
// progress, if not nil, counts bytes over all the links.
func (c *Chain) Verify(progress func(done, total uint64)) error {
	var total, base uint64
	for _, l := range c.Links {
		total += uint64(l.size)
	}
	for i, l := range c.Links {
		var p func(done, total uint64)
		if progress != nil {
			p = func(done, _ uint64) { progress(base+done, total) }
		}
		if err := l.Verify(p); err != nil {
			return fmt.Errorf("%s: %w", c.Paths[i], err)
		}
		base += uint64(l.size)
	}
	return nil
}

// Close closes every link.
func (c *Chain) Close() error {
	var first error
	for _, l := range c.Links {
		if err := l.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// AsParent returns how a child of the chain's newest link names it: by
// its ID, the base name of its path and a depth one more than its own. A
// chain already [MaxChainDepth] deep can have no child.
func (c *Chain) AsParent() (*Parent, error) {
	depth := 0
	if p := c.Links[0].h.Parent; p != nil {
		depth = p.Depth
	}
	if depth+1 > MaxChainDepth {
		return nil, fmt.Errorf("%w: %s is %d links deep, the most a chain may be: flatten it (kvmckpt flatten) and save a child of the flat file", ErrChain, c.Paths[0], depth)
	}
	return &Parent{ID: c.IDs[0], Name: baseName(c.Paths[0]), Depth: depth + 1}, nil
}

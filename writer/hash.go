package writer

import (
	"context"
	"fmt"
	"io"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/kvmckpt/kvmckpt/pagehash"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// hashSpan is how many pages of the page space one hashing job covers.
const hashSpan = 1 << 13

// HashOptions tune [PageSums].
type HashOptions struct {
	// Workers is the number of goroutines hashing; 0 means
	// the number of CPUs (GOMAXPROCS outside a pipeline).
	Workers int
	// Zeros, if not nil, are pages known to read as zero, not to be read
	// (see [Options].Zeros).
	Zeros *pagemap.Bitmap
}

// PageSums returns the hashes of the pages of ram in pages, ram as for
// [Writer.WritePages] with h's regions: what [Options].InUse takes.
func PageSums(ctx context.Context, ram [][]byte, h *Header, pages *pagemap.Bitmap, opts HashOptions) (*pagehash.Table, error) {
	sp, err := newSpace(ram, h)
	if err != nil {
		return nil, fmt.Errorf("hash pages: %w", err)
	}
	return pageSums(ctx, sp, pages, opts)
}

// PageSumsFrom is [PageSums] for pages read from src, as for
// [Writer.WritePagesFrom].
func PageSumsFrom(ctx context.Context, src io.ReaderAt, h *Header, pages *pagemap.Bitmap, opts HashOptions) (*pagehash.Table, error) {
	total, err := h.totalPages()
	if err != nil {
		return nil, fmt.Errorf("hash pages: %w", err)
	}
	return pageSums(ctx, &space{src: src, starts: []uint64{0, total}}, pages, opts)
}

func pageSums(ctx context.Context, sp *space, pages *pagemap.Bitmap, opts HashOptions) (*pagehash.Table, error) {
	total := sp.starts[len(sp.starts)-1]
	if pages.Len() != total {
		return nil, fmt.Errorf("hash pages: bitmap of %d pages, regions hold %d", pages.Len(), total)
	}
	if z := opts.Zeros; z != nil && z.Len() != total {
		return nil, fmt.Errorf("hash pages: zero-page bitmap of %d pages, regions hold %d", z.Len(), total)
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = cpus()
	}
	t := pagehash.New(pages)
	zero := pagehash.Filled(PageSize, 0)
	// Jobs are spans of the page space; ranks[j] is the rank of span j's
	// first page, where its hashes go.
	nJobs := (total + hashSpan - 1) / hashSpan
	ranks := make([]uint64, nJobs)
	var rank uint64
	for j := range ranks {
		ranks[j] = rank
		start := uint64(j) * hashSpan
		rank += pages.CountRange(start, min(hashSpan, total-start))
	}
	var (
		next     atomic.Uint64
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
			buf := make([]byte, PageSize)
			for {
				j := next.Add(1) - 1
				if j >= nJobs {
					return
				}
				if err := hashJob(ctx, sp, pages, opts.Zeros, zero, t.Sums, j, ranks[j], buf); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					next.Store(nJobs)
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return nil, fmt.Errorf("hash pages: %w", firstErr)
	}
	return t, nil
}

// hashJob hashes the pages of span j into sums from rank on.
func hashJob(ctx context.Context, sp *space, pages, zeros *pagemap.Bitmap, zero pagehash.Sum, sums []pagehash.Sum, j, rank uint64, buf []byte) (err error) {
	defer catchFault(&err)
	if err := ctx.Err(); err != nil {
		return err
	}
	start := j * hashSpan
	end := min(start+hashSpan, pages.Len())
	for p := start; p < end; {
		q, ok := pages.NextSet(p)
		if !ok || q >= end {
			break
		}
		e, _ := pages.NextClear(q)
		e = min(e, end)
		for ; q < e; q++ {
			switch {
			case zeros != nil && zeros.Test(q):
				sums[rank] = zero
			case sp.src == nil:
				mem, _ := sp.span(q, 1)
				sums[rank] = pagehash.Of(mem)
			default:
				if err := sp.read(buf, q); err != nil {
					return err
				}
				sums[rank] = pagehash.Of(buf)
			}
			rank++
		}
		p = e
	}
	return nil
}

// ComputePageSums returns the hashes of the pages r stores: from its
// chain section in version 4, else by reading and hashing every chunk,
// for a checkpoint saved before checkpoints kept hashes.
func (r *Reader) ComputePageSums(ctx context.Context, workers int) (*pagehash.Table, error) {
	if r.inUse != nil {
		return r.PageSums()
	}
	if workers <= 0 {
		workers = cpus()
	}
	t := pagehash.New(r.used.Clone())
	// Chunk i's pages are the saved pages from its first page on: their
	// hashes go from the rank of that page on.
	ranks := t.Pages.RankIndex()
	var (
		next     atomic.Int64
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	for range min(workers, len(r.chunks)) {
		wg.Go(func() {
			var b chunkBuffers
			for {
				i := int(next.Add(1) - 1)
				if i >= len(r.chunks) {
					return
				}
				err := ctx.Err()
				if err == nil {
					err = r.hashChunk(i, t, ranks, &b)
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					next.Store(int64(len(r.chunks)))
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return nil, fmt.Errorf("hash the pages of the checkpoint: %w", firstErr)
	}
	return t, nil
}

func (r *Reader) hashChunk(i int, t *pagehash.Table, ranks *pagemap.RankIndex, b *chunkBuffers) error {
	c := r.chunks[i]
	b.stored = grow(b.stored, c.StoredLen)
	if err := r.readAt(PartChunk, i, b.stored, c.Offset); err != nil {
		return err
	}
	b.raw = grow(b.raw, c.RawLen)
	if err := r.decodeChunk(i, b.stored, b.raw); err != nil {
		return err
	}
	rank := ranks.Rank(c.FirstPage)
	for k := range c.Pages {
		t.Sums[rank+k] = pagehash.Of(b.raw[k*PageSize : (k+1)*PageSize])
	}
	return nil
}

// PageSums returns the hashes of the pages the chain restores, those in
// use in its newest link: each from the link that stores the page, or the
// hash of a fill page for one that a link on the way did not have in
// use. Hashes missing from a link of an older version are computed from
// its chunks.
func (c *Chain) PageSums(ctx context.Context) (*pagehash.Table, error) {
	n := len(c.Links)
	t, err := c.Links[n-1].ComputePageSums(ctx, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", c.Paths[n-1], err)
	}
	fill := pagehash.Filled(PageSize, c.Links[0].h.FillByte)
	for i := n - 2; i >= 0; i-- {
		l := c.Links[i]
		own, err := l.PageSums()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c.Paths[i], err)
		}
		t = overlay(l.InUse(), own, t, fill)
	}
	return t, nil
}

// overlay returns the table over pages of a link that stores own and
// whose parent restores base: own's hash where it has one, else base's,
// else fill.
func overlay(pages *pagemap.Bitmap, own, base *pagehash.Table, fill pagehash.Sum) *pagehash.Table {
	t := pagehash.New(pages)
	oc, bc := own.Index(), base.Index()
	k := 0
	for start, count := range pages.Runs() {
		for p := start; p < start+count; p++ {
			if s, ok := oc.Get(p); ok {
				t.Sums[k] = s
			} else if s, ok := bc.Get(p); ok {
				t.Sums[k] = s
			} else {
				t.Sums[k] = fill
			}
			k++
		}
	}
	return t
}

package ramblock

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// Checkpoint is a checkpoint file read as guest memory, for looking into
// a saved guest (`kvmckpt ps FILE`): its regions are introspect.Backends
// (see [Checkpoint.Regions]). A saved page is decoded, with the rest of
// its chunk, on first use into a private mirror that stays valid until
// Close; a page the checkpoint does not hold (free in the guest, or zero)
// is absent: reading it fails, it is never invented as zeros.
type Checkpoint struct {
	r      *writer.Reader
	used   *pagemap.Bitmap
	chunks []int // chunk indices by first page
	starts []uint64
	sizes  []uint64

	mirror []byte
	loaded []atomic.Uint64 // a bit per page of the page space
	mu     sync.Mutex      // one chunk decoded at a time
	buf    []byte
	failed error // the first chunk that could not be read
	once   sync.Once
}

// OpenCheckpoint reads the checkpoint of r as guest memory. r must stay
// open until the Checkpoint is closed.
func OpenCheckpoint(r *writer.Reader) (*Checkpoint, error) {
	h := r.Header()
	c := &Checkpoint{r: r, used: r.Bitmap()}
	var total uint64
	for _, reg := range h.Regions {
		c.starts = append(c.starts, total)
		c.sizes = append(c.sizes, reg.Size)
		total += reg.Size / PageSize
	}
	if total != c.used.Len() || total == 0 {
		return nil, fmt.Errorf("checkpoint as guest memory: %w: regions of %d pages, bitmap of %d", ErrLayout, total, c.used.Len())
	}
	c.chunks = make([]int, r.NumChunks())
	for i := range c.chunks {
		c.chunks[i] = i
	}
	slices.SortFunc(c.chunks, func(a, b int) int { return cmp.Compare(r.Chunk(a).FirstPage, r.Chunk(b).FirstPage) })
	var err error
	// Reserved, not committed: only the chunks read take memory.
	if c.mirror, err = unix.Mmap(-1, 0, int(total*PageSize), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE); err != nil {
		return nil, fmt.Errorf("checkpoint as guest memory: %w", err)
	}
	c.loaded = make([]atomic.Uint64, (total+63)/64)
	return c, nil
}

// Regions returns a Backend per region of the checkpoint, in the header's
// order.
func (c *Checkpoint) Regions() []*CheckpointRegion {
	out := make([]*CheckpointRegion, len(c.starts))
	for i := range out {
		out[i] = &CheckpointRegion{c: c, first: c.starts[i], size: c.sizes[i]}
	}
	return out
}

// Err returns the first error met decoding a chunk: a corrupt checkpoint
// reads as absent pages, and this says why.
func (c *Checkpoint) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failed
}

// Close releases the mirror; the regions must not be used afterwards.
func (c *Checkpoint) Close() error {
	var err error
	c.once.Do(func() { err = unix.Munmap(c.mirror) })
	return err
}

// CheckpointRegion is one region of a [Checkpoint]: an introspect.Backend.
type CheckpointRegion struct {
	c     *Checkpoint
	first uint64 // first page in the page space
	size  uint64
}

// Size returns the region's size in bytes.
func (r *CheckpointRegion) Size() uint64 { return r.size }

// Bytes returns the n bytes at off if every page of them is saved in the
// checkpoint.
func (r *CheckpointRegion) Bytes(off, n uint64) ([]byte, bool) {
	if off > r.size || n > r.size-off {
		return nil, false
	}
	base := r.first * PageSize
	if n == 0 {
		return r.c.mirror[base+off : base+off], true
	}
	for p := r.first + off/PageSize; p <= r.first+(off+n-1)/PageSize; p++ {
		if !r.c.page(p) {
			return nil, false
		}
	}
	return r.c.mirror[base+off : base+off+n : base+off+n], true
}

// page makes page p of the page space readable in the mirror; false if the
// checkpoint does not hold it or its chunk cannot be read.
func (c *Checkpoint) page(p uint64) bool {
	w, bit := &c.loaded[p/64], uint64(1)<<(p%64)
	if w.Load()&bit != 0 {
		return true
	}
	if !c.used.Test(p) {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if w.Load()&bit != 0 {
		return true
	}
	// The chunk holding p: the last one starting at or before it.
	i, found := slices.BinarySearchFunc(c.chunks, p, func(ci int, p uint64) int {
		return cmp.Compare(c.r.Chunk(ci).FirstPage, p)
	})
	if !found {
		i--
	}
	if i < 0 {
		return false
	}
	ci := c.chunks[i]
	ch := c.r.Chunk(ci)
	data, err := c.r.ReadChunk(ci, c.buf)
	if err != nil {
		if c.failed == nil {
			c.failed = fmt.Errorf("chunk %d: %w", ci, err)
		}
		return false
	}
	c.buf = data
	q, ok := ch.FirstPage, true
	for k := range ch.Pages {
		if k > 0 {
			q, ok = c.used.NextSet(q + 1)
		}
		if !ok || !c.used.Test(q) {
			if c.failed == nil {
				c.failed = errors.New("a chunk holds more pages than its bitmap")
			}
			return false
		}
		copy(c.mirror[q*PageSize:(q+1)*PageSize], data[k*PageSize:(k+1)*PageSize])
		c.loaded[q/64].Or(uint64(1) << (q % 64))
	}
	return w.Load()&bit != 0
}

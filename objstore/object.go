package objstore

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Object is an object opened for reading: an io.ReaderAt that fetches
// ranges of one block size with ranged GETs, up to Parallel at once, and
// reads ahead when it is read in order (a restore), so the store's
// latency is paid once per Parallel blocks rather than per read. Every
// GET asks for the version opened (If-Match its ETag): an object
// replaced since is an error wrapping [ErrChanged], never a mix of two.
// It holds at most 2×Parallel blocks (of 8 MiB) and 4 spare buffers. It
// is safe for concurrent use.
type Object struct {
	s     *Store
	cli   *s3.Client
	loc   Location
	etag  string
	size  int64
	block int64

	ctx    context.Context
	cancel context.CancelFunc
	sem    chan struct{}

	mu     sync.Mutex
	blocks map[int64]*block
	spare  [][]byte // buffers of evicted blocks, for the next GETs
	last   int64    // the block read last, for read-ahead
	clock  uint64
	wg     sync.WaitGroup
}

// maxSpare is how many buffers of evicted blocks an Object keeps for the
// next GETs: enough for the fetches one read starts.
const maxSpare = 4

type block struct {
	done chan struct{}
	data []byte
	err  error
	used uint64 // when it was last read, for eviction
	// readers are the ReadAt calls copying out of data: a block is
	// evicted, and data reused, only when there are none. o.mu guards it.
	readers int
}

// Open opens the object at name (s3://BUCKET/KEY). A missing object is
// an error wrapping fs.ErrNotExist.
func (s *Store) Open(ctx context.Context, name string) (*Object, error) {
	loc, cli, err := s.locate(name)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	out, err := cli.HeadObject(rctx, &s3.HeadObjectInput{Bucket: aws.String(loc.Bucket), Key: aws.String(loc.Key)})
	if err != nil {
		return nil, explain(err, loc, "open")
	}
	if out.ContentLength == nil || *out.ContentLength < 0 {
		return nil, fmt.Errorf("open %s: the store gave no size", loc)
	}
	bs := s.cfg.PartSize
	if bs <= 0 {
		bs = defaultPartSize / 2
	}
	o := &Object{s: s, cli: cli, loc: loc, etag: aws.ToString(out.ETag), size: *out.ContentLength,
		block: bs, sem: make(chan struct{}, s.cfg.Parallel), blocks: map[int64]*block{}, last: -2}
	o.ctx, o.cancel = context.WithCancel(context.Background())
	return o, nil
}

// Size is the object's size when it was opened.
func (o *Object) Size() int64 { return o.size }

func (o *Object) String() string { return o.loc.String() }

// Close stops the reads ahead.
func (o *Object) Close() error {
	o.cancel()
	o.wg.Wait()
	return nil
}

// ReadAt reads len(p) bytes at off.
func (o *Object) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset", o.loc)
	}
	if off >= o.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if rest := o.size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	n := 0
	for n < len(want) {
		at := off + int64(n)
		i := at / o.block
		b := o.get(i) // counted as a reader
		select {
		case <-b.done:
		case <-o.ctx.Done():
			o.release(i, b, false)
			return n, fmt.Errorf("read %s: closed", o.loc)
		}
		if b.err != nil {
			o.release(i, b, true) // another read tries again
			return n, b.err
		}
		n += copy(want[n:], b.data[at-i*o.block:])
		o.release(i, b, false)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// View lends the n bytes at off out of a block, without copying, until
// release is called; ok is false for a range that crosses blocks or whose
// block could not be read (ReadAt then reads it, or says why not).
func (o *Object) View(off int64, n int) (b []byte, release func(), ok bool) {
	if off < 0 || n < 0 || off+int64(n) > o.size {
		return nil, nil, false
	}
	i := off / o.block
	if off+int64(n) > (i+1)*o.block {
		return nil, nil, false
	}
	blk := o.get(i)
	select {
	case <-blk.done:
	case <-o.ctx.Done():
		o.release(i, blk, false)
		return nil, nil, false
	}
	if blk.err != nil {
		o.release(i, blk, true)
		return nil, nil, false
	}
	at := off - i*o.block
	return blk.data[at : at+int64(n) : at+int64(n)], func() { o.release(i, blk, false) }, true
}

// release ends a read of block i; drop removes a failed block.
func (o *Object) release(i int64, b *block, drop bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	b.readers--
	if drop && o.blocks[i] == b {
		delete(o.blocks, i)
	}
}

// get returns block i, counted as read, fetching it if needed, and starts
// reading ahead when the reads go in order.
func (o *Object) get(i int64) *block {
	o.mu.Lock()
	defer o.mu.Unlock()
	b := o.fetch(i)
	b.readers++
	if i == o.last || i == o.last+1 {
		n := o.nblocks()
		for k := i + 1; k <= i+int64(o.s.cfg.Parallel) && k < n; k++ {
			o.fetch(k)
		}
	}
	if i > o.last {
		o.last = i
	}
	return b
}

func (o *Object) nblocks() int64 { return (o.size + o.block - 1) / o.block }

// fetch returns block i, starting its GET if it is not held. o.mu held.
func (o *Object) fetch(i int64) *block {
	o.clock++
	t := o.clock
	if b := o.blocks[i]; b != nil {
		b.used = t
		return b
	}
	o.evict()
	b := &block{done: make(chan struct{}), used: t}
	o.blocks[i] = b
	var buf []byte
	if k := len(o.spare); k > 0 {
		buf, o.spare = o.spare[k-1], o.spare[:k-1]
	}
	o.wg.Go(func() {
		defer close(b.done)
		select {
		case o.sem <- struct{}{}:
		case <-o.ctx.Done():
			b.err = fmt.Errorf("read %s: closed", o.loc)
			return
		}
		defer func() { <-o.sem }()
		b.data, b.err = o.getRange(buf, i*o.block, min(o.block, o.size-i*o.block))
	})
	return b
}

// evict drops finished blocks while 2×Parallel or more are held: first
// those behind the reads (the lowest first), which a restore is done
// with, then the least recently read; never a block being fetched, nor
// one read ahead and not yet read while an older one can go. o.mu held.
func (o *Object) evict() {
	for len(o.blocks) >= 2*o.s.cfg.Parallel {
		var victim int64 = -1
		behind := false
		for i, b := range o.blocks {
			select {
			case <-b.done:
			default:
				continue
			}
			if b.readers > 0 {
				continue
			}
			ib := i < o.last
			switch {
			case victim < 0,
				ib && !behind,
				ib && behind && i < victim,
				!ib && !behind && b.used < o.blocks[victim].used:
				victim, behind = i, ib
			}
		}
		if victim < 0 {
			return // all in flight or being read: bounded by the readers and the semaphore
		}
		if d := o.blocks[victim].data; cap(d) == int(o.block) && len(o.spare) < maxSpare {
			o.spare = append(o.spare, d[:0])
		}
		delete(o.blocks, victim)
	}
}

// getRange reads n bytes at off, of the version opened, into buf if it
// is big enough.
func (o *Object) getRange(buf []byte, off, n int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(o.ctx, o.s.cfg.Timeout)
	defer cancel()
	in := &s3.GetObjectInput{Bucket: aws.String(o.loc.Bucket), Key: aws.String(o.loc.Key),
		Range: aws.String(fmt.Sprintf("bytes=%d-%d", off, off+n-1))}
	if o.etag != "" {
		in.IfMatch = aws.String(o.etag)
	}
	out, err := o.cli.GetObject(ctx, in)
	if err != nil {
		return nil, explain(err, o.loc, "read")
	}
	defer out.Body.Close()
	if o.etag != "" && out.ETag != nil && *out.ETag != o.etag {
		return nil, fmt.Errorf("read %s: the object was overwritten since it was opened: %w", o.loc, ErrChanged)
	}
	if out.ContentLength != nil && *out.ContentLength != n {
		return nil, fmt.Errorf("read %s: asked for %d bytes at %d, the store sends %d: %w", o.loc, n, off, *out.ContentLength, ErrChanged)
	}
	if cap(buf) < int(o.block) {
		buf = make([]byte, o.block)
	}
	data := buf[:n]
	if _, err := io.ReadFull(out.Body, data); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return nil, fmt.Errorf("read %s: %d bytes at %d cut short: %w", o.loc, n, off, ErrChanged)
		}
		return nil, fmt.Errorf("read %s: %w", o.loc, err)
	}
	return data, nil
}

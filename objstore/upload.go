package objstore

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

const (
	defaultPartSize = 16 << 20
	minPartSize     = 5 << 20 // S3's least, but for the last part
	maxParts        = 9000    // of S3's 10,000, with room for a size hint that was low
	maxBuffered     = 256 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Upload is a multipart upload that becomes the object at its key only
// when Commit completes it: until then an older object of that key is
// what readers see, and Abort (or any failure) leaves no object. Parts
// are sent as they fill, Parallel at a time (fewer for parts so large
// that Parallel of them would pass 256 MiB), each with its CRC-32C, which
// the store checks. Write blocks while every part buffer is in flight, so
// an Upload holds at most one part more than it sends at once.
//
// An Upload is not safe for concurrent use; its parts are.
type Upload struct {
	s        *Store
	cli      *s3.Client
	loc      Location
	id       string
	partSize int

	ctx    context.Context
	cancel context.CancelFunc
	free   chan []byte // part buffers not in flight
	cur    []byte      // the part being filled
	wg     sync.WaitGroup

	mu    sync.Mutex
	parts []types.CompletedPart
	err   error // the first part's error, sticky

	sent     atomic.Int64 // bytes of parts the store took
	inFlight atomic.Int32
	busy     atomic.Int64 // ns with a part in flight
	busyFrom atomic.Int64 // when inFlight last went 0 → 1, ns since start
	start    time.Time

	done bool // committed or aborted
}

// Create starts a multipart upload to name (s3://BUCKET/KEY) of about
// sizeHint bytes, which sizes the parts.
func (s *Store) Create(ctx context.Context, name string, sizeHint int64) (*Upload, error) {
	loc, cli, err := s.locate(name)
	if err != nil {
		return nil, err
	}
	ps := s.cfg.PartSize
	if ps <= 0 {
		ps = defaultPartSize
	}
	ps = max(ps, minPartSize, (sizeHint+maxParts-1)/maxParts)
	ps = (ps + 1<<20 - 1) &^ (1<<20 - 1)
	if ps > 5<<30 {
		return nil, fmt.Errorf("upload %s: %d bytes are more than S3 takes in one object", loc, sizeHint)
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	out, err := cli.CreateMultipartUpload(rctx, &s3.CreateMultipartUploadInput{
		Bucket: aws.String(loc.Bucket), Key: aws.String(loc.Key),
		ChecksumAlgorithm: types.ChecksumAlgorithmCrc32c,
		ContentType:       aws.String("application/octet-stream"),
	})
	cancel()
	if err != nil {
		return nil, explain(err, loc, "start the upload of")
	}
	if out.UploadId == nil || *out.UploadId == "" {
		return nil, fmt.Errorf("start the upload of %s: the store gave no upload id", loc)
	}
	// Parts in flight: Parallel, fewer where parts are large (a guest of
	// terabytes), so that the buffers stay near maxBuffered.
	par := min(s.cfg.Parallel, max(2, maxBuffered/int(ps)))
	u := &Upload{s: s, cli: cli, loc: loc, id: *out.UploadId, partSize: int(ps),
		free: make(chan []byte, par+1), start: time.Now()}
	u.ctx, u.cancel = context.WithCancel(context.Background())
	for range par + 1 {
		u.free <- nil // allocated when first taken
	}
	return u, nil
}

func (u *Upload) String() string { return u.loc.String() + " (upload " + u.id + ")" }

// Write appends p to the object.
func (u *Upload) Write(p []byte) (int, error) {
	if u.done {
		return 0, fmt.Errorf("upload %s: written after it ended", u.loc)
	}
	n := 0
	for len(p) > 0 {
		if err := u.failed(); err != nil {
			return n, err
		}
		if u.cur == nil {
			if err := u.take(); err != nil {
				return n, err
			}
		}
		k := copy(u.cur[len(u.cur):cap(u.cur)], p)
		u.cur = u.cur[:len(u.cur)+k]
		n += k
		p = p[k:]
		if len(u.cur) == cap(u.cur) {
			u.send()
		}
	}
	return n, nil
}

// take waits for a free part buffer.
func (u *Upload) take() error {
	select {
	case b := <-u.free:
		if b == nil {
			b = make([]byte, 0, u.partSize)
		}
		u.cur = b[:0]
		return nil
	case <-u.ctx.Done():
		if err := u.failed(); err != nil {
			return err
		}
		return fmt.Errorf("upload %s: %w", u.loc, u.ctx.Err())
	}
}

func (u *Upload) failed() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.err
}

// send uploads the part being filled, in the background.
func (u *Upload) send() {
	b := u.cur
	u.cur = nil
	u.mu.Lock()
	num := int32(len(u.parts) + 1)
	u.parts = append(u.parts, types.CompletedPart{PartNumber: aws.Int32(num)})
	u.mu.Unlock()
	if u.inFlight.Add(1) == 1 {
		u.busyFrom.Store(int64(time.Since(u.start)))
	}
	u.wg.Go(func() {
		err := u.put(num, b)
		if u.inFlight.Add(-1) == 0 {
			u.busy.Add(int64(time.Since(u.start)) - u.busyFrom.Load())
		}
		if err != nil {
			u.mu.Lock()
			if u.err == nil {
				u.err = err
			}
			u.mu.Unlock()
			u.cancel() // the other parts need not go on
		} else {
			u.sent.Add(int64(len(b)))
		}
		u.free <- b[:0]
	})
}

// put sends part num, whose CRC-32C the store checks.
func (u *Upload) put(num int32, b []byte) error {
	sum := base64.StdEncoding.EncodeToString(binary.BigEndian.AppendUint32(nil, crc32.Checksum(b, castagnoli)))
	ctx, cancel := context.WithTimeout(u.ctx, u.s.cfg.Timeout)
	defer cancel()
	out, err := u.cli.UploadPart(ctx, &s3.UploadPartInput{
		Bucket: aws.String(u.loc.Bucket), Key: aws.String(u.loc.Key), UploadId: aws.String(u.id),
		PartNumber: aws.Int32(num), Body: bytes.NewReader(b), ContentLength: aws.Int64(int64(len(b))),
		ChecksumAlgorithm: types.ChecksumAlgorithmCrc32c, ChecksumCRC32C: aws.String(sum),
	})
	if err != nil {
		if errors.Is(u.ctx.Err(), context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("upload %s: part %d: %w", u.loc, num, context.Canceled)
		}
		return explain(err, u.loc, fmt.Sprintf("upload part %d of", num))
	}
	if out.ETag == nil {
		return fmt.Errorf("upload %s: part %d: the store gave no ETag", u.loc, num)
	}
	if out.ChecksumCRC32C != nil && *out.ChecksumCRC32C != sum {
		return fmt.Errorf("upload %s: part %d: the store holds CRC-32C %s, sent %s", u.loc, num, *out.ChecksumCRC32C, sum)
	}
	u.mu.Lock()
	u.parts[num-1].ETag, u.parts[num-1].ChecksumCRC32C = out.ETag, aws.String(sum)
	u.mu.Unlock()
	return nil
}

// Rate is the store's speed so far, in bytes per second of time with a
// part in flight (0 until a part is done): what a save's choice between
// compressing and not weighs against the CPU.
func (u *Upload) Rate() float64 {
	busy := u.busy.Load()
	if u.inFlight.Load() > 0 {
		busy += int64(time.Since(u.start)) - u.busyFrom.Load()
	}
	sent := u.sent.Load()
	if sent == 0 || busy <= 0 {
		return 0
	}
	return float64(sent) / time.Duration(busy).Seconds()
}

// Cancel stops the parts in flight and makes a blocked Write return an
// error; the upload is then fit only for Abort. It is safe to call from
// any goroutine.
func (u *Upload) Cancel() {
	u.mu.Lock()
	if u.err == nil {
		u.err = fmt.Errorf("upload %s: %w", u.loc, context.Canceled)
	}
	u.mu.Unlock()
	u.cancel()
}

// Commit sends the last part, waits for all, and completes the upload:
// the object appears whole at its key.
func (u *Upload) Commit() error {
	if u.done {
		return fmt.Errorf("upload %s: already ended", u.loc)
	}
	if u.cur != nil && len(u.cur) > 0 || len(u.parts) == 0 {
		if u.cur == nil {
			if err := u.take(); err != nil {
				u.Abort()
				return err
			}
		}
		u.send()
	}
	u.wg.Wait()
	if err := u.failed(); err != nil {
		u.Abort()
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.s.cfg.Timeout)
	defer cancel()
	parts := slices.Clone(u.parts)
	_, err := u.cli.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: aws.String(u.loc.Bucket), Key: aws.String(u.loc.Key), UploadId: aws.String(u.id),
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		err = explain(err, u.loc, "complete the upload of")
		u.Abort()
		return err
	}
	u.done = true
	u.cancel()
	return nil
}

// Abort stops the parts in flight and aborts the upload: the store drops
// its parts and the key keeps what it had.
func (u *Upload) Abort() error {
	if u.done {
		return nil
	}
	u.done = true
	u.cancel()
	u.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), u.s.cfg.Timeout)
	defer cancel()
	_, err := u.cli.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{
		Bucket: aws.String(u.loc.Bucket), Key: aws.String(u.loc.Key), UploadId: aws.String(u.id),
	})
	if err != nil {
		return fmt.Errorf("%w (the store drops the upload's parts when it expires them, or by a lifecycle rule on incomplete multipart uploads)", explain(err, u.loc, "abort the upload of"))
	}
	return nil
}

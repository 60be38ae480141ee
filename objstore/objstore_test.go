package objstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
)

// These tests run against a real SeaweedFS on the loopback (s3test),
// one server shared by the subtests that do not stop it.

func TestParse(t *testing.T) {
	l, err := Parse("s3://b/dir/k.kvmckpt")
	require.NoError(t, err)
	require.Equal(t, Location{"b", "dir/k.kvmckpt"}, l)
	require.Equal(t, "s3://b/dir/k.kvmckpt", l.String())
	for _, bad := range []string{"b/k", "s3://", "s3:///k", "s3://b", "s3://b/", "s3://b/dir/", "s3://b/" + strings.Repeat("k", 1025)} {
		_, err := Parse(bad)
		require.Error(t, err, bad)
	}
}

func randBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// put uploads data to name in writes of uneven sizes and commits.
func put(t *testing.T, s *Store, name string, data []byte) {
	t.Helper()
	u, err := s.Create(context.Background(), name, int64(len(data)))
	require.NoError(t, err)
	for off, k := 0, 1; off < len(data); k++ {
		n := min(len(data)-off, k*977_003%(3<<20)+1)
		_, err := u.Write(data[off : off+n])
		require.NoError(t, err)
		off += n
	}
	require.NoError(t, u.Commit())
	require.NoError(t, u.Abort(), "Abort after Commit does nothing")
}

func readAll(t *testing.T, s *Store, name string) []byte {
	t.Helper()
	o, err := s.Open(context.Background(), name)
	require.NoError(t, err)
	defer o.Close()
	b := make([]byte, o.Size())
	_, err = o.ReadAt(b, 0)
	require.NoError(t, err)
	return b
}

func TestStore(t *testing.T) {
	srv := s3test.StartT(t, "ckpt")
	s := New(Config{PartSize: 5 << 20, Parallel: 3})
	ctx := context.Background()

	t.Run("UploadAndRead", func(t *testing.T) {
		data := randBytes(23<<20+12345, 1)
		put(t, s, "s3://ckpt/a/one", data)
		o, err := s.Open(ctx, "s3://ckpt/a/one")
		require.NoError(t, err)
		defer o.Close()
		require.Equal(t, int64(len(data)), o.Size())
		// In order, in chunk-sized reads from two readers, as a restore.
		got := make([]byte, len(data))
		done := make(chan error, 2)
		for w := range 2 {
			go func() {
				for off := w << 20; off < len(data); off += 2 << 20 {
					end := min(off+1<<20, len(data))
					if _, err := o.ReadAt(got[off:end], int64(off)); err != nil {
						done <- err
						return
					}
				}
				done <- nil
			}()
		}
		require.NoError(t, <-done)
		require.NoError(t, <-done)
		require.True(t, bytes.Equal(data, got))
		// Lent without a copy within a block, refused across blocks and
		// past the end.
		v, release, ok := o.View(3<<20, 1<<20)
		require.True(t, ok)
		require.True(t, bytes.Equal(data[3<<20:4<<20], v))
		release()
		_, _, ok = o.View(o.block-10, 20)
		require.False(t, ok)
		_, _, ok = o.View(int64(len(data))-10, 20)
		require.False(t, ok)
		// Anywhere, and past the end.
		r := rand.New(rand.NewPCG(2, 2))
		for range 50 {
			off := r.IntN(len(data))
			n := r.IntN(3 << 20)
			b := make([]byte, n)
			k, err := o.ReadAt(b, int64(off))
			if off+n > len(data) {
				require.ErrorIs(t, err, io.EOF)
				require.Equal(t, len(data)-off, k)
			} else {
				require.NoError(t, err)
			}
			require.True(t, bytes.Equal(data[off:off+k], b[:k]))
		}
	})

	t.Run("EmptyAndTiny", func(t *testing.T) {
		put(t, s, "s3://ckpt/empty", nil)
		require.Empty(t, readAll(t, s, "s3://ckpt/empty"))
		put(t, s, "s3://ckpt/tiny", []byte("x"))
		require.Equal(t, []byte("x"), readAll(t, s, "s3://ckpt/tiny"))
	})

	t.Run("AbortKeepsOlder", func(t *testing.T) {
		old := randBytes(1<<20, 3)
		put(t, s, "s3://ckpt/keep", old)
		u, err := s.Create(ctx, "s3://ckpt/keep", 20<<20)
		require.NoError(t, err)
		_, err = u.Write(randBytes(12<<20, 4)) // two parts sent
		require.NoError(t, err)
		require.NoError(t, u.Abort())
		require.NoError(t, u.Abort())
		require.True(t, bytes.Equal(old, readAll(t, s, "s3://ckpt/keep")))
		_, err = u.Write([]byte("x"))
		require.Error(t, err)
		require.Error(t, u.Commit())
		// The store dropped the upload.
		cli := srv.Client(s3test.AccessKey, s3test.SecretKey)
		l, err := cli.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: aws.String("ckpt")})
		require.NoError(t, err)
		for _, up := range l.Uploads {
			require.NotEqual(t, u.id, aws.ToString(up.UploadId), "aborted upload still listed")
		}
		// A key never completed has no object.
		u, err = s.Create(ctx, "s3://ckpt/never", 1<<20)
		require.NoError(t, err)
		_, err = u.Write(old)
		require.NoError(t, err)
		require.NoError(t, u.Abort())
		_, err = s.Open(ctx, "s3://ckpt/never")
		require.ErrorIs(t, err, fs.ErrNotExist)
	})

	t.Run("PartsOfAHugeGuest", func(t *testing.T) {
		// 1 TiB: parts large enough for S3's 10,000, and few of them in
		// flight, so that the buffers stay near 256 MiB.
		u, err := s.Create(ctx, "s3://ckpt/huge", 1<<40)
		require.NoError(t, err)
		defer u.Abort()
		require.GreaterOrEqual(t, int64(u.partSize)*maxParts, int64(1<<40))
		require.LessOrEqual(t, cap(u.free)*u.partSize, 3*(1<<40/maxParts+1<<20))
		require.LessOrEqual(t, (cap(u.free)-1)*u.partSize, maxBuffered)
		// A small guest: 5 MiB parts as configured, three in flight.
		u2, err := s.Create(ctx, "s3://ckpt/small", 64<<20)
		require.NoError(t, err)
		defer u2.Abort()
		require.Equal(t, 5<<20, u2.partSize)
		require.Equal(t, 4, cap(u2.free))
	})

	t.Run("MissingObjectAndBucket", func(t *testing.T) {
		_, err := s.Open(ctx, "s3://ckpt/nothing-here")
		require.ErrorIs(t, err, fs.ErrNotExist)
		require.NoError(t, s.Check(ctx, "s3://ckpt/x"))
		err = s.Check(ctx, "s3://no-such-bucket/x")
		require.ErrorContains(t, err, `bucket "no-such-bucket" does not exist`)
		_, err = s.Create(ctx, "s3://no-such-bucket/x", 1)
		require.Error(t, err)
	})

	t.Run("WrongCredentials", func(t *testing.T) {
		t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
		bad := New(Config{})
		err := bad.Check(ctx, "s3://ckpt/x")
		require.ErrorContains(t, err, "refused the credentials")
		_, err = bad.Open(ctx, "s3://ckpt/keep")
		require.ErrorContains(t, err, "refused the credentials")
		_, err = bad.Create(ctx, "s3://ckpt/x", 1)
		require.ErrorContains(t, err, "refused the credentials")
	})

	t.Run("OverwrittenWhileOpen", func(t *testing.T) {
		put(t, s, "s3://ckpt/moving", randBytes(12<<20, 5))
		o, err := s.Open(ctx, "s3://ckpt/moving")
		require.NoError(t, err)
		defer o.Close()
		b := make([]byte, 100)
		_, err = o.ReadAt(b, 0)
		require.NoError(t, err)
		// Replaced by a shorter object of other bytes: a read of a
		// block not yet held fails, rather than mixing the two.
		put(t, s, "s3://ckpt/moving", randBytes(6<<20, 6))
		_, err = o.ReadAt(b, 10<<20)
		require.ErrorIs(t, err, ErrChanged)
		// Same size, other bytes.
		o2, err := s.Open(ctx, "s3://ckpt/moving")
		require.NoError(t, err)
		defer o2.Close()
		put(t, s, "s3://ckpt/moving", randBytes(6<<20, 7))
		_, err = o2.ReadAt(b, 0)
		require.ErrorIs(t, err, ErrChanged)
	})
}

// A server that dies mid-upload fails the upload, without hanging, and
// leaves no object: the older one survives the restart.
func TestServerStoppedMidUpload(t *testing.T) {
	srv := s3test.StartT(t, "ckpt")
	s := New(Config{PartSize: 5 << 20, Parallel: 2, Timeout: 20 * time.Second})
	ctx := context.Background()
	old := randBytes(1<<20, 8)
	put(t, s, "s3://ckpt/k", old)

	u, err := s.Create(ctx, "s3://ckpt/k", 100<<20)
	require.NoError(t, err)
	_, err = u.Write(randBytes(11<<20, 9))
	require.NoError(t, err)
	srv.Stop()
	start := time.Now()
	var werr error
	for range 20 {
		if _, werr = u.Write(randBytes(1<<20, 10)); werr != nil {
			break
		}
	}
	if werr == nil {
		werr = u.Commit()
	}
	require.Error(t, werr)
	t.Logf("failed after %v: %v", time.Since(start), werr)
	require.Less(t, time.Since(start), time.Minute)
	require.Error(t, u.Abort(), "the store is down: the abort cannot reach it and says so")

	require.NoError(t, srv.Restart())
	require.True(t, bytes.Equal(old, readAll(t, New(Config{}), "s3://ckpt/k")))
}

func TestExplain(t *testing.T) {
	loc := Location{"b", "k"}
	require.NoError(t, explain(nil, loc, "x"))
	err := explain(context.Canceled, loc, "read")
	require.True(t, errors.Is(err, context.Canceled))
}

// FuzzParse: a name parses to a bucket and key that give it back, or is
// refused; never a panic, never an empty bucket or key.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"s3://b/k", "s3://b/dir/k.kvmckpt", "s3://", "s3:///k", "s3://b/", "b/k", "s3://b//k"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		l, err := Parse(name)
		if err != nil {
			return
		}
		if l.Bucket == "" || l.Key == "" || strings.Contains(l.Bucket, "/") || strings.HasSuffix(l.Key, "/") {
			t.Fatalf("%q parsed to %+v", name, l)
		}
		if l.String() != name {
			t.Fatalf("%q parsed to %+v, which names %q", name, l, l.String())
		}
	})
}

// A store that hangs (stopped, its connections open) holds a Write only
// until Cancel, which a cancelled save calls; the abort then gives up
// after its timeout.
func TestHungStore(t *testing.T) {
	srv := s3test.StartT(t, "ckpt")
	s := New(Config{PartSize: 5 << 20, Parallel: 2, Timeout: 3 * time.Second})
	u, err := s.Create(context.Background(), "s3://ckpt/k", 100<<20)
	require.NoError(t, err)
	srv.Freeze()
	defer srv.Thaw()
	done := make(chan error, 1)
	go func() {
		var err error
		for err == nil {
			_, err = u.Write(randBytes(1<<20, 11))
		}
		done <- err
	}()
	time.Sleep(time.Second)
	start := time.Now()
	u.Cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
		require.Less(t, time.Since(start), 2*time.Second)
	case <-time.After(10 * time.Second):
		t.Fatal("Write still blocked 10 s after Cancel")
	}
	start = time.Now()
	require.Error(t, u.Abort())
	require.Less(t, time.Since(start), 30*time.Second)
}

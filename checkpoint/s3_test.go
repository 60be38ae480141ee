package checkpoint

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/objstore"
)

// TestObjectStorage saves a real guest into a real S3-compatible store
// (SeaweedFS on the loopback) and restores it from there into another
// QEMU, whose workload verifies its data: a whole checkpoint and an
// incremental child, both objects, the child's parent found beside it.
// A save the store cannot take (no bucket, wrong credentials) fails before
// the pause; one whose store dies mid-upload puts the guest back in its
// run state and leaves the older object of its key as it was; a changed
// byte of an object fails verify.
func TestObjectStorage(t *testing.T) {
	srv := s3test.StartT(t, "ckpt")
	objstore.Register(objstore.Config{}) // the endpoint from AWS_ENDPOINT_URL_S3
	cfg := vmtest.Config{MemMiB: 512, Workload: vmtest.Workload{Churn: 256, Anon: 48, Tmpfs: 32, Text: 16, Interval: 1}}
	g := vmtest.Boot(t, cfg)
	g.WaitReady(t)
	ctx := context.Background()
	profiles := t.TempDir()
	save := func(out, parent string, progress func(done, total uint64)) (*SaveResult, error) {
		return Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: profiles}, Output: out, Parent: parent, Progress: progress})
	}
	running := func() {
		t.Helper()
		assert.Equal(t, "running", g.Status(t).State)
	}

	_, err := save("s3://no-such-bucket/vm.kvmckpt", "", func(uint64, uint64) { t.Error("pages written for a bucket that does not exist") })
	require.ErrorContains(t, err, `bucket "no-such-bucket" does not exist`)
	running()
	t.Run("wrong credentials", func(t *testing.T) {
		t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
		objstore.Register(objstore.Config{})
		defer objstore.Register(objstore.Config{})
		_, err := save("s3://ckpt/vm/base.kvmckpt", "", func(uint64, uint64) { t.Error("pages written with wrong credentials") })
		require.ErrorContains(t, err, "refused the credentials")
		running()
	})

	base := "s3://ckpt/vm/base.kvmckpt"
	res, err := save(base, "", nil)
	require.NoError(t, err)
	t.Logf("save to %s: pause %d ms, %d MiB of pages, %d bytes", base, res.PauseMS, res.PagesSaved>>8, res.BytesWritten)
	assert.Equal(t, "running", res.GuestState)
	info, err := Inspect(base, nil, nil)
	require.NoError(t, err)
	assert.Equal(t, res.BytesWritten, info.FileBytes)
	require.NoError(t, Verify(base, nil, nil, nil))

	t.Run("store dies mid-upload", func(t *testing.T) {
		var once sync.Once
		_, err := save(base, "", func(uint64, uint64) { once.Do(srv.Stop) })
		require.Error(t, err)
		t.Logf("the save fails: %v", err)
		require.NoError(t, srv.Restart())
		running()
		again, err := Inspect(base, nil, nil)
		require.NoError(t, err)
		assert.Equal(t, info.ID, again.ID, "the older object of the key is untouched")
		require.NoError(t, Verify(base, nil, nil, nil))
	})

	child := "s3://ckpt/vm/d1.kvmckpt"
	cres, err := save(child, base, nil)
	require.NoError(t, err)
	require.NotNil(t, cres.Parent)
	t.Logf("child: %d of %d pages in use stored, %d bytes", cres.Parent.PagesChanged, cres.Parent.PagesInUse, cres.BytesWritten)
	assert.Less(t, cres.BytesWritten, res.BytesWritten)
	require.NoError(t, Verify(child, nil, nil, nil))

	// A new QEMU restored from the store: the chain's pages read with
	// ranged GETs straight into its RAM file.
	restoreVerified(t, cfg, child)

	// One byte of the object changed: the checkpoint's own checksums.
	cli := srv.Client(s3test.AccessKey, s3test.SecretKey)
	obj, err := cli.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("ckpt"), Key: aws.String("vm/base.kvmckpt")})
	require.NoError(t, err)
	b, err := io.ReadAll(obj.Body)
	obj.Body.Close()
	require.NoError(t, err)
	b[len(b)/2] ^= 0x40
	_, err = cli.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("ckpt"), Key: aws.String("vm/bad.kvmckpt"), Body: bytes.NewReader(b)})
	require.NoError(t, err)
	require.ErrorIs(t, Verify("s3://ckpt/vm/bad.kvmckpt", nil, nil, nil), ErrInvalid)
}

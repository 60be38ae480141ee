package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
)

// TestObjectStorageCommands: inspect, verify and flatten take s3://
// names, parents included (found beside the child, under the same
// prefix), with the store named by --s3-endpoint; a corrupt, missing or
// unreadable object gets the exit code and message a file would.
func TestObjectStorageCommands(t *testing.T) {
	srv := s3test.StartT(t, "ckpt")
	// The endpoint comes from the flag alone.
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
	ep := "--s3-endpoint=" + srv.Endpoint
	cli3 := srv.Client(s3test.AccessKey, s3test.SecretKey)
	put := func(key string, b []byte) {
		_, err := cli3.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String("ckpt"), Key: aws.String(key), Body: bytes.NewReader(b)})
		require.NoError(t, err)
	}
	dir := t.TempDir()
	base, d1 := writeChainFiles(t, dir)
	bb, err := os.ReadFile(base)
	require.NoError(t, err)
	db, err := os.ReadFile(d1)
	require.NoError(t, err)
	put("vms/base.kvmckpt", bb)
	put("vms/d1.kvmckpt", db)

	code, stdout, stderr := cli(t, "inspect", "s3://ckpt/vms/d1.kvmckpt", "--json", ep)
	require.Equal(t, exitOK, code, stderr)
	var info map[string]any
	require.NoError(t, json.Unmarshal([]byte(stdout), &info))
	assert.Equal(t, float64(len(db)), info["file_bytes"])
	assert.Contains(t, stdout, "s3://ckpt/vms/base.kvmckpt", "the parent is found beside the child")
	code, _, stderr = cli(t, "verify", "s3://ckpt/vms/d1.kvmckpt", ep)
	require.Equal(t, exitOK, code, stderr)

	// flatten from the store into the store: a multipart upload.
	code, _, stderr = cli(t, "flatten", "s3://ckpt/vms/d1.kvmckpt", "-o", "s3://ckpt/vms/flat.kvmckpt", ep)
	require.Equal(t, exitOK, code, stderr)
	code, _, stderr = cli(t, "verify", "s3://ckpt/vms/flat.kvmckpt", ep)
	require.Equal(t, exitOK, code, stderr)
	local := filepath.Join(dir, "flat.kvmckpt")
	code, _, stderr = cli(t, "flatten", d1, "-o", local)
	require.Equal(t, exitOK, code, stderr)
	want, err := os.ReadFile(local)
	require.NoError(t, err)
	got, err := cli3.GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String("ckpt"), Key: aws.String("vms/flat.kvmckpt")})
	require.NoError(t, err)
	var gb bytes.Buffer
	_, err = gb.ReadFrom(got.Body)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, gb.Bytes()), "the object is the file flatten writes locally")

	// One byte changed in the middle: the checkpoint's own checksums.
	bad := bytes.Clone(bb)
	bad[len(bad)/2] ^= 1
	put("vms/bad.kvmckpt", bad)
	code, _, stderr = cli(t, "verify", "s3://ckpt/vms/bad.kvmckpt", ep)
	assert.Equal(t, exitInvalid, code, stderr)
	// Cut short.
	put("vms/short.kvmckpt", bb[:len(bb)-100])
	code, _, stderr = cli(t, "inspect", "s3://ckpt/vms/short.kvmckpt", ep)
	assert.Equal(t, exitInvalid, code, stderr)
	// The parent gone: the child names it and --parent.
	put("lone/d1.kvmckpt", db)
	code, _, stderr = cli(t, "verify", "s3://ckpt/lone/d1.kvmckpt", ep)
	assert.Equal(t, exitInvalid, code)
	assert.Contains(t, stderr, "base.kvmckpt")
	code, _, stderr = cli(t, "verify", "s3://ckpt/lone/d1.kvmckpt", "--parent", "s3://ckpt/vms/base.kvmckpt", ep)
	assert.Equal(t, exitOK, code, stderr)
	// Missing object, missing bucket.
	code, _, stderr = cli(t, "verify", "s3://ckpt/vms/none.kvmckpt", ep)
	assert.NotEqual(t, exitOK, code)
	assert.Contains(t, stderr, "no such object")
	code, _, stderr = cli(t, "inspect", "s3://nobucket/x.kvmckpt", ep)
	assert.NotEqual(t, exitOK, code)
	assert.Contains(t, stderr, "nobucket")
	// Live saves write in place: refused before any guest is touched.
	code, _, stderr = cli(t, "save", "--qmp", "/nonexistent", "--live", "-o", "s3://ckpt/live.kvmckpt", ep)
	assert.NotEqual(t, exitOK, code)
	assert.Contains(t, stderr, "save it to a local file", "refused before the guest is reached")

	// Wrong credentials.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	code, _, stderr = cli(t, "verify", "s3://ckpt/vms/d1.kvmckpt", ep)
	assert.Equal(t, exitFailed, code, stderr)
	assert.Contains(t, stderr, "refused the credentials")
}

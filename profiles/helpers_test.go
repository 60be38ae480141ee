package profiles

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// testdataDir holds committed fixtures; see its gen-*.sh scripts.
const testdataDir = "../testdata/profiles"

func readTestdata(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(testdataDir, name))
	require.NoError(tb, err)
	return b
}

// Debian kernels the real-kernel tests use, relative to the kernel cache
// that `make deps` fills.
var testKernels = map[string]string{
	"amd64":       "linux-image-6.1.0-47-amd64-unsigned/boot/vmlinuz-6.1.0-47-amd64",
	"cloud-amd64": "linux-image-6.1.0-47-cloud-amd64-unsigned/boot/vmlinuz-6.1.0-47-cloud-amd64",
}

// RequiresKernel returns the path of a real Debian kernel image. Under
// -short it skips; otherwise a missing kernel is a failure, not a skip.
// KVMCKPT_KERNEL_DIR overrides the cache directory.
func RequiresKernel(tb testing.TB, flavor string) string {
	tb.Helper()
	if testing.Short() {
		tb.Skip("needs a real kernel image; skipped with -short")
	}
	dir := os.Getenv("KVMCKPT_KERNEL_DIR")
	if dir == "" {
		home, err := os.UserHomeDir()
		require.NoError(tb, err)
		dir = filepath.Join(home, ".cache", "kvmckpt", "kernels", "x")
	}
	rel, ok := testKernels[flavor]
	require.True(tb, ok, "unknown kernel flavor %q", flavor)
	path := filepath.Join(dir, rel)
	if _, err := os.Stat(path); err != nil {
		tb.Fatalf("kernel image %s is missing (%v): run `make deps` to download the test kernels, or set KVMCKPT_KERNEL_DIR", path, err)
	}
	return path
}

var (
	builtMu  sync.Mutex
	builtMap = map[string]*Profile{}
)

// kernelProfile builds (once per test binary) the profile of a real kernel.
func kernelProfile(tb testing.TB, flavor string) *Profile {
	tb.Helper()
	path := RequiresKernel(tb, flavor)
	builtMu.Lock()
	defer builtMu.Unlock()
	if p, ok := builtMap[flavor]; ok {
		return p
	}
	p, err := BuildFromImage(path)
	require.NoError(tb, err)
	builtMap[flavor] = p
	return p
}

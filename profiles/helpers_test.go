package profiles

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kvmckpt/kvmckpt/internal/cachedir"
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

// Debian kernel packages the real-kernel tests use (the committed profile
// fixtures were built from them), by the flavour `make deps` caches them
// under: $KVMCKPT_CACHE/kernels/FLAVOUR/{vmlinuz,package}.
var testKernels = map[string]string{
	"amd64":       "linux-image-6.1.0-47-amd64-unsigned",
	"cloud-amd64": "linux-image-6.1.0-47-cloud-amd64-unsigned",
	// bookworm-backports' 6.12 (see the Makefile's KERNELS).
	"6.12-amd64":       "linux-image-6.12.118+deb12-amd64-unsigned",
	"6.12-cloud-amd64": "linux-image-6.12.118+deb12-cloud-amd64-unsigned",
}

// RequiresKernel returns the path of a real Debian kernel image that
// `make deps` cached. Under -short it skips; otherwise a missing kernel, or
// another build than the fixtures were made from, is a failure.
func RequiresKernel(tb testing.TB, flavor string) string {
	tb.Helper()
	if testing.Short() {
		tb.Skip("needs a real kernel image; skipped with -short")
	}
	want, ok := testKernels[flavor]
	require.True(tb, ok, "unknown kernel flavor %q", flavor)
	dir, err := cachedir.Path("kernels", flavor)
	require.NoError(tb, err)
	path := filepath.Join(dir, "vmlinuz")
	if _, err := os.Stat(path); err != nil {
		tb.Fatalf("kernel image %s is missing (%v): run `make deps` to download the test kernels", path, err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "package")); strings.TrimSpace(string(got)) != want {
		tb.Fatalf("kernel %s is %q, the fixtures were made from %s: run `make deps`, or regenerate the fixtures (see realkernel_test.go)", path, strings.TrimSpace(string(got)), want)
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

package vmtest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// diskFileMiB is the size of each data file on a test disk.
const diskFileMiB = 16

// MakeDisk makes a raw disk image with an ext4 file system holding
// dataMiB of incompressible data files and SUMS (their SHA-256 digests),
// for Config.Disk and Workload.Files. It is removed with the test.
func MakeDisk(tb testing.TB, dataMiB int) string {
	tb.Helper()
	img, err := MakeDiskIn(tb.TempDir(), dataMiB)
	if err != nil {
		tb.Fatal(err)
	}
	return img
}

// MakeDiskIn makes such a disk image in dir and returns its path.
func MakeDiskIn(dir string, dataMiB int) (string, error) {
	src, err := os.MkdirTemp(dir, "disk-root-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(src)
	rng := rand.New(rand.NewChaCha8([32]byte{'k', 'v', 'm'}))
	buf := make([]byte, diskFileMiB<<20)
	var sums strings.Builder
	for i := 0; i*diskFileMiB < dataMiB; i++ {
		for j := 0; j < len(buf); j += 8 {
			v := rng.Uint64()
			for k := 0; k < 8; k++ {
				buf[j+k] = byte(v >> (8 * k))
			}
		}
		name := fmt.Sprintf("data-%03d.bin", i)
		if err := os.WriteFile(filepath.Join(src, name), buf, 0o644); err != nil {
			return "", err
		}
		sum := sha256.Sum256(buf)
		fmt.Fprintf(&sums, "%s %s\n", hex.EncodeToString(sum[:]), name)
	}
	if err := os.WriteFile(filepath.Join(src, "SUMS"), []byte(sums.String()), 0o644); err != nil {
		return "", err
	}
	img := filepath.Join(dir, fmt.Sprintf("disk-%dM.img", dataMiB))
	size := dataMiB + dataMiB/8 + 32
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		mkfs = "/usr/sbin/mkfs.ext4"
	}
	out, err := exec.Command(mkfs, "-q", "-F", "-L", "kwdata", "-d", src, img, fmt.Sprintf("%dM", size)).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("mkfs.ext4: %v\n%s", err, out)
	}
	return img, nil
}

// MakeScratch makes an empty ext4 file system of sizeMiB in a sparse
// file, for Config.Scratch, removed with the test. Its inode tables and
// journal are initialised now, so that the guest's kernel writes nothing
// behind the test's back.
func MakeScratch(tb testing.TB, sizeMiB int) string {
	tb.Helper()
	img := filepath.Join(tb.TempDir(), "scratch.img")
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		mkfs = "/usr/sbin/mkfs.ext4"
	}
	out, err := exec.Command(mkfs, "-q", "-F", "-L", "kwscratch", "-E", "lazy_itable_init=0,lazy_journal_init=0", img, fmt.Sprintf("%dM", sizeMiB)).CombinedOutput()
	if err != nil {
		tb.Fatalf("mkfs.ext4 %s: %v\n%s", img, err, out)
	}
	return img
}

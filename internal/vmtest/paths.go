package vmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/cachedir"
)

// CacheDir is kvmckpt's cache (see [cachedir.Dir]), where `make deps`
// keeps the test kernels and emulators.
func CacheDir() string {
	d, err := cachedir.Dir()
	if err != nil {
		// Only without HOME and KVMCKPT_CACHE; every path below it
		// then fails to resolve with a message naming it.
		return filepath.Join(os.TempDir(), "kvmckpt-no-cache")
	}
	return d
}

// KernelPath resolves a kernel flavour ("amd64", "cloud-amd64") cached by
// `make deps`, or a path, to the bzImage's path. Empty means
// $KVMCKPT_KERNEL, else "amd64".
func KernelPath(kernel string) (string, error) {
	if kernel == "" {
		kernel = os.Getenv("KVMCKPT_KERNEL")
	}
	if kernel == "" {
		kernel = "amd64"
	}
	path := kernel
	if !strings.Contains(kernel, "/") {
		path = filepath.Join(CacheDir(), "kernels", kernel, "vmlinuz")
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("kernel %s: %w", path, ErrNotFound)
	}
	return path, nil
}

// KernelPackage names the Debian package a cached kernel flavour came from.
func KernelPackage(flavour string) string {
	b, _ := os.ReadFile(filepath.Join(CacheDir(), "kernels", flavour, "package"))
	return strings.TrimSpace(string(b))
}

// ModuleRoot finds the kvmckpt source tree from the working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/kvmckpt/kvmckpt") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("kvmckpt module root: %w", ErrNotFound)
		}
		dir = parent
	}
}

// InitramfsPath is $KVMCKPT_INITRAMFS, else build/initramfs.cpio.gz at the
// module root.
func InitramfsPath() (string, error) {
	path := os.Getenv("KVMCKPT_INITRAMFS")
	if path == "" {
		root, err := ModuleRoot()
		if err != nil {
			return "", err
		}
		path = filepath.Join(root, "build", "initramfs.cpio.gz")
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("initramfs %s: %w", path, ErrNotFound)
	}
	return path, nil
}

var accel struct {
	once sync.Once
	name string
}

// Accel picks QEMU's accelerator: $KVMCKPT_ACCEL when set ("kvm" or "tcg"),
// else "kvm" only when it really works, else "tcg". A /dev/kvm node alone
// proves nothing (on some hosts KVM guests hang), so KVM must also be
// advertised by the host CPU (vmx or svm) and pass a bounded probe: a guest
// kernel has to print its banner within a few seconds.
func Accel() string {
	accel.once.Do(func() {
		if a := os.Getenv("KVMCKPT_ACCEL"); a != "" {
			accel.name = a
			return
		}
		accel.name = "tcg"
		if kvmUsable() {
			accel.name = "kvm"
		}
	})
	return accel.name
}

func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !regexp.MustCompile(`(?m)^flags\s*:.*\b(vmx|svm)\b`).Match(cpuinfo) {
		return false
	}
	kernel, err := KernelPath("")
	if err != nil {
		return false
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, qemu, "-machine", "pc,accel=kvm", "-m", "256M",
		"-kernel", kernel, "-append", "console=ttyS0 panic=-1",
		"-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio").Output()
	return strings.Contains(string(out), "Linux version")
}

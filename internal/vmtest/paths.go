package vmtest

import (
	"context"
	"encoding/json"
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

// QEMUPath resolves an emulator setting (see [Config.QEMU]) to a program:
// "" is qemu-system-x86_64 in PATH; a version ("10.0") is the wrapper
// `make deps` writes at $KVMCKPT_CACHE/qemu/VERSION/bin, which runs the
// unpacked emulator with its own firmware; a path is itself.
func QEMUPath(qemu string) (string, error) {
	switch {
	case qemu == "":
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return "", fmt.Errorf("qemu-system-x86_64: %w", ErrNotFound)
		}
		return p, nil
	case strings.Contains(qemu, "/"):
		return qemu, nil
	}
	p := filepath.Join(CacheDir(), "qemu", qemu, "bin", "qemu-system-x86_64")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("QEMU %s at %s: %w", qemu, p, ErrNotFound)
	}
	return p, nil
}

// QEMUVersion is the Debian package version of an emulator setting: the
// cached one's version file, or the system package's.
func QEMUVersion(qemu string) string {
	if qemu != "" && !strings.Contains(qemu, "/") {
		b, _ := os.ReadFile(filepath.Join(CacheDir(), "qemu", qemu, "version"))
		return strings.TrimSpace(string(b))
	}
	out, _ := exec.Command("dpkg-query", "-W", "-f=${Version}", "qemu-system-x86").Output()
	return strings.TrimSpace(string(out))
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

// MatrixRecord is one check that passed on one cell of the version
// matrix, as the tests record it for the README's table.
type MatrixRecord struct {
	QEMU    string `json:"qemu"`
	Kernel  string `json:"kernel"`
	Machine string `json:"machine"`
	Check   string `json:"check"`
}

// MatrixFile is where tests record the matrix cells they passed:
// build/test-matrix.jsonl at the module root, emptied by `make test`.
func MatrixFile() (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "build", "test-matrix.jsonl"), nil
}

var matrixMu sync.Mutex

// RecordMatrix appends a passed check of the guest's cell to
// [MatrixFile]. Errors are ignored: the record is a report, not a test.
func RecordMatrix(cfg Config, check string) {
	kernel := cfg.Kernel
	if kernel == "" {
		kernel = os.Getenv("KVMCKPT_KERNEL")
	}
	if kernel == "" {
		kernel = "amd64"
	}
	pkg := KernelPackage(kernel)
	if pkg == "" {
		pkg = kernel
	}
	machine := cfg.Machine
	if machine == "" {
		machine = "pc"
	}
	rec := MatrixRecord{QEMU: QEMUVersion(cfg.QEMU), Kernel: strings.TrimSuffix(strings.TrimPrefix(pkg, "linux-image-"), "-unsigned"), Machine: machine, Check: check}
	b, err := json.Marshal(rec)
	if err != nil {
		return
	}
	path, err := MatrixFile()
	if err != nil {
		return
	}
	matrixMu.Lock()
	defer matrixMu.Unlock()
	_ = os.MkdirAll(filepath.Dir(path), 0o755)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	f.Write(append(b, '\n'))
}

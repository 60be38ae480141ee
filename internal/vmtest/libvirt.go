package vmtest

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The libvirt test bed: a system daemon (libvirtd and virtlogd, from
// Debian's libvirt-daemon-system), started by the tests if it is not
// running and stopped by [Main] if they started it, and transient TCG
// domains booting the test kernel and initramfs.

var (
	libvirtMu      sync.Mutex
	libvirtStarted []string // pid files of the daemons the tests started
)

// RequiresLibvirt makes sure a libvirt daemon answers on qemu:///system,
// starting virtlogd and libvirtd if none does. It fails the test if
// libvirt is not installed (`make deps` installs it) or not root.
func RequiresLibvirt(tb testing.TB) {
	tb.Helper()
	RequiresQEMU(tb)
	libvirtMu.Lock()
	defer libvirtMu.Unlock()
	if libvirtAnswers() {
		return
	}
	if os.Geteuid() != 0 {
		tb.Fatal("the libvirt tests need root, to run the system daemon")
	}
	for _, d := range []struct{ bin, pid string }{{"virtlogd", "/run/virtlogd.pid"}, {"libvirtd", "/run/libvirtd.pid"}} {
		path, err := exec.LookPath(d.bin)
		if err != nil {
			if p := "/usr/sbin/" + d.bin; fileExists(p) {
				path = p
			} else {
				tb.Fatalf("%s not found: run `make deps` (libvirt-daemon-system)", d.bin)
			}
		}
		if out, err := exec.Command(path, "-d").CombinedOutput(); err != nil {
			tb.Fatalf("start %s: %v\n%s", d.bin, err, out)
		}
		libvirtStarted = append(libvirtStarted, d.pid)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !libvirtAnswers() {
		if time.Now().After(deadline) {
			tb.Fatal("libvirtd started but does not answer on qemu:///system")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func libvirtAnswers() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "virsh", "-c", "qemu:///system", "version").Run() == nil
}

// stopLibvirt stops the daemons the tests started.
func stopLibvirt() {
	libvirtMu.Lock()
	defer libvirtMu.Unlock()
	for i := len(libvirtStarted) - 1; i >= 0; i-- {
		b, err := os.ReadFile(libvirtStarted[i])
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err == nil && pid > 1 {
			if p, err := os.FindProcess(pid); err == nil {
				p.Signal(os.Interrupt)
			}
		}
	}
	libvirtStarted = nil
}

// Domain is a transient libvirt domain booted by a test. Its Guest has
// the serial log (Serial, WaitSerial, WaitReady); QMPPath and RAMPath are
// empty: libvirt owns the monitor, the RAM is QEMU's own.
type Domain struct {
	*Guest
	Name string
	Dir  string // holds the kernel, initramfs and serial log, readable by libvirt's QEMU user
}

// Virsh runs virsh on qemu:///system and returns its output.
func Virsh(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := VirshErr(args...)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// VirshErr is [Virsh] that returns the error.
func VirshErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", "qemu:///system"}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out.String(), nil
}

// BootDomain creates a transient domain (<domain type='qemu'>: TCG) like
// cfg, with QEMU's default RAM, and removes it when the test ends.
// Only Machine, CPUs, MemMiB, Kernel, Workload and Append are used; QEMU
// is bookworm's, the one libvirt uses.
func BootDomain(tb testing.TB, cfg Config) *Domain {
	tb.Helper()
	RequiresLibvirt(tb)
	cfg = cfg.withDefaults()
	kernel, err := KernelPath(cfg.Kernel)
	if err != nil {
		tb.Fatal(err)
	}
	initrd, err := InitramfsPath()
	if err != nil {
		tb.Fatal(err)
	}
	// libvirt runs QEMU as its own user: the files go where it can read
	// them, not under root's home.
	dir, err := os.MkdirTemp("/var/tmp", "kvmckpt-domain-")
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	d := &Domain{Name: fmt.Sprintf("kvmckpt-test-%d-%d", os.Getpid(), seq.Add(1)), Dir: dir}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("serial console of domain %s (last lines):\n%s", d.Name, d.SerialTail(30))
		}
		d.Destroy()
		os.RemoveAll(dir)
	})
	if initrd, err = withModules(kernel, initrd, dir); err != nil {
		tb.Fatal(err)
	}
	for _, f := range [][2]string{{kernel, "vmlinuz"}, {initrd, "initramfs"}} {
		if err := copyFile(f[0], filepath.Join(dir, f[1])); err != nil {
			tb.Fatal(err)
		}
	}
	d.Guest = &Guest{Config: cfg, SerialPath: filepath.Join(dir, "serial.log"), done: make(chan struct{})}
	appendLine := append([]string{"console=ttyS0", "quiet", "panic=-1"}, cfg.Workload.args()...)
	appendLine = append(appendLine, cfg.Append...)
	var b bytes.Buffer
	esc := func(s string) string {
		var e bytes.Buffer
		xml.EscapeText(&e, []byte(s))
		return e.String()
	}
	fmt.Fprintf(&b, `<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>%d</memory>
  <vcpu>%d</vcpu>
  <os>
    <type arch='x86_64' machine='%s'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>%s</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='%s' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`, esc(d.Name), cfg.MemMiB, cfg.CPUs, esc(cfg.Machine), esc(filepath.Join(dir, "vmlinuz")), esc(filepath.Join(dir, "initramfs")),
		esc(strings.Join(appendLine, " ")), esc(d.SerialPath))
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, b.Bytes(), 0o644); err != nil {
		tb.Fatal(err)
	}
	Virsh(tb, "create", xmlPath)
	return d
}

// Destroy stops the domain if it runs; a transient domain is then gone.
func (d *Domain) Destroy() {
	_, _ = VirshErr("destroy", d.Name)
}

// State returns the domain's state as virsh domstate prints it.
func (d *Domain) State(tb testing.TB) string {
	tb.Helper()
	return strings.TrimSpace(Virsh(tb, "domstate", d.Name))
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

package qmp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrLibvirt means a libvirt domain's QMP monitor could not be reached.
var ErrLibvirt = errors.New("libvirt domain not reachable")

// Where Debian's libvirt-clients-qemu installs libvirt's QMP proxy, and the
// interpreter it needs: the system's, which has the libvirt modules
// (python3-libvirt), whatever python3 is first in PATH.
var (
	LibvirtProxy  = "/usr/bin/virt-qemu-qmp-proxy"
	libvirtPython = "/usr/bin/python3"
)

// DialLibvirt connects to the QMP monitor of a running libvirt domain
// through libvirt itself: libvirt owns the domain's monitor socket, and a
// second client of it gets no greeting. It runs libvirt's
// virt-qemu-qmp-proxy (package libvirt-clients-qemu), which serves a QMP
// socket for the domain and forwards commands, and file descriptors,
// through the daemon (virDomainQemuMonitorCommandWithFiles, one
// descriptor per command). The proxy serves this session alone, on a
// socket in a directory of its own, and ends with it.
//
// uri is the libvirt connection ("" for libvirt's default, for root
// qemu:///system); it must name this host's daemon, as kvmckpt reads the
// QEMU process's memory. The session's [Session.PeerPID] is the domain's
// QEMU process, from libvirt's pid file for it, checked against the
// process's command line.
//
// libvirt marks a domain whose monitor was used this way as tainted
// ("custom-monitor" in its log and status); nothing else changes.
func DialLibvirt(ctx context.Context, uri, domain string) (*Session, error) {
	if domain == "" || strings.ContainsAny(domain, "/\x00") {
		return nil, fmt.Errorf("%w: domain name %q", ErrLibvirt, domain)
	}
	pid, err := libvirtQEMUPid(uri, domain)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(LibvirtProxy); err != nil {
		return nil, fmt.Errorf("%w: %v; install libvirt's QMP proxy (apt install libvirt-clients-qemu)", ErrLibvirt, err)
	}
	dir, err := os.MkdirTemp("", "kvmckpt-libvirt-")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLibvirt, err)
	}
	sock := filepath.Join(dir, "qmp.sock")
	args := []string{LibvirtProxy}
	if uri != "" {
		args = append(args, "--connect", uri)
	}
	args = append(args, "--", domain, sock)
	cmd := exec.Command(libvirtPython, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("%w: start %s: %w", ErrLibvirt, LibvirtProxy, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(2 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		os.RemoveAll(dir)
	}
	fail := func(err error) (*Session, error) {
		stop()
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			if len(msg) > 2000 {
				msg = msg[len(msg)-2000:]
			}
			err = fmt.Errorf("%w; the proxy said: %s", err, msg)
		}
		return nil, err
	}
	deadline := time.Now().Add(HandshakeTimeout)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-exited:
			return fail(fmt.Errorf("%w: libvirt's QMP proxy for domain %q ended", ErrLibvirt, domain))
		case <-ctx.Done():
			return fail(ctxErr(ctx))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("%w: libvirt's QMP proxy for domain %q did not listen within %v", ErrLibvirt, domain, HandshakeTimeout))
		}
	}
	s, err := Dial(ctx, sock)
	if err != nil {
		return fail(err)
	}
	s.pid = pid
	s.onClose = stop
	s.label = "libvirt domain " + domain
	return s, nil
}

// libvirtQEMUPid returns the pid of the domain's QEMU process from the
// pid file libvirt keeps in its state directory, checked against the
// process's command line (-name guest=NAME).
func libvirtQEMUPid(uri, domain string) (int, error) {
	var dir string
	switch uri {
	case "", "qemu:///system":
		if os.Geteuid() != 0 && uri == "" {
			dir = filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "libvirt/qemu/run")
		} else {
			dir = "/run/libvirt/qemu"
		}
	case "qemu:///session":
		dir = filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "libvirt/qemu/run")
	default:
		return 0, fmt.Errorf("%w: connection %q: kvmckpt reads the guest's RAM from its QEMU process, so it runs on the domain's host with qemu:///system or qemu:///session", ErrLibvirt, uri)
	}
	path := filepath.Join(dir, domain+".pid")
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("%w: %w (is domain %q running? give its name, as `virsh list` shows it)", ErrLibvirt, err, domain)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%w: pid file %s holds %q", ErrLibvirt, path, b)
	}
	argv, err := ProcessCmdline(pid)
	if err != nil {
		return 0, fmt.Errorf("%w: QEMU of domain %q (pid %d): %w", ErrLibvirt, domain, pid, err)
	}
	for i, a := range argv {
		if a == "-name" && i+1 < len(argv) {
			for _, f := range strings.Split(argv[i+1], ",") {
				if f == "guest="+domain {
					return pid, nil
				}
			}
		}
	}
	return 0, fmt.Errorf("%w: process %d of pid file %s is not the QEMU of domain %q", ErrLibvirt, pid, path, domain)
}

// maxDomainXML bounds a domain XML read from virsh.
const maxDomainXML = 16 << 20

// LibvirtDomainXML returns the domain's XML as libvirt puts it in a save
// image (virsh dumpxml --inactive --security-info --migratable; libvirt's
// qemuSaveImageCreate uses those flags), from virsh.
func LibvirtDomainXML(ctx context.Context, uri, domain string) ([]byte, error) {
	out, err := virsh(ctx, uri, 30*time.Second, "dumpxml", "--inactive", "--security-info", "--migratable", "--", domain)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLibvirt, err)
	}
	return []byte(out), nil
}

// limitedBuffer fails writes past its limit.
type limitedBuffer struct {
	b     *bytes.Buffer
	limit int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if l.b.Len()+len(p) > l.limit {
		return 0, fmt.Errorf("more than %d bytes", l.limit)
	}
	return l.b.Write(p)
}

// virsh runs virsh on the connection uri and returns its output.
func virsh(ctx context.Context, uri string, timeout time.Duration, args ...string) (string, error) {
	name := args[0]
	if uri != "" {
		args = append([]string{"--connect", uri}, args...)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", args...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &limitedBuffer{&out, maxDomainXML}, &limitedBuffer{&stderr, 1 << 20}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		return "", fmt.Errorf("virsh %s: %w: %s", name, err, msg)
	}
	return out.String(), nil
}

// LibvirtDomainState returns the domain's state as virsh domstate prints
// it ("running", "paused", "shut off", ...), or "" if libvirt has no
// such domain.
func LibvirtDomainState(ctx context.Context, uri, domain string) (string, error) {
	out, err := virsh(ctx, uri, 30*time.Second, "domstate", "--", domain)
	if err != nil {
		if strings.Contains(err.Error(), "failed to get domain") || strings.Contains(err.Error(), "Domain not found") {
			return "", nil
		}
		return "", fmt.Errorf("%w: %w", ErrLibvirt, err)
	}
	return strings.TrimSpace(out), nil
}

// LibvirtRestore has libvirt restore the save image at path (virsh
// restore): it starts the domain the image's XML describes, running or
// paused. The file must be readable by the daemon.
func LibvirtRestore(ctx context.Context, uri, path string, paused bool) error {
	state := "--running"
	if paused {
		state = "--paused"
	}
	if _, err := virsh(ctx, uri, 10*time.Minute, "restore", state, "--", path); err != nil {
		return fmt.Errorf("%w: %w", ErrLibvirt, err)
	}
	return nil
}

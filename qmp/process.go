package qmp

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// PeerPID returns the PID of the process serving the unix socket at path
// ("unix:PATH" or PATH): for a QMP socket, the QEMU process. The kernel
// records it when the server calls listen(2), so it cannot be spoofed by
// the peer (SO_PEERCRED, unix(7)); a manager that creates the listening
// socket and hands it to QEMU (as libvirt can) is reported instead.
//
// PeerPID opens a connection of its own. QEMU queues it behind a QMP client
// that is already connected and drops it once that client leaves; use
// [Session.PeerPID] to ask about the connection a session already has.
func PeerPID(path string) (int, error) {
	addr := strings.TrimPrefix(path, "unix:")
	c, err := net.Dial("unix", addr)
	if err != nil {
		return 0, fmt.Errorf("dial socket %s: %w", addr, err)
	}
	defer c.Close()
	pid, err := peerPID(c.(*net.UnixConn))
	if err != nil {
		return 0, fmt.Errorf("read peer of %s: %w", addr, err)
	}
	return pid, nil
}

// PeerPID returns the PID of the QEMU process at the other end of the
// session's connection.
func (s *Session) PeerPID() (int, error) {
	if s.pid != 0 {
		return s.pid, nil // the domain's QEMU, not libvirt's proxy
	}
	pid, err := peerPID(s.conn)
	if err != nil {
		return 0, fmt.Errorf("read peer of %s: %w", s.path, err)
	}
	return pid, nil
}

func peerPID(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	if cred.Pid <= 0 {
		return 0, errors.New("SO_PEERCRED: no peer process")
	}
	return int(cred.Pid), nil
}

// maxCmdline bounds how much of /proc/PID/cmdline is read. Linux limits
// the arguments and environment of exec together to a quarter of the
// stack limit, a few MiB at most.
const maxCmdline = 16 << 20

// ProcessCmdline returns the command line of process pid, one string per
// argument, from /proc/PID/cmdline.
func ProcessCmdline(pid int) ([]string, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("read command line: invalid pid %d", pid)
	}
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, fmt.Errorf("read command line of pid %d: %w", pid, err)
	}
	defer f.Close()
	args, err := parseCmdline(f)
	if err != nil {
		return nil, fmt.Errorf("read command line of pid %d: %w", pid, err)
	}
	return args, nil
}

// parseCmdline splits the NUL-separated arguments of a /proc/PID/cmdline
// file. An empty file (a zombie or a kernel thread) is an error.
func parseCmdline(r io.Reader) ([]string, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxCmdline+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxCmdline {
		return nil, fmt.Errorf("command line longer than %d bytes", maxCmdline)
	}
	if len(b) == 0 {
		return nil, errors.New("empty command line (process exited or is a kernel thread)")
	}
	b = bytes.TrimSuffix(b, []byte{0})
	return strings.Split(string(b), "\x00"), nil
}

// ProcessStart returns when process pid started, in clock ticks after the
// host booted (field 22 of /proc/PID/stat, proc(5)). With the pid it names
// one process for the life of the boot, where a pid alone may be reused.
func ProcessStart(pid int) (uint64, error) {
	if pid <= 0 {
		return 0, fmt.Errorf("read start time: invalid pid %d", pid)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("read start time of pid %d: %w", pid, err)
	}
	start, err := parseStatStart(b)
	if err != nil {
		return 0, fmt.Errorf("read start time of pid %d: %w", pid, err)
	}
	return start, nil
}

// parseStatStart takes the start time out of a /proc/PID/stat line. The
// command name, field 2, is in parentheses and may hold spaces and
// parentheses itself, so fields are counted from after the last ')'.
func parseStatStart(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("no command name in stat")
	}
	f := strings.Fields(string(b[i+1:]))
	const startField = 22 - 3 // fields after the name begin at field 3
	if len(f) <= startField {
		return 0, fmt.Errorf("stat has %d fields after the name, want more than %d", len(f), startField)
	}
	return strconv.ParseUint(f[startField], 10, 64)
}

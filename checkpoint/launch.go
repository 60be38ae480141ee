package checkpoint

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// LaunchOptions say how to start a restore target from the command line
// recorded in a checkpoint.
type LaunchOptions struct {
	RestoreOptions
	// RAMDir holds the new RAM file and QMP socket; empty means /dev/shm.
	RAMDir string
	// QEMU is the emulator to run; empty means the recorded program's
	// name looked up in PATH (see [qemuBinary]).
	QEMU string
}

// Launched is the QEMU a launch started. It keeps running after kvmckpt
// ends.
type Launched struct {
	PID int    `json:"pid"`
	QMP string `json:"qmp"`
	// RAMFile is the first RAM file; RAMFiles all of them, one per
	// memory-backend-file of the recorded command line (a NUMA guest has
	// one per node); none for a guest whose RAM is QEMU's own memory.
	RAMFile  string   `json:"ram_file"`
	RAMFiles []string `json:"ram_files"`
	Log      string   `json:"log"`
	Args     []string `json:"args"`
	// Paths maps every other path of the recorded command line that the
	// copy would have shared with the source (sockets, files, the pid
	// file) to the copy's own.
	Paths map[string]string `json:"paths,omitempty"`
	RestoreResult
}

// RestoreLaunch starts a new QEMU with the source's command line, made
// into a restore target with a fresh RAM file and QMP socket, and restores
// the checkpoint into it. On failure the new QEMU is killed and its files
// are removed.
func RestoreLaunch(ctx context.Context, opt LaunchOptions) (*Launched, error) {
	// The whole chain is checked before a QEMU is started for it.
	r, err := openChain(opt.Input, opt.Key, opt.Parents)
	if err != nil {
		return nil, err
	}
	h := r.Header()
	r.Close()
	if len(h.CommandLine) == 0 {
		return nil, fmt.Errorf("%w: the checkpoint does not record the source's QEMU command line; start a target by hand (see kvmckpt inspect) and use --qmp", ErrInvalid)
	}
	dir := opt.RAMDir
	if dir == "" {
		dir = "/dev/shm"
	}
	var tag [6]byte
	rand.Read(tag[:])
	name := "kvmckpt-restore-" + hex.EncodeToString(tag[:])
	l := &Launched{
		QMP: filepath.Join(dir, name+".qmp"),
		Log: filepath.Join(dir, name+".log"),
	}
	l.Args, l.RAMFiles, l.Paths, err = launchPaths(h.CommandLine, filepath.Join(dir, name), l.QMP)
	if err != nil {
		return nil, err
	}
	if len(l.RAMFiles) > 0 {
		l.RAMFile = l.RAMFiles[0]
	}
	if opt.QEMU != "" {
		l.Args[0] = opt.QEMU
	} else if l.Args[0], err = qemuBinary(l.Args[0]); err != nil {
		return nil, err
	}
	removeOurs := func() {
		for _, f := range l.RAMFiles {
			os.Remove(f)
		}
		for _, p := range l.Paths {
			os.Remove(p)
		}
		os.Remove(l.QMP)
	}
	// The RAM files hold guest memory: made here, 0600, before QEMU
	// opens them (it would create them with its umask, readable by all).
	for _, f := range l.RAMFiles {
		fd, err := os.OpenFile(f, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			removeOurs()
			return nil, fmt.Errorf("create RAM file: %w", err)
		}
		fd.Close()
	}
	logf, err := os.OpenFile(l.Log, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		removeOurs()
		return nil, fmt.Errorf("create QEMU log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(l.Args[0], l.Args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the restored guest outlives kvmckpt and its
	// terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// And a umask that keeps what QEMU creates (its QMP socket, serial
	// files) to this user: the umask is the process's, so it is set
	// around the fork alone.
	old := syscall.Umask(0o077)
	err = cmd.Start()
	syscall.Umask(old)
	if err != nil {
		removeOurs()
		return nil, fmt.Errorf("start QEMU: %w", err)
	}
	l.PID = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fail := func(err error) (*Launched, error) {
		_ = cmd.Process.Kill()
		<-exited
		removeOurs()
		log, _ := os.ReadFile(l.Log)
		if len(log) > 0 {
			err = fmt.Errorf("%w\nQEMU said: %s", err, strings.TrimSpace(string(log)))
		}
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(l.QMP); err == nil {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			return fail(fmt.Errorf("QEMU ended before its QMP socket appeared: %v", err))
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fail(errors.New("QEMU's QMP socket did not appear within 30 s"))
		}
	}
	ro := opt.RestoreOptions
	ro.QMP = l.QMP
	res, err := Restore(ctx, ro)
	if err != nil {
		return fail(err)
	}
	l.RestoreResult = *res
	return l, nil
}

// launchArgs makes a restore target's argv from a source's. Nothing the
// copy creates may be something the source uses: the source may still run,
// and QEMU replaces an existing unix socket at a listening path, so a copy
// given the source's monitor path would take the operator's monitor over.
// So every path the copy writes or listens on is moved to a new one named
// from base (see [launchPaths]): RAM files (base.ram, then base-1.ram and
// so on, returned in order), character-device sockets, files and pipes
// (-chardev, -serial, -monitor, -parallel, -debugcon, -vnc unix:), the pid
// file and the debug log. -qmp goes, replaced by qmpSock, and
// "-incoming defer -S" is added. Options whose paths it does not know how
// to move are refused.
func launchArgs(src []string, base, qmpSock string) (args, ramFiles []string, err error) {
	args, ramFiles, _, err = launchPaths(src, base, qmpSock)
	return args, ramFiles, err
}

// launchPaths is [launchArgs] that also returns every moved path, the
// recorded one mapped to the new one.
func launchPaths(src []string, base, qmpSock string) (args, ramFiles []string, moved map[string]string, err error) {
	args = RestoreCommandLine(src)
	moved = map[string]string{}
	n := 0
	newPath := func(old, ext string) string {
		n++
		p := fmt.Sprintf("%s-%d-%s%s", base, n, sanitizeName(filepath.Base(old)), ext)
		moved[old] = p
		return p
	}
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		opt := "-" + strings.TrimLeft(a, "-")
		if !strings.HasPrefix(a, "-") || i+1 >= len(args) {
			out = append(out, a)
			continue
		}
		if refused, why := launchRefuses(opt, args[i+1]); refused {
			return nil, nil, nil, fmt.Errorf("%w: the recorded option %s %s %s; start the target by hand (see kvmckpt inspect) and use --qmp",
				ErrInvalid, a, args[i+1], why)
		}
		if !launchRewrites[opt] {
			out = append(out, a)
			continue
		}
		v := args[i+1]
		i++
		switch opt {
		case "-object":
			file := base + ".ram"
			if k := len(ramFiles); k > 0 {
				file = fmt.Sprintf("%s-%d.ram", base, k)
			}
			nv, n, err := replaceMemPath(v, file)
			if err != nil {
				return nil, nil, nil, err
			}
			if n > 0 {
				ramFiles = append(ramFiles, file)
			}
			v = nv
		case "-qmp", "-qmp-pretty":
			continue // replaced below
		case "-chardev":
			v = movePathOption(v, newPath)
		case "-serial", "-monitor", "-parallel", "-debugcon", "-vnc":
			v = moveLegacyChardev(v, newPath)
		case "-pidfile":
			v = newPath(v, "")
		case "-D":
			v = newPath(v, "")
		}
		if strings.Contains(v, "\x00") {
			return nil, nil, nil, fmt.Errorf("%w: a recorded option holds a NUL byte", ErrInvalid)
		}
		out = append(out, a, v)
	}
	// Without a mem-path the copy's RAM is QEMU's own memory (-m alone,
	// memory-backend-ram or -memfd), as the source's was: the restore
	// fills it through QEMU's process.
	return append(out, "-qmp", "unix:"+qmpSock+",server=on,wait=off"), ramFiles, moved, nil
}

// launchRewrites are the options launchPaths rewrites (all take a value).
var launchRewrites = map[string]bool{"-object": true, "-qmp": true, "-qmp-pretty": true, "-serial": true, "-monitor": true,
	"-parallel": true, "-debugcon": true, "-vnc": true, "-chardev": true, "-pidfile": true, "-D": true}

// launchRefuses reports options with paths a launch cannot move: a SPICE
// server on a unix socket, and a -add-fd or -incoming source it cannot
// know to be the copy's own.
func launchRefuses(opt, v string) (bool, string) {
	switch {
	case opt == "-spice" && strings.Contains(v, "unix=on"):
		return true, "listens on a unix socket the source may be using"
	case opt == "-add-fd":
		return true, "passes a descriptor of the source's"
	}
	return false, ""
}

// sanitizeName keeps a file name's letters, digits, dots, dashes and
// underscores, for the names of moved paths.
func sanitizeName(s string) string {
	s = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, s)
	if len(s) > 40 {
		s = s[:40]
	}
	return s
}

// movePathOption moves the path= of a -chardev whose backend has one
// (socket, unix, file, pipe, and the serial-port devices' paths are left:
// they are devices, not files the copy creates).
func movePathOption(v string, newPath func(old, ext string) string) string {
	parts := strings.Split(v, ",")
	switch parts[0] {
	case "socket", "unix", "file", "pipe":
	default:
		return v
	}
	for i, p := range parts {
		if old, ok := strings.CutPrefix(p, "path="); ok && old != "" {
			parts[i] = "path=" + newPath(old, "")
		}
	}
	return strings.Join(parts, ",")
}

// moveLegacyChardev moves the path of a legacy character-device spec:
// "unix:PATH[,opts]", "file:PATH", "pipe:PATH".
func moveLegacyChardev(v string, newPath func(old, ext string) string) string {
	for _, prefix := range []string{"unix:", "file:", "pipe:"} {
		rest, ok := strings.CutPrefix(v, prefix)
		if !ok {
			continue
		}
		path, opts, _ := strings.Cut(rest, ",")
		if path == "" {
			return v
		}
		nv := prefix + newPath(path, "")
		if opts != "" {
			nv += "," + opts
		}
		return nv
	}
	return v
}

// qemuNames are the program names a launch runs: QEMU's system
// emulators.
var qemuNames = regexp.MustCompile(`^(qemu-system-[a-z0-9_]+|qemu-kvm)$`)

// qemuBinary is the program a launch runs for the recorded argv[0]: a QEMU
// system emulator of the same name, found in PATH. The checkpoint is
// untrusted input: it never chooses the path of what runs, nor anything
// but a QEMU. (Its options still reach that QEMU, which is why `inspect`
// shows them.)
func qemuBinary(recorded string) (string, error) {
	name := filepath.Base(recorded)
	if !qemuNames.MatchString(name) {
		return "", fmt.Errorf("%w: the recorded command line runs %q, not a QEMU system emulator (qemu-system-*, qemu-kvm); "+
			"give the emulator with --qemu, or start the target by hand (see kvmckpt inspect)", ErrInvalid, recorded)
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("the recorded QEMU %q: %w; give its path with --qemu", recorded, err)
	}
	return p, nil
}

// replaceMemPath rewrites the mem-path of a memory-backend-file object,
// given as key=value pairs or as JSON.
func replaceMemPath(v, path string) (string, int, error) {
	if strings.HasPrefix(strings.TrimSpace(v), "{") {
		var obj map[string]any
		if err := json.Unmarshal([]byte(v), &obj); err != nil {
			return v, 0, nil
		}
		if obj["qom-type"] != "memory-backend-file" {
			return v, 0, nil
		}
		obj["mem-path"] = path
		b, err := json.Marshal(obj)
		return string(b), 1, err
	}
	parts := strings.Split(v, ",")
	if parts[0] != "memory-backend-file" {
		return v, 0, nil
	}
	n := 0
	for i, p := range parts {
		if strings.HasPrefix(p, "mem-path=") {
			if strings.Contains(path, ",") {
				return "", 0, fmt.Errorf("RAM file path %q has a comma", path)
			}
			parts[i] = "mem-path=" + path
			n++
		}
	}
	return strings.Join(parts, ","), n, nil
}

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

	"github.com/kvmckpt/kvmckpt/writer"
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
	// one per node).
	RAMFile  string   `json:"ram_file"`
	RAMFiles []string `json:"ram_files"`
	Log      string   `json:"log"`
	Args     []string `json:"args"`
	RestoreResult
}

// RestoreLaunch starts a new QEMU with the source's command line, made
// into a restore target with a fresh RAM file and QMP socket, and restores
// the checkpoint into it. On failure the new QEMU is killed and its files
// are removed.
func RestoreLaunch(ctx context.Context, opt LaunchOptions) (*Launched, error) {
	r, err := writer.OpenKey(opt.Input, opt.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
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
	l.Args, l.RAMFiles, err = launchArgs(h.CommandLine, filepath.Join(dir, name), l.QMP)
	if err != nil {
		return nil, err
	}
	l.RAMFile = l.RAMFiles[0]
	if opt.QEMU != "" {
		l.Args[0] = opt.QEMU
	} else if l.Args[0], err = qemuBinary(l.Args[0]); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(l.Log, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create QEMU log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(l.Args[0], l.Args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the restored guest outlives kvmckpt and its
	// terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start QEMU: %w", err)
	}
	l.PID = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fail := func(err error) (*Launched, error) {
		_ = cmd.Process.Kill()
		<-exited
		for _, f := range l.RAMFiles {
			os.Remove(f)
		}
		os.Remove(l.QMP)
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

// launchArgs makes a restore target's argv from a source's: the RAM
// backends' mem-paths and the QMP socket are replaced by new ones (RAM
// files named from base: base.ram, then base-1.ram, base-2.ram and so on,
// returned in order), file outputs get a ".restored" suffix so the
// source's are not overwritten, and "-incoming defer -S" is added.
func launchArgs(src []string, base, qmpSock string) (args, ramFiles []string, err error) {
	args = RestoreCommandLine(src)
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		opt := "-" + strings.TrimLeft(a, "-")
		// Only the options changed here are taken with their value; every
		// other word passes through as it is.
		if !strings.HasPrefix(a, "-") || !launchRewrites[opt] || i+1 >= len(args) {
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
				return nil, nil, err
			}
			if n > 0 {
				ramFiles = append(ramFiles, file)
			}
			v = nv
		case "-qmp":
			continue // replaced below
		case "-serial", "-monitor", "-chardev":
			v = suffixFileOutput(v)
		case "-pidfile", "-D":
			v += ".restored"
		}
		out = append(out, a, v)
	}
	if len(ramFiles) == 0 {
		return nil, nil, fmt.Errorf("%w: the recorded command line has no memory-backend-file with a mem-path", ErrRAMBackend)
	}
	return append(out, "-qmp", "unix:"+qmpSock+",server=on,wait=off"), ramFiles, nil
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

// launchRewrites are the options launchArgs rewrites (all take a value).
var launchRewrites = map[string]bool{"-object": true, "-qmp": true, "-serial": true, "-monitor": true, "-chardev": true, "-pidfile": true, "-D": true}

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

// suffixFileOutput renames the file of a "file:PATH" or "file,path=PATH"
// character device.
func suffixFileOutput(v string) string {
	if strings.HasPrefix(v, "file:") {
		return v + ".restored"
	}
	parts := strings.Split(v, ",")
	if parts[0] == "file" {
		for i, p := range parts {
			if strings.HasPrefix(p, "path=") {
				parts[i] = p + ".restored"
			}
		}
	}
	return strings.Join(parts, ",")
}

package vmtest

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The guest's core test process, /coretarget (internal/coretarget): its
// command name, and the functions each of its threads blocks in, innermost
// first, as gdb's backtrace shows them.
const CoreTargetComm = "coretarget"

var coreTargetFrames = map[string][]string{
	"main":    {"main_blocked", "main"},
	"reader":  {"reader_blocked", "reader_thread"},
	"sleeper": {"sleeper_blocked", "sleeper_thread"},
	"waiter":  {"waiter_blocked", "waiter_thread"},
	"spinner": {"spinner_loop", "spinner_thread"},
}

// CoreTargetPath is build/coretarget at the module root: the guest's
// /coretarget, with its debug information.
func CoreTargetPath() (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	path := filepath.Join(root, "build", "coretarget")
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("%s: %w (run make initramfs)", path, ErrNotFound)
	}
	return path, nil
}

// CheckCore loads core, a core of the guest's /coretarget (process pid),
// in gdb with the program and checks what the acceptance asks:
// every thread's backtrace has its expected frames (the spinner's when
// spin), the marker string holds the pid (made at run time, so it is read
// from the core's memory), and `info auxv` lists the page size. It
// returns gdb's output.
func CheckCore(t testing.TB, core string, pid int32, spin bool) string {
	t.Helper()
	prog, err := CoreTargetPath()
	if err != nil {
		t.Fatal(err)
	}
	// An address the core has no bytes for (mmap's area, far from the
	// program's own segments, which gdb would read from the program
	// file).
	absent := absentAddress(t, core)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "gdb", "-batch", "-nx",
		"-ex", "set auto-load off", "-ex", "set debuginfod enabled off",
		// The read that must fail is not last: gdb's exit status is the
		// last command's.
		"-ex", "info threads", "-ex", "thread apply all bt", "-ex", "x/s &marker",
		"-ex", fmt.Sprintf("x/gx %#x", absent), "-ex", "info auxv",
		prog, core)
	out, err := cmd.CombinedOutput()
	text := string(out)
	if err != nil {
		t.Fatalf("gdb: %v\n%s", err, text)
	}
	// One block per thread: "Thread N (...LWP TID...)" then its frames.
	blocks := regexp.MustCompile(`(?m)^Thread \d+ \(`).Split(text, -1)
	found := map[string]bool{}
	for _, b := range blocks[1:] {
		for name, frames := range coreTargetFrames {
			at := 0
			ok := true
			for _, f := range frames {
				i := strings.Index(b[at:], " "+f+" (")
				if i < 0 {
					ok = false
					break
				}
				at += i + 1
			}
			if ok {
				found[name] = true
			}
		}
	}
	want := []string{"main", "reader", "sleeper", "waiter"}
	if spin {
		want = append(want, "spinner")
	}
	for _, name := range want {
		if !found[name] {
			t.Errorf("core of pid %d: no thread with the frames %v in gdb's backtraces", pid, coreTargetFrames[name])
		}
	}
	if got, want := len(blocks)-1, len(want); got != want {
		t.Errorf("core of pid %d: gdb shows %d threads, want %d", pid, got, want)
	}
	marker := fmt.Sprintf(`<marker>:\s+"kvmckpt-core-marker pid=%d"`, pid)
	if !regexp.MustCompile(marker).MatchString(text) {
		t.Errorf("core of pid %d: gdb does not print the marker %q", pid, marker)
	}
	if !regexp.MustCompile(`AT_PAGESZ\s+System page size\s+4096`).MatchString(text) {
		t.Errorf("core of pid %d: info auxv has no AT_PAGESZ 4096", pid)
	}
	if !strings.Contains(text, fmt.Sprintf("Cannot access memory at address %#x", absent)) {
		t.Errorf("core of pid %d: gdb reads memory at %#x, a page the core does not hold", pid, absent)
	}
	if t.Failed() {
		t.Logf("gdb's output:\n%s", text)
	}
	return text
}

// absentAddress returns an address in mmap's area (above 0x7f0000000000)
// that no PT_LOAD of core holds but the one below it ends at: a page of a
// thread's stack never touched, beside one the core holds.
func absentAddress(t testing.TB, core string) uint64 {
	t.Helper()
	f, err := elf.Open(core)
	if err != nil {
		t.Fatalf("core %s: %v", core, err)
	}
	defer f.Close()
	held := func(a uint64) bool {
		for _, p := range f.Progs {
			if p.Type == elf.PT_LOAD && p.Vaddr <= a && a-p.Vaddr < p.Memsz {
				return true
			}
		}
		return false
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		if p.Filesz != p.Memsz {
			t.Fatalf("core %s: a PT_LOAD at %#x with %d of %d bytes: memory the core does not hold must be in no segment", core, p.Vaddr, p.Filesz, p.Memsz)
		}
		if end := p.Vaddr + p.Memsz; p.Vaddr >= 0x7f0000000000 && !held(end) {
			return end
		}
	}
	t.Fatalf("core %s: no page in mmap's area left out", core)
	return 0
}

package qmp

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"qemu-system-x86_64\x00-m\x001G\x00", []string{"qemu-system-x86_64", "-m", "1G"}},
		{"a\x00\x00b\x00", []string{"a", "", "b"}},
		{"no-trailing-nul", []string{"no-trailing-nul"}},
		{"\x00", []string{""}},
	}
	for _, tt := range tests {
		got, err := parseCmdline(strings.NewReader(tt.in))
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("parseCmdline(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	if got, err := parseCmdline(strings.NewReader("")); err == nil {
		t.Errorf("empty command line: got %q, want error", got)
	}
}

func TestProcessCmdline(t *testing.T) {
	args, err := ProcessCmdline(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(args, os.Args) {
		t.Errorf("got %q, want %q", args, os.Args)
	}
	if _, err := ProcessCmdline(0); err == nil {
		t.Error("pid 0: no error")
	}
	if _, err := ProcessCmdline(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("no such pid: got %v, want not-exist error", err)
	}
}

func TestPeerPID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, p := range []string{path, "unix:" + path} {
		pid, err := PeerPID(p)
		if err != nil {
			t.Fatal(err)
		}
		if pid != os.Getpid() {
			t.Errorf("PeerPID(%q) = %d, want %d", p, pid, os.Getpid())
		}
	}
	if _, err := PeerPID(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("no socket: no error")
	}
}

func TestParseStatStart(t *testing.T) {
	rest := " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20 21\n"
	for _, name := range []string{"(qemu)", "(a b) c)", "()"} {
		got, err := parseStatStart([]byte("77 " + name + rest))
		if err != nil || got != 4242 {
			t.Errorf("name %s: got %d, %v; want 4242", name, got, err)
		}
	}
	for _, bad := range []string{"", "77 qemu S 1", "77 (qemu) S 1 2 3", "77 (qemu)" + strings.Replace(rest, "4242", "x", 1)} {
		if got, err := parseStatStart([]byte(bad)); err == nil {
			t.Errorf("%q: got %d, want error", bad, got)
		}
	}
}

func TestProcessStart(t *testing.T) {
	a, err := ProcessStart(os.Getpid())
	if err != nil || a == 0 {
		t.Fatalf("own start time: %d, %v", a, err)
	}
	if b, err := ProcessStart(os.Getppid()); err != nil || b > a {
		t.Errorf("parent started at %d (%v), after us at %d", b, err, a)
	}
	if _, err := ProcessStart(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("no such pid: got %v, want not-exist error", err)
	}
}

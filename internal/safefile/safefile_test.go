package safefile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestOpenRefusesWithoutBlocking(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	reg := filepath.Join(dir, "reg")
	if err := os.WriteFile(reg, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(reg, link); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		open func(string) (*os.File, error)
		path string
		want error // nil: opens
	}{
		{"fifo", Open, fifo, ErrNotRegular},
		{"fifo for writing", OpenWrite, fifo, ErrNotRegular},
		{"directory", Open, dir, ErrNotRegular},
		{"device", Open, "/dev/null", ErrNotRegular},
		{"regular", Open, reg, nil},
		{"link followed", Open, link, nil},
		{"link refused", OpenNoFollow, link, unix.ELOOP},
		{"link refused for writing", OpenWrite, link, unix.ELOOP},
		{"missing", Open, filepath.Join(dir, "none"), os.ErrNotExist},
	} {
		t.Run(c.name, func(t *testing.T) {
			done := make(chan struct{})
			var f *os.File
			var err error
			go func() { f, err = c.open(c.path); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("open blocked")
			}
			if c.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				f.Close()
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}
}

func TestReadFileLimit(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, make([]byte, 100), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadFile(p, 100); err != nil || len(b) != 100 {
		t.Fatalf("ReadFile = %d bytes, %v", len(b), err)
	}
	if _, err := ReadFile(p, 99); err == nil {
		t.Fatal("a file over the limit was read")
	}
}

func TestWriteReplacesLink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if err := os.Symlink(victim, out); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(out, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Fatalf("wrote through the link: victim holds %q", b)
	}
	st, err := os.Lstat(out)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o600 {
		t.Fatalf("out is %v, %v; want a regular 0600 file", st.Mode(), err)
	}
	if err := Write(out, 0o600, func(io.Writer) error { return errors.New("boom") }); err == nil {
		t.Fatal("a failed fill was not reported")
	}
	if b, _ := os.ReadFile(out); string(b) != "new" {
		t.Fatalf("a failed write changed the file: %q", b)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*tmp-*"))
	if len(left) > 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}

package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const testGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}` + "\r\n"

// fakeServer listens on a unix socket and runs serve on each connection
// (in its own goroutine; serve reports through t.Error, never t.Fatal). It
// returns the socket path.
func fakeServer(t *testing.T, serve func(c net.Conn)) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kvmckpt-qmp")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
		os.RemoveAll(dir)
	})
	return path
}

// command is a command as the fake server reads it.
type command struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// qmpPeer is the server side of a fake QMP connection.
type qmpPeer struct {
	c   net.Conn
	dec *json.Decoder
}

// greet sends the greeting and accepts the capabilities negotiation.
func greet(c net.Conn) (*qmpPeer, error) {
	p := &qmpPeer{c: c, dec: json.NewDecoder(c)}
	if _, err := io.WriteString(c, testGreeting); err != nil {
		return nil, err
	}
	cmd, err := p.read()
	if err != nil {
		return nil, err
	}
	if cmd.Execute != "qmp_capabilities" {
		return nil, fmt.Errorf("first command %q", cmd.Execute)
	}
	return p, p.send(`{"return": {}, "id": %s}`, cmd.ID)
}

func (p *qmpPeer) read() (command, error) {
	var cmd command
	err := p.dec.Decode(&cmd)
	return cmd, err
}

func (p *qmpPeer) send(format string, args ...any) error {
	_, err := fmt.Fprintf(p.c, format+"\r\n", args...)
	return err
}

func TestDialNotQMP(t *testing.T) {
	tests := []struct {
		name    string
		serve   func(c net.Conn)
		timeout bool
	}{
		{"silent", func(c net.Conn) { io.Copy(io.Discard, c) }, true},
		{"ssh", func(c net.Conn) { io.WriteString(c, "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"); io.Copy(io.Discard, c) }, false},
		{"binary", func(c net.Conn) { c.Write([]byte{0, 1, 2, 0xff}); io.Copy(io.Discard, c) }, false},
		{"other JSON", func(c net.Conn) { io.WriteString(c, `{"hello": "world"}`+"\n"); io.Copy(io.Discard, c) }, false},
		{"JSON array", func(c net.Conn) { io.WriteString(c, "[1, 2]\n"); io.Copy(io.Discard, c) }, false},
		{"closes", func(c net.Conn) {}, false},
		{"greets, then silent", func(c net.Conn) { io.WriteString(c, testGreeting); io.Copy(io.Discard, c) }, true},
		{"greets, then garbage", func(c net.Conn) {
			io.WriteString(c, testGreeting)
			bufio.NewReader(c).ReadString('\n')
			io.WriteString(c, "ok\n")
		}, false},
		{"refuses capabilities", func(c net.Conn) {
			io.WriteString(c, testGreeting)
			bufio.NewReader(c).ReadString('\n')
			io.WriteString(c, `{"id": 0, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`+"\n")
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path := fakeServer(t, tt.serve)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			s, err := Dial(ctx, path)
			if err == nil {
				s.Close()
				t.Fatal("Dial succeeded")
			}
			if !errors.Is(err, ErrNotQMP) {
				t.Errorf("error does not wrap ErrNotQMP: %v", err)
			}
			if errors.Is(err, ErrTimeout) != tt.timeout {
				t.Errorf("errors.Is(err, ErrTimeout) = %v, want %v: %v", !tt.timeout, tt.timeout, err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Dial took %v", d)
			}
			if tt.name == "refuses capabilities" {
				var qe *Error
				if !errors.As(err, &qe) || qe.Class != ClassCommandNotFound {
					t.Errorf("error does not carry the QMP error: %v", err)
				}
			}
			t.Log(err)
		})
	}
}

func TestDialErrors(t *testing.T) {
	ctx := testContext(t, 5*time.Second)
	if _, err := Dial(ctx, filepath.Join(t.TempDir(), "none")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("missing socket: got %v, want ENOENT", err)
	}
	if _, err := Dial(ctx, "unix:"); err == nil {
		t.Error("empty path: no error")
	}

	// Cancelling ctx ends the handshake early.
	path := fakeServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	cctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	if _, err := Dial(cctx, path); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: got %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Dial took %v after cancel", d)
	}
}

// serveCommands greets and then answers commands with reply(cmd) until the
// connection ends; an empty reply sends nothing.
func serveCommands(t *testing.T, reply func(p *qmpPeer, cmd command) string) func(c net.Conn) {
	return func(c net.Conn) {
		p, err := greet(c)
		if err != nil {
			t.Errorf("fake server: %v", err)
			return
		}
		for {
			cmd, err := p.read()
			if err != nil {
				return
			}
			if r := reply(p, cmd); r != "" {
				if err := p.send("%s", r); err != nil {
					return
				}
			}
		}
	}
}

func TestRunErrorClass(t *testing.T) {
	path := fakeServer(t, serveCommands(t, func(p *qmpPeer, cmd command) string {
		switch cmd.Execute {
		case "query-status":
			// An event first: it must not be taken for the reply.
			p.send(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}`)
			return fmt.Sprintf(`{"return": {"status": "paused", "singlestep": false, "running": false}, "id": %s}`, cmd.ID)
		case "quit":
			p.send(`{"return": {}, "id": %s}`, cmd.ID)
			p.c.Close()
			return ""
		case "no-id":
			return `{"error": {"class": "GenericError", "desc": "JSON parse error"}}`
		}
		return fmt.Sprintf(`{"error": {"class": "CommandNotFound", "desc": "The command %s has not been found"}, "id": %s}`, cmd.Execute, cmd.ID)
	}))
	ctx := testContext(t, 5*time.Second)
	s, err := Dial(ctx, "unix:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	st, err := s.Status(ctx)
	if err != nil || st != (Status{State: "paused"}) {
		t.Errorf("Status() = %+v, %v", st, err)
	}

	err = s.Run(ctx, "nosuch", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("got %v, want *Error", err)
	}
	want := Error{Command: "nosuch", Class: ClassCommandNotFound, Desc: "The command nosuch has not been found"}
	if *qe != want {
		t.Errorf("got %+v, want %+v", *qe, want)
	}
	// Wrapped by a method, the class survives.
	if _, err := s.Version(ctx); !errors.As(err, &qe) || qe.Class != ClassCommandNotFound || !strings.HasPrefix(err.Error(), "query version: ") {
		t.Errorf("Version() error = %v", err)
	}

	if err := s.Run(ctx, "no-id", nil, nil); !errors.As(err, &qe) || qe.Class != ClassGenericError {
		t.Errorf("reply without id: %v", err)
	}

	if err := s.Quit(ctx); err != nil {
		t.Errorf("Quit() = %v", err)
	}
	if err := s.Stop(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("after quit: got %v, want ErrClosed", err)
	}
}

func TestRunAbandoned(t *testing.T) {
	// The server answers "slow" only once the next command has arrived, so
	// that its late reply is waiting in front of the next one's.
	path := fakeServer(t, serveCommands(t, func(p *qmpPeer, cmd command) string {
		switch cmd.Execute {
		case "slow":
			next, err := p.read()
			if err != nil {
				return ""
			}
			p.send(`{"return": "late", "id": %s}`, cmd.ID)
			return fmt.Sprintf(`{"return": "%s", "id": %s}`, next.Execute, next.ID)
		}
		return fmt.Sprintf(`{"return": "%s", "id": %s}`, cmd.Execute, cmd.ID)
	}))
	s, err := Dial(testContext(t, 5*time.Second), path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	var out string
	if err := s.Run(ctx, "slow", nil, &out); !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("slow: got %v, want ErrTimeout", err)
	}
	for _, cmd := range []string{"second", "third"} {
		if err := s.Run(testContext(t, 5*time.Second), cmd, nil, &out); err != nil || out != cmd {
			t.Errorf("%s: got %q, %v", cmd, out, err)
		}
	}
}

func TestRunConcurrent(t *testing.T) {
	path := fakeServer(t, serveCommands(t, func(p *qmpPeer, cmd command) string {
		return fmt.Sprintf(`{"return": %s, "id": %s}`, cmd.Arguments, cmd.ID)
	}))
	s, err := Dial(testContext(t, 5*time.Second), path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got map[string]int
			if err := s.Run(context.Background(), "echo", map[string]int{"n": i}, &got); err != nil || got["n"] != i {
				t.Errorf("echo %d: got %v, %v", i, got, err)
			}
		}()
	}
	wg.Wait()
}

func TestSessionClosed(t *testing.T) {
	hangUp := make(chan struct{})
	path := fakeServer(t, func(c net.Conn) {
		if _, err := greet(c); err != nil {
			t.Errorf("fake server: %v", err)
			return
		}
		<-hangUp
	})
	ctx := testContext(t, 5*time.Second)
	s, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, "never-answered", nil, nil) }()
	time.Sleep(20 * time.Millisecond)
	close(hangUp)
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("server hung up: got %v, want ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close() = %v", err)
	}
	if _, err := s.Status(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: got %v, want ErrClosed", err)
	}
}

func TestLimitedReader(t *testing.T) {
	lr := &limitedReader{r: strings.NewReader(strings.Repeat("x", 100)), left: 10}
	b, err := io.ReadAll(lr)
	if len(b) != 10 || !errors.Is(err, ErrMalformed) {
		t.Errorf("read %d bytes, %v; want 10, ErrMalformed", len(b), err)
	}
}

// TestSaveDeviceStateFailed drives SaveDeviceState against a fake QEMU
// whose migration fails, and one that refuses to start it.
func TestSaveDeviceStateFailed(t *testing.T) {
	for _, tt := range []struct {
		name    string
		migrate string // reply to migrate; %s is the id
		check   func(t *testing.T, err error)
	}{
		{"failed", `{"return": {}, "id": %s}`, func(t *testing.T, err error) {
			if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "Unable to write to file: Broken pipe") {
				t.Errorf("got %v, want ErrMigrationFailed with QEMU's reason", err)
			}
		}},
		{"refused", `{"error": {"class": "GenericError", "desc": "disallowing migration blocker (invtsc) in use"}, "id": %s}`, func(t *testing.T, err error) {
			var qe *Error
			if !errors.As(err, &qe) || qe.Command != "migrate" || qe.Class != ClassGenericError {
				t.Errorf("got %v, want the migrate command's error", err)
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var seen []string
			path := fakeServer(t, serveCommands(t, func(p *qmpPeer, cmd command) string {
				mu.Lock()
				seen = append(seen, cmd.Execute)
				mu.Unlock()
				switch cmd.Execute {
				case "query-migrate-capabilities":
					return fmt.Sprintf(`{"return": [{"state": false, "capability": "x-ignore-shared"}, {"state": false, "capability": "multifd"}], "id": %s}`, cmd.ID)
				case "migrate":
					return fmt.Sprintf(tt.migrate, cmd.ID)
				case "query-migrate":
					// The descriptor passed with getfd was never
					// received, so the kernel closed it: EOF for the
					// copier.
					return fmt.Sprintf(`{"return": {"status": "failed", "error-desc": "Unable to write to file: Broken pipe"}, "id": %s}`, cmd.ID)
				}
				return fmt.Sprintf(`{"return": {}, "id": %s}`, cmd.ID)
			}))
			ctx := testContext(t, 5*time.Second)
			s, err := Dial(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			_, err = s.SaveDeviceState(ctx, io.Discard)
			tt.check(t, err)
			t.Log(err)
			mu.Lock()
			defer mu.Unlock()
			if !slices.Contains(seen, "getfd") || !slices.Contains(seen, "migrate-set-capabilities") {
				t.Errorf("commands: %q", seen)
			}
			if tt.name == "refused" && !slices.Contains(seen, "closefd") {
				t.Errorf("descriptor not closed after a refused migrate: %q", seen)
			}
		})
	}
}

// TestSilentAfterHandshake: a peer that completes the handshake and then
// stays silent, or sends only events, must not hang a command for ever,
// even one whose context has no deadline.
func TestSilentAfterHandshake(t *testing.T) {
	for _, c := range []struct {
		name  string
		serve func(p *qmpPeer)
	}{
		{"silent", func(p *qmpPeer) {
			for {
				if _, err := p.read(); err != nil {
					return
				}
			}
		}},
		{"only events", func(p *qmpPeer) {
			go func() {
				for {
					if _, err := p.read(); err != nil {
						return
					}
				}
			}()
			for range 200 {
				if p.send(`{"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}`) != nil {
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := fakeServer(t, func(conn net.Conn) {
				p, err := greet(conn)
				if err != nil {
					return
				}
				c.serve(p)
			})
			s, err := Dial(testContext(t, 5*time.Second), path)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			s.SetCommandTimeout(300 * time.Millisecond)
			start := time.Now()
			err = s.Run(context.Background(), "stop", nil, nil)
			if !errors.Is(err, ErrTimeout) {
				t.Fatalf("got %v, want ErrTimeout", err)
			}
			if !strings.Contains(err.Error(), "did not answer") || !strings.Contains(err.Error(), "stop") {
				t.Errorf("error does not say which command went unanswered: %v", err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v", d)
			}
		})
	}
	if DefaultCommandTimeout <= 0 {
		t.Fatal("commands have no default deadline")
	}
}

// TestWriteAfterPeerClosed: a command written after the peer closed the
// connection fails with ErrClosed, whether the reader saw the end first
// or the write met it (EPIPE): QEMU quitting races the next command.
func TestWriteAfterPeerClosed(t *testing.T) {
	closed := make(chan struct{}, 1)
	path := fakeServer(t, func(c net.Conn) {
		if _, err := greet(c); err != nil {
			t.Errorf("fake server: %v", err)
		}
		c.Close()
		closed <- struct{}{}
	})
	ctx := context.Background()
	for range 20 {
		s, err := Dial(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		<-closed
		if _, err := s.Status(ctx); !errors.Is(err, ErrClosed) {
			t.Fatalf("Status after the peer closed: %v, want ErrClosed", err)
		}
		s.Close()
	}
}

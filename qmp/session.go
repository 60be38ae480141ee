package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// MaxMessageSize bounds one message from QEMU. The largest reply kvmckpt
// asks for is the human monitor's memory map, tens of KiB even for a guest
// with many devices; go-qemu's SocketMonitor stops at 64 KiB, which a TCG
// guest with many vCPUs (one SMM flat view each) can exceed.
const MaxMessageSize = 64 << 20

// HandshakeTimeout bounds how long [Dial] waits for QEMU's greeting and the
// reply to the capabilities negotiation, unless ctx has an earlier deadline.
// QEMU answers at once; a peer that says nothing is not QMP.
const HandshakeTimeout = 5 * time.Second

// DefaultCommandTimeout bounds how long a command waits for its reply,
// unless ctx has an earlier deadline (see [Session.SetCommandTimeout]).
// QEMU answers every command kvmckpt sends within milliseconds, even a
// paused or busy one; long operations (migration) are polled with short
// commands. A peer that completes the handshake and then falls silent, or
// sends only events, or a QEMU stopped by SIGSTOP, hangs no command longer.
const DefaultCommandTimeout = 30 * time.Second

// writeTimeout bounds a single write of a command. Commands are small and
// fit in the socket buffer, so a write only blocks when QEMU has stopped
// reading its monitor.
const writeTimeout = 10 * time.Second

// Session is a QMP connection to one QEMU process, past the capabilities
// negotiation.
//
// Session speaks QMP itself rather than through go-qemu's SocketMonitor:
// that monitor turns error replies into plain strings (the class is lost),
// has no deadline for the greeting, cannot abandon a command on context
// cancellation, and drops the session on replies over 64 KiB.
//
// A Session is safe for concurrent use. Commands are sent one at a time; a
// command whose context ends is abandoned and its late reply discarded.
type Session struct {
	conn *net.UnixConn
	path string

	// sem holds the right to send a command and wait for its reply. It is
	// a channel rather than a mutex so that waiting for it obeys contexts.
	sem    chan struct{}
	nextID uint64 // guarded by sem

	mu      sync.Mutex
	pending map[uint64]chan reply // guarded by mu

	done    chan struct{} // closed when the reader ends
	readErr error         // why the reader ended; set before done closes

	closeOnce sync.Once
	timeout   atomic.Int64 // command timeout in nanoseconds
	fdMu      sync.Mutex
	fdSeq     uint64 // guarded by fdMu

	// Set by [DialLibvirt]: QEMU's pid (the socket's peer is libvirt's
	// proxy), what Close stops besides, and a name for the guest.
	pid     int
	onClose func()
	label   string
}

// reply is one non-event message from QEMU.
type reply struct {
	ID     *uint64         `json:"id"`
	Event  string          `json:"event"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// greeting is the message QEMU sends first on a QMP connection
// (qmp-spec.rst, "Server Greeting").
type greeting struct {
	QMP *struct {
		Version      json.RawMessage `json:"version"`
		Capabilities []string        `json:"capabilities"`
	} `json:"QMP"`
}

// Dial connects to the QMP socket at path ("unix:PATH" or PATH) and
// negotiates capabilities. A peer that does not greet in QMP within
// [HandshakeTimeout] (or before ctx ends) gives an error wrapping
// [ErrNotQMP]; one that says nothing at all also wraps [ErrTimeout].
//
// QEMU serves one QMP client per socket at a time: while another client is
// connected, Dial waits for the greeting and times out.
func Dial(ctx context.Context, path string) (*Session, error) {
	addr := strings.TrimPrefix(path, "unix:")
	if addr == "" {
		return nil, errors.New("dial QMP socket: empty path")
	}
	start := time.Now()
	deadline := start.Add(HandshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	d := net.Dialer{Deadline: deadline}
	c, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, err)
	}
	conn := c.(*net.UnixConn)

	// The deadline bounds the handshake; cancelling ctx moves it to the
	// past so that a blocked read returns at once.
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	lr := &limitedReader{r: conn, left: MaxMessageSize}
	dec := json.NewDecoder(lr)
	err = handshake(conn, dec)
	stopped := stop()
	switch {
	case err != nil && errors.Is(ctx.Err(), context.Canceled):
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, ctx.Err())
	case err != nil && errors.Is(err, os.ErrDeadlineExceeded):
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: no QMP handshake within %v (not a QMP monitor, or QEMU is serving another client): %w (%w)",
			addr, deadline.Sub(start).Round(time.Millisecond), ErrNotQMP, ErrTimeout)
	case err != nil:
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, err)
	case !stopped:
		// ctx ended as the handshake finished; the deadline is (or will
		// be) in the past, so the connection is unusable.
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, ctxErr(ctx))
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial QMP socket %s: %w", addr, err)
	}

	s := &Session{
		conn:    conn,
		path:    addr,
		sem:     make(chan struct{}, 1),
		nextID:  1,
		pending: make(map[uint64]chan reply),
		done:    make(chan struct{}),
	}
	s.timeout.Store(int64(DefaultCommandTimeout))
	go s.read(dec, lr)
	return s, nil
}

// SetCommandTimeout sets how long each command waits for its reply from
// now on (0: only as long as its context allows).
func (s *Session) SetCommandTimeout(d time.Duration) { s.timeout.Store(int64(d)) }

// handshake reads the greeting and negotiates no optional capabilities:
// kvmckpt needs neither out-of-band execution nor any other.
func handshake(conn *net.UnixConn, dec *json.Decoder) error {
	var g greeting
	if err := dec.Decode(&g); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		return fmt.Errorf("read greeting: %w: %v", ErrNotQMP, err)
	}
	if g.QMP == nil || len(g.QMP.Version) == 0 {
		return fmt.Errorf("read greeting: %w: no \"QMP\" object with a version", ErrNotQMP)
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities","id":0}` + "\n")); err != nil {
		return fmt.Errorf("negotiate capabilities: %w", err)
	}
	var r reply
	if err := dec.Decode(&r); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		return fmt.Errorf("negotiate capabilities: %w: %v", ErrNotQMP, err)
	}
	if r.Error != nil {
		return fmt.Errorf("negotiate capabilities: %w: %w", ErrNotQMP,
			&Error{Command: "qmp_capabilities", Class: r.Error.Class, Desc: r.Error.Desc})
	}
	if r.Return == nil {
		return fmt.Errorf("negotiate capabilities: %w: reply has no \"return\"", ErrNotQMP)
	}
	return nil
}

// limitedReader fails once more than left bytes have been read since the
// last reset. The reader resets it after every message, so it bounds the
// size of one message (plus what the JSON decoder reads ahead).
type limitedReader struct {
	r    io.Reader
	left int64
}

var errTooLarge = fmt.Errorf("%w: message larger than %d bytes", ErrMalformed, MaxMessageSize)

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.left <= 0 {
		return 0, errTooLarge
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

// read delivers replies to the commands waiting for them until the
// connection fails. Events are dropped: kvmckpt polls instead.
func (s *Session) read(dec *json.Decoder, lr *limitedReader) {
	var err error
	for {
		var raw json.RawMessage
		if err = dec.Decode(&raw); err != nil {
			break
		}
		lr.left = MaxMessageSize
		var r reply
		if json.Unmarshal(raw, &r) != nil || r.Event != "" {
			continue // not a reply to kvmckpt (an id of its own is a number)
		}
		s.mu.Lock()
		if r.ID != nil {
			if ch, ok := s.pending[*r.ID]; ok {
				delete(s.pending, *r.ID)
				ch <- r
			}
		} else if len(s.pending) == 1 {
			// QEMU leaves the id out only when it could not parse the
			// request; with one command outstanding, it is the culprit.
			for id, ch := range s.pending {
				delete(s.pending, id)
				ch <- r
			}
		}
		s.mu.Unlock()
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	s.readErr = err
	close(s.done)
}

// Close closes the connection. QEMU keeps running. Close is idempotent.
func (s *Session) Close() error {
	var err error
	s.closeOnce.Do(func() {
		err = s.conn.Close()
		<-s.done
		if s.onClose != nil {
			s.onClose()
		}
	})
	return err
}

// Path returns the socket path the session was dialled on.
func (s *Session) Path() string { return s.path }

// Name names the guest for messages: its libvirt domain, or the socket.
func (s *Session) Name() string {
	if s.label != "" {
		return s.label
	}
	return s.path
}

// ctxErr returns ctx's error, wrapping [ErrTimeout] too when its deadline
// passed.
func ctxErr(ctx context.Context) error {
	err := ctx.Err()
	if cause := context.Cause(ctx); cause != nil && cause != err {
		// A cause the caller gave says more (the signal, the grace
		// period that ran out); it wraps its own sentinels.
		if errors.Is(cause, err) {
			return cause
		}
		return fmt.Errorf("%w: %w", err, cause)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	}
	return err
}

// Run executes the QMP command cmd with arguments args (nil for none) and
// decodes its "return" value into ret (nil to ignore it). An error reply is
// returned as an [*Error]; a closed connection as an error wrapping
// [ErrClosed]; ctx ending first as ctx's error (wrapping [ErrTimeout] for a
// deadline), and then QEMU may still run the command.
func (s *Session) Run(ctx context.Context, cmd string, args, ret any) error {
	return s.run(ctx, cmd, args, nil, ret)
}

// run is [Session.Run] that can pass file to QEMU with the command (as
// SCM_RIGHTS ancillary data), for getfd.
func (s *Session) run(ctx context.Context, cmd string, args any, file *os.File, ret any) error {
	parent := ctx
	if d := time.Duration(s.timeout.Load()); d > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	// ctxErr names the command and, where the session's own deadline
	// ended the wait, says so.
	ctxErr := func(ctx context.Context) error {
		if parent.Err() == nil && ctx.Err() != nil {
			return fmt.Errorf("command %s: QEMU did not answer within %v (is it stopped, or not QEMU?): %w: %w",
				cmd, time.Duration(s.timeout.Load()), ErrTimeout, ctx.Err())
		}
		return fmt.Errorf("command %s: %w", cmd, ctxErr(parent))
	}
	select {
	case s.sem <- struct{}{}:
	case <-s.done:
		return s.readErr
	case <-ctx.Done():
		return ctxErr(ctx)
	}
	defer func() { <-s.sem }()

	id := s.nextID
	s.nextID++
	msg, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, id})
	if err != nil {
		return fmt.Errorf("encode command %s: %w", cmd, err)
	}
	msg = append(msg, '\n')

	ch := make(chan reply, 1)
	s.mu.Lock()
	s.pending[id] = ch
	s.mu.Unlock()
	forget := func() {
		s.mu.Lock()
		delete(s.pending, id)
		s.mu.Unlock()
	}

	if err := s.write(ctx, msg, file); err != nil {
		forget()
		select {
		case <-s.done:
			return s.readErr
		default:
		}
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
			// QEMU closed the connection; the reader has not seen the
			// end yet.
			return fmt.Errorf("%w: send command %s: %w", ErrClosed, cmd, err)
		}
		return fmt.Errorf("send command %s: %w", cmd, err)
	}

	var r reply
	select {
	case r = <-ch:
	case <-s.done:
		// The reply may have arrived just before the connection closed,
		// as it does for "quit".
		select {
		case r = <-ch:
		default:
			forget()
			return s.readErr
		}
	case <-ctx.Done():
		forget()
		return ctxErr(ctx)
	}
	if r.Error != nil {
		return &Error{Command: cmd, Class: r.Error.Class, Desc: r.Error.Desc}
	}
	if r.Return == nil {
		return fmt.Errorf("command %s: %w: reply has neither \"return\" nor \"error\"", cmd, ErrMalformed)
	}
	if ret != nil {
		if err := json.Unmarshal(r.Return, ret); err != nil {
			return fmt.Errorf("decode %s reply: %w: %v", cmd, ErrMalformed, err)
		}
	}
	return nil
}

// write sends one command, with file's descriptor attached if file is not
// nil. The caller holds s.sem.
func (s *Session) write(ctx context.Context, msg []byte, file *os.File) error {
	deadline := time.Now().Add(writeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := s.conn.SetWriteDeadline(deadline); err != nil {
		return err
	}
	if file == nil {
		_, err := s.conn.Write(msg)
		return err
	}
	// Control keeps the descriptor valid while it is sent, and unlike
	// File.Fd it leaves the file in non-blocking mode.
	rc, err := file.SyscallConn()
	if err != nil {
		return err
	}
	var n int
	var werr error
	if err := rc.Control(func(fd uintptr) {
		n, _, werr = s.conn.WriteMsgUnix(msg, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return err
	}
	if werr != nil {
		return werr
	}
	if n < len(msg) {
		_, err = s.conn.Write(msg[n:])
	}
	return err
}

// HumanMonitorCommand runs a human monitor (HMP) command and returns its
// output. cpu selects the CPU the command applies to (as HMP's "cpu N"
// would, for "info registers"); a negative cpu leaves QEMU's default.
//
// HMP reports most errors in its output rather than as QMP errors, so the
// caller checks the output.
func (s *Session) HumanMonitorCommand(ctx context.Context, cmdline string, cpu int) (string, error) {
	args := map[string]any{"command-line": cmdline}
	if cpu >= 0 {
		args["cpu-index"] = cpu
	}
	var out string
	if err := s.Run(ctx, "human-monitor-command", args, &out); err != nil {
		return "", err
	}
	return out, nil
}

// sendFD passes f to QEMU under a new unique name (QMP getfd) and returns
// the name. QEMU holds its own copy; the caller still closes f.
func (s *Session) sendFD(ctx context.Context, prefix string, f *os.File) (string, error) {
	s.fdMu.Lock()
	s.fdSeq++
	name := fmt.Sprintf("kvmckpt-%s-%d-%d", prefix, os.Getpid(), s.fdSeq)
	s.fdMu.Unlock()
	if err := s.run(ctx, "getfd", map[string]string{"fdname": name}, f, nil); err != nil {
		return "", fmt.Errorf("pass fd to QEMU: %w", err)
	}
	return name, nil
}

// closeFD drops a descriptor passed with [Session.sendFD] that QEMU has not
// consumed. It is for cleanup paths, so it reports nothing: QEMU's migrate
// commands consume the descriptor they are given (monitor_get_fd removes
// it), and then closefd fails harmlessly.
func (s *Session) closeFD(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.Run(ctx, "closefd", map[string]string{"fdname": name}, nil)
}

// isClosed reports whether err says the connection is gone.
func isClosed(err error) bool { return errors.Is(err, ErrClosed) }

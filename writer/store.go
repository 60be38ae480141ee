package writer

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
)

// A Store keeps checkpoints under names of its own scheme, such as
// "s3://bucket/key", instead of in local files. [Create], [Open],
// [OpenKey] and [OpenChain] take such a name once its scheme is
// registered with [RegisterStore]; the format knows nothing of the store.
type Store interface {
	// Check reports whether a checkpoint can be written at name (the
	// store answers, the credentials are accepted, the place exists),
	// without writing anything: a save asks before it pauses the guest.
	Check(name string) error
	// Create starts the checkpoint at name; sizeHint is about how many
	// bytes it will have.
	Create(name string, sizeHint int64) (Sink, error)
	// Open opens the checkpoint at name for reading. A missing one is an
	// error wrapping [os.ErrNotExist].
	Open(name string) (Blob, error)
}

// ErrStoreAccess is wrapped by a store's errors that are not about the
// checkpoint: the store cannot be reached, or refuses the credentials.
var ErrStoreAccess = errors.New("object store unavailable")

// Sink receives a checkpoint's bytes in order, and makes them the
// checkpoint at its name all at once, or not at all.
type Sink interface {
	io.Writer
	// Commit makes the bytes written the checkpoint at the sink's name,
	// replacing an older one there; before Commit returns, nothing at
	// that name has changed.
	Commit() error
	// Abort discards what was written and leaves the name as it was. It
	// may be called more than once, and after a Commit (then it does
	// nothing).
	Abort() error
	// String names where the bytes go, for messages.
	String() string
}

// Blob is a stored checkpoint opened for reading.
type Blob interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// Viewer is a [Blob] (any io.ReaderAt) that can lend its bytes rather
// than copy them, as a store's read-ahead blocks can: a restore decodes
// a chunk straight from the view, a copy fewer.
type Viewer interface {
	// View returns the n bytes at off, which the caller only reads, and
	// only until it calls release; ok false means the Viewer cannot lend
	// them (a range across its blocks, a failed read), and the caller
	// reads them with ReadAt instead.
	View(off int64, n int) (b []byte, release func(), ok bool)
}

var stores struct {
	mu sync.Mutex
	m  map[string]Store
}

// RegisterStore makes names beginning with scheme + "://" name
// checkpoints in s. Registering a scheme again replaces its store.
func RegisterStore(scheme string, s Store) {
	stores.mu.Lock()
	defer stores.mu.Unlock()
	if stores.m == nil {
		stores.m = map[string]Store{}
	}
	stores.m[scheme] = s
}

// storeOf returns the store of name's scheme, nil for a local path. A
// name with a scheme that no store is registered for is an error, so that
// "s3://b/k" is never written as a local directory "s3:".
func storeOf(name string) (Store, error) {
	scheme, _, ok := strings.Cut(name, "://")
	if !ok || scheme == "" || strings.ContainsAny(scheme, "/.") {
		return nil, nil
	}
	stores.mu.Lock()
	s := stores.m[scheme]
	stores.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("%s: this kvmckpt knows no store for %s:// names (a local path has no \"://\")", name, scheme)
	}
	return s, nil
}

// IsStored reports whether name is a checkpoint in a store rather than a
// local file.
func IsStored(name string) bool {
	scheme, _, ok := strings.Cut(name, "://")
	return ok && scheme != "" && !strings.ContainsAny(scheme, "/.")
}

// CheckTarget asks the store of name, if it is in one, whether a
// checkpoint can be written there (see [Store].Check). Local paths are
// checked by [Create].
func CheckTarget(name string) error {
	s, err := storeOf(name)
	if err != nil || s == nil {
		return err
	}
	return s.Check(name)
}

// beside returns the name of the checkpoint called base next to name: in
// the same directory, or under the same prefix of a store.
func beside(name, base string) string {
	if IsStored(name) {
		return name[:strings.LastIndexByte(name, '/')+1] + base
	}
	return filepath.Join(filepath.Dir(name), base)
}

// baseName is the last element of name, what a child records of its
// parent.
func baseName(name string) string {
	if IsStored(name) {
		return name[strings.LastIndexByte(name, '/')+1:]
	}
	return filepath.Base(name)
}

// sinkWriter is a Sink as the Writer's byte stream.
type sinkWriter struct{ Sink }

func (sinkWriter) Flush() error { return nil }

// Cancel stops the sink's work in flight, if it can, so that a blocked
// Write returns: what a cancelled save asks of it. Abort still follows.
func (s sinkWriter) Cancel() {
	if c, ok := s.Sink.(interface{ Cancel() }); ok {
		c.Cancel()
	}
}

// Rate is the sink's, if it measures one (see [CompressionAuto]).
func (s sinkWriter) Rate() float64 {
	if p, ok := s.Sink.(diskPace); ok {
		return p.Rate()
	}
	return 0
}

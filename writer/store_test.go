package writer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// memStore keeps checkpoints in memory: the contract between the writer
// and a store, without one. Its sinks can be made to block in Write until
// cancelled, as an upload to a store that hangs does.
type memStore struct {
	mu      sync.Mutex
	objects map[string][]byte
	block   bool // Writes block until Cancel
	aborted int
	// Views asked of its blobs, and lent.
	views, lent atomic.Int64
}

type memObjSink struct {
	st     *memStore
	name   string
	buf    bytes.Buffer
	cancel chan struct{}
	once   sync.Once
	done   bool
}

// memBlob lends every other range it is asked for (a Viewer), so that a
// restore takes both ways to a chunk's bytes.
type memBlob struct {
	*bytes.Reader
	data  []byte
	views *atomic.Int64
	lent  *atomic.Int64
}

func (memBlob) Close() error { return nil }

func (m memBlob) View(off int64, n int) ([]byte, func(), bool) {
	if m.views.Add(1)%2 == 0 || off+int64(n) > int64(len(m.data)) {
		return nil, nil, false
	}
	m.lent.Add(1)
	return m.data[off : off+int64(n)], func() {}, true
}

func (m *memStore) Check(name string) error { return nil }

func (m *memStore) Create(name string, hint int64) (Sink, error) {
	return &memObjSink{st: m, name: name, cancel: make(chan struct{})}, nil
}

func (m *memStore) Open(name string) (Blob, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.objects[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	return memBlob{Reader: bytes.NewReader(b), data: b, views: &m.views, lent: &m.lent}, nil
}

func (s *memObjSink) Write(p []byte) (int, error) {
	if s.st.block {
		<-s.cancel
		return 0, context.Canceled
	}
	return s.buf.Write(p)
}

func (s *memObjSink) Cancel() { s.once.Do(func() { close(s.cancel) }) }

func (s *memObjSink) Commit() error {
	s.st.mu.Lock()
	defer s.st.mu.Unlock()
	s.st.objects[s.name] = bytes.Clone(s.buf.Bytes())
	s.done = true
	return nil
}

func (s *memObjSink) Abort() error {
	if !s.done {
		s.done = true
		s.st.mu.Lock()
		s.st.aborted++
		s.st.mu.Unlock()
	}
	return nil
}

func (s *memObjSink) String() string { return s.name }

// TestStore: a checkpoint written to and read from a store is the file
// the same writer writes locally, byte for byte, chains included (the
// parent found beside the child, under the same prefix); a cancelled
// save unblocks a sink that hangs and aborts it, leaving no object.
func TestStore(t *testing.T) {
	st := &memStore{objects: map[string][]byte{}}
	RegisterStore("mem", st)
	h := testHeader(512)
	ram := newRAM(&h, mixed)
	used := pagemap.NewBitmap(512)
	used.SetRange(3, 300)
	dev := []byte("device state")

	local := t.TempDir() + "/a.kvmckpt"
	writeFile(t, local, h, Options{}, ram, used, dev)
	writeFile(t, "mem://bucket/dir/a.kvmckpt", h, Options{}, ram, used, dev)
	want, err := os.ReadFile(local)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, st.objects["mem://bucket/dir/a.kvmckpt"]))
	c, err := OpenChain("mem://bucket/dir/a.kvmckpt", ChainOptions{})
	require.NoError(t, err)
	require.NoError(t, c.Verify(nil))
	p, err := c.AsParent()
	require.NoError(t, err)
	require.Equal(t, "a.kvmckpt", p.Name)
	// Restored from the store, chunks lent by the blob and read from it.
	got := make(memWriterAt, 512*PageSize)
	require.NoError(t, c.RestorePagesTo(got, RestoreOptions{}))
	require.True(t, bytes.Equal(concat(expectedRAM(ram, used, 0)), got))
	require.Positive(t, st.lent.Load())
	require.Greater(t, st.views.Load(), st.lent.Load())
	c.Close()
	require.Equal(t, "mem://bucket/dir/b", beside("mem://bucket/dir/a.kvmckpt", "b"))
	_, err = OpenKey("mem://bucket/none", nil)
	require.ErrorIs(t, err, fs.ErrNotExist)
	_, err = Create("nostore://b/k", h, Options{})
	require.ErrorContains(t, err, "knows no store for nostore://")
	_, err = CreateLive("mem://bucket/live", h, Options{})
	require.ErrorContains(t, err, "save it to a local file")

	st.block = true
	w, err := Create("mem://bucket/dir/hung.kvmckpt", h, Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	err = w.WritePagesContext(ctx, ram, used, nil)
	require.Error(t, err)
	require.True(t, errors.Is(err, context.Canceled), "%v", err)
	require.NoError(t, w.Abort())
	require.Equal(t, 1, st.aborted)
	_, ok := st.objects["mem://bucket/dir/hung.kvmckpt"]
	require.False(t, ok)
}

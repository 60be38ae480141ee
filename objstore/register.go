package objstore

import (
	"context"

	"github.com/kvmckpt/kvmckpt/writer"
)

// Register makes s3://BUCKET/KEY names checkpoints in the store cfg
// reaches, for the writer's Create, Open and OpenChain (and so for every
// kvmckpt command that takes a checkpoint's name).
func Register(cfg Config) {
	writer.RegisterStore(Scheme, asWriterStore{New(cfg)})
}

// asWriterStore is a Store as the writer asks for one.
type asWriterStore struct{ s *Store }

func (a asWriterStore) Check(name string) error {
	return a.s.Check(context.Background(), name)
}

func (a asWriterStore) Create(name string, sizeHint int64) (writer.Sink, error) {
	return a.s.Create(context.Background(), name, sizeHint)
}

func (a asWriterStore) Open(name string) (writer.Blob, error) {
	return a.s.Open(context.Background(), name)
}

package writer_test

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

func Example() {
	dir, err := os.MkdirTemp("", "kvmckpt-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "vm.kvmckpt")

	// A guest with 1 MiB of RAM in one backend; in real use, ram is the
	// mapping of the backend's file and used has the free and zero pages
	// cleared.
	ram := bytes.Repeat([]byte("guest memory "), 1<<20/13+1)[:1<<20]
	used := pagemap.NewBitmap(uint64(len(ram)) / writer.PageSize)
	used.SetRange(0, 100)
	h := writer.Header{Regions: []writer.Region{{ID: "pc.ram", Size: uint64(len(ram))}}}

	w, err := writer.Create(path, h, writer.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Abort() // removes the temporary file unless Commit succeeded
	if err := w.WritePages([][]byte{ram}, used, nil); err != nil {
		log.Fatal(err)
	}
	if _, err := w.WriteDeviceState(strings.NewReader("QEVM...")); err != nil {
		log.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		log.Fatal(err)
	}

	r, err := writer.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	if err := r.Verify(nil); err != nil {
		log.Fatal(err)
	}
	dst := [][]byte{make([]byte, len(ram))}
	if err := r.RestorePages(dst, writer.RestoreOptions{}); err != nil {
		log.Fatal(err)
	}
	if err := r.FillUnsaved(dst); err != nil {
		log.Fatal(err)
	}
	fmt.Println(r.Header().Pages.Saved, "pages in", r.NumChunks(), "chunks")
	fmt.Println(bytes.Equal(dst[0][:100*writer.PageSize], ram[:100*writer.PageSize]))
	// Output:
	// 100 pages in 1 chunks
	// true
}

func Example_encryption() {
	dir, err := os.MkdirTemp("", "kvmckpt-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "vm.kvmckpt")

	// In real use, the key comes from a file made with
	// `head -c 32 /dev/urandom > key; chmod 600 key`.
	keyPath := filepath.Join(dir, "key")
	if err := os.WriteFile(keyPath, []byte("0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		log.Fatal(err)
	}
	key, err := writer.LoadKeyFile(keyPath)
	if err != nil {
		log.Fatal(err)
	}

	ram := bytes.Repeat([]byte("secret "), writer.PageSize)[:4*writer.PageSize]
	used := pagemap.NewBitmap(4)
	used.SetRange(0, 4)
	h := writer.Header{Regions: []writer.Region{{ID: "pc.ram", Size: uint64(len(ram))}}}
	w, err := writer.Create(path, h, writer.Options{Key: key})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Abort()
	if err := w.WritePages([][]byte{ram}, used, nil); err != nil {
		log.Fatal(err)
	}
	if _, err := w.WriteDeviceState(strings.NewReader("QEVM...")); err != nil {
		log.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		log.Fatal(err)
	}

	_, err = writer.Open(path)
	fmt.Println(errors.Is(err, writer.ErrEncrypted))
	r, err := writer.OpenKey(path, key)
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	fmt.Println(r.Encrypted(), r.Verify(nil))
	// Output:
	// true
	// true <nil>
}

package writer

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
)

// KeySize is the size in bytes of an encryption key: an AES-256 key.
const KeySize = 32

// Constants of encrypted files; see the package documentation.
const (
	cipherAES256GCM = 1            // the cipher field of a version 2 header
	saltLen         = 32           // per-file salt
	keyCheckLen     = 32           // key check value
	tagLen          = 16           // GCM tag appended to every sealed message
	nonceLen        = 12           // GCM standard nonce: part uint32, number uint64
	sealBlock       = 1 << 20      // content bytes per sealed block of a section
	hkdfInfo        = "kvmckpt v2" // HKDF info: the scheme of format version 2
	aadLen          = sha256.Size + 1 + 8 + 1
	// sealedFixedHeaderLen is the clear part of a version 2 header:
	// magic, version, bodyLen, cipher, salt, key check.
	sealedFixedHeaderLen = fixedHeaderLen + 4 + saltLen + keyCheckLen
)

// sealer seals and opens the messages of one encrypted file. Its AEAD is
// crypto/cipher's GCM, whose state is fixed at creation (see
// crypto/internal/fips140/aes/gcm.GCM), so a sealer is safe for concurrent
// use once its context is set.
type sealer struct {
	aead  cipher.AEAD
	check [keyCheckLen]byte
	// context is the SHA-256 of the header's clear part and plaintext
	// body: the additional data that binds every message but the header's
	// to the header. Set, by sealHeader or the Reader, before any such
	// message is sealed or opened.
	context [sha256.Size]byte
}

// newSealer derives the file key and key check value of the file with
// salt from key: HKDF-SHA256 (RFC 5869) of key, with salt and info
// [hkdfInfo], gives 64 bytes, the file key and then the key check value.
func newSealer(key, salt []byte) (*sealer, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("key of %d bytes, want %d", len(key), KeySize)
	}
	okm, err := hkdf.Key(sha256.New, key, salt, hkdfInfo, KeySize+keyCheckLen)
	if err != nil {
		return nil, fmt.Errorf("derive file key: %w", err)
	}
	defer clear(okm)
	block, err := aes.NewCipher(okm[:KeySize])
	if err != nil {
		return nil, fmt.Errorf("derive file key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		// GODEBUG=fips140=only refuses GCM with nonces of our making.
		return nil, fmt.Errorf("set up AES-GCM: %w", err)
	}
	s := &sealer{aead: aead}
	copy(s.check[:], okm[KeySize:])
	return s, nil
}

// headerContext returns the context of a header with clearPart and
// plaintext body.
func headerContext(clearPart, body []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(clearPart)
	h.Write(body)
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// nonce returns the nonce of message number n of part: unique in the
// file, as the (part, number) pairs are.
func nonce(part Part, n uint64) [nonceLen]byte {
	var b [nonceLen]byte
	binary.LittleEndian.PutUint32(b[:], uint32(part))
	binary.LittleEndian.PutUint64(b[4:], n)
	return b
}

// aad returns the additional data of message number n of part, final if
// it is the last block of its section, or a chunk.
func (s *sealer) aad(part Part, n uint64, final bool) [aadLen]byte {
	var b [aadLen]byte
	copy(b[:], s.context[:])
	b[sha256.Size] = byte(part)
	binary.LittleEndian.PutUint64(b[sha256.Size+1:], n)
	if final {
		b[aadLen-1] = 1
	}
	return b
}

// seal appends to dst the sealed plain, message number n of part. dst may
// be plain[:0], with room for the tag, to seal in place.
func (s *sealer) seal(dst, plain []byte, part Part, n uint64, final bool) []byte {
	iv, ad := nonce(part, n), s.aad(part, n, final)
	return s.aead.Seal(dst, iv[:], plain, ad[:])
}

// open appends to dst the content of sealed, message number n of part.
// dst may be sealed[:0] to open in place.
func (s *sealer) open(dst, sealed []byte, part Part, n uint64, final bool) ([]byte, error) {
	iv, ad := nonce(part, n), s.aad(part, n, final)
	return s.aead.Open(dst, iv[:], sealed, ad[:])
}

// sealHeader seals the header body under the clear part of the header,
// appending it to clearPart, and sets the context.
func (s *sealer) sealHeader(clearPart, body []byte) []byte {
	s.context = headerContext(clearPart, body)
	iv := nonce(PartHeader, 0)
	return s.aead.Seal(clearPart, iv[:], body, clearPart)
}

// openHeader opens the sealed header body, whose clear part is clearPart.
func (s *sealer) openHeader(clearPart, sealed []byte) ([]byte, error) {
	iv := nonce(PartHeader, 0)
	return s.aead.Open(nil, iv[:], sealed, clearPart)
}

// sealedLen returns the stored length of a section of n content bytes
// sealed in blocks of [sealBlock]; an empty section is one empty block.
func sealedLen(n uint64) uint64 {
	blocks := max(1, (n+sealBlock-1)/sealBlock)
	return n + blocks*tagLen
}

// openedLen returns the content length of a section stored as stored
// bytes of sealed blocks, and whether there is one.
func openedLen(stored uint64) (uint64, bool) {
	if stored < tagLen {
		return 0, false
	}
	blocks := (stored + sealBlock + tagLen - 1) / (sealBlock + tagLen)
	n := stored - blocks*tagLen
	return n, sealedLen(n) == stored
}

// openBlocks opens in place the blocks of the sealed section b of part,
// found at file offset off, and returns its content, a prefix of b.
func (s *sealer) openBlocks(part Part, off int64, b []byte) ([]byte, error) {
	var n int
	for k, o := uint64(0), 0; ; k++ {
		end := min(o+sealBlock+tagLen, len(b))
		plain, err := s.open(b[o:o], b[o:end], part, k, end == len(b))
		if err != nil {
			return nil, formatErr(part, 0, off+int64(o), ErrAuthFailed, "block %d: changed or moved since it was sealed", k)
		}
		n += copy(b[n:], plain)
		if o = end; o == len(b) {
			return b[:n], nil
		}
	}
}

// LoadKeyFile reads an encryption key from the file at path: exactly
// [KeySize] bytes, or 2*KeySize hexadecimal digits and an optional
// newline, as `head -c 32 /dev/urandom` or `openssl rand -hex 32` write
// them. It refuses a file that its group or others may access, as ssh
// does a private key: the key opens every checkpoint sealed with it.
func LoadKeyFile(path string) ([]byte, error) {
	f, err := safefile.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("load key file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("load key file %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("load key file %s: mode %04o lets group or others access it: chmod 600 %s", path, perm, path)
	}
	// Room for the longest valid file, hex and "\r\n", and one byte more
	// to tell a longer one.
	buf := make([]byte, 2*KeySize+3)
	defer clear(buf)
	n, err := io.ReadFull(f, buf)
	switch {
	case err == nil:
		return nil, fmt.Errorf("load key file %s: more than %d bytes: want %d raw bytes, or %d hex digits and an optional newline", path, len(buf)-1, KeySize, 2*KeySize)
	case !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF):
		return nil, fmt.Errorf("load key file: %w", err)
	}
	b := buf[:n]
	if n == KeySize {
		return append([]byte(nil), b...), nil
	}
	if n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
		if n > 1 && b[n-2] == '\r' {
			b = b[:n-2]
		}
	}
	if len(b) != 2*KeySize {
		what := fmt.Sprintf("%d bytes", n)
		if len(b) != n {
			what += fmt.Sprintf(", %d before the newline", len(b))
		}
		return nil, fmt.Errorf("load key file %s: %s: want %d raw bytes, or %d hex digits and an optional newline", path, what, KeySize, 2*KeySize)
	}
	key := make([]byte, KeySize)
	if _, err := hex.Decode(key, b); err != nil {
		return nil, fmt.Errorf("load key file %s: %d characters but not hex digits: %w", path, len(b), err)
	}
	return key, nil
}

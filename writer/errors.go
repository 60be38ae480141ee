package writer

import (
	"errors"
	"fmt"
)

var (
	// ErrBadMagic means the file does not start with the checkpoint magic:
	// it is not a checkpoint.
	ErrBadMagic = errors.New("not a kvmckpt checkpoint")
	// ErrNewerVersion means the file is a checkpoint of a format version
	// newer than [FormatVersion].
	ErrNewerVersion = errors.New("checkpoint format version newer than supported")
	// ErrCorrupt means a checksum, length, offset or value in the file is
	// wrong.
	ErrCorrupt = errors.New("checkpoint corrupt")
	// ErrTruncated means the file ends before a part it declares, or has no
	// trailer: it was cut short or never committed.
	ErrTruncated = errors.New("checkpoint truncated")
	// ErrTooLarge means an input to the writer exceeds a limit of the
	// format or of [Options].
	ErrTooLarge = errors.New("exceeds checkpoint limit")
	// ErrAuthFailed means a sealed part of an encrypted checkpoint does not
	// authenticate: it was changed, or moved from another position or
	// file, after it was sealed. It wraps [ErrCorrupt], as it is a kind of
	// corruption; a reader checks a part's CRC first, so ErrAuthFailed
	// rather than a CRC error points at a deliberate change.
	ErrAuthFailed = fmt.Errorf("%w: authentication failed", ErrCorrupt)
	// ErrEncrypted means the checkpoint is encrypted and no key was given.
	ErrEncrypted = errors.New("checkpoint is encrypted: give the key with --encrypt-key FILE")
	// ErrNotEncrypted means a key was given for a checkpoint that is not
	// encrypted, so nothing in it is authenticated.
	ErrNotEncrypted = errors.New("checkpoint is not encrypted")
	// ErrWrongKey means the checkpoint is encrypted under another key.
	ErrWrongKey = errors.New("wrong key")
)

// Part names a part of a checkpoint file.
type Part uint8

// The parts of a checkpoint file, in file order (but for the chain
// section's).
const (
	PartHeader Part = iota + 1
	PartBitmap
	PartChunk
	PartIndex
	PartDeviceState
	PartTrailer
	// The chain section of a version 4 file, between the device state
	// and the trailer.
	PartInUse
	PartHashes
)

func (p Part) String() string {
	switch p {
	case PartHeader:
		return "header"
	case PartBitmap:
		return "bitmap"
	case PartChunk:
		return "chunk"
	case PartIndex:
		return "index"
	case PartDeviceState:
		return "device state"
	case PartTrailer:
		return "trailer"
	case PartInUse:
		return "in-use bitmap"
	case PartHashes:
		return "page hashes"
	}
	return fmt.Sprintf("Part(%d)", uint8(p))
}

// FormatError is a problem with a checkpoint file, located in one of its
// parts. Err is one of the package's sentinel errors, or an I/O error met
// while reading the part.
type FormatError struct {
	Part Part
	// Index is the chunk number if Part is [PartChunk], else 0.
	Index int
	// Offset is the file offset of the part, or of the problem within it.
	Offset int64
	// Msg says what is wrong.
	Msg string
	Err error
}

func (e *FormatError) Error() string {
	part := e.Part.String()
	if e.Part == PartChunk {
		part = fmt.Sprintf("chunk %d", e.Index)
	}
	return fmt.Sprintf("checkpoint %s at offset %#x: %s: %v", part, e.Offset, e.Msg, e.Err)
}

func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(part Part, index int, off int64, err error, format string, args ...any) *FormatError {
	return &FormatError{Part: part, Index: index, Offset: off, Msg: fmt.Sprintf(format, args...), Err: err}
}

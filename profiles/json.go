package profiles

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// MaxProfileSize bounds the profile JSON [Decode] accepts. Built profiles
// are about 30 KiB.
const MaxProfileSize = 16 << 20

// Encode validates p and writes it as compact JSON with a trailing
// newline. Map keys are sorted, so equal profiles encode identically.
func (p *Profile) Encode(w io.Writer) error {
	if err := p.Validate(); err != nil {
		return fmt.Errorf("encode profile: %w", err)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encode profile: %w", err)
	}
	if _, err := w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write profile: %w", err)
	}
	return nil
}

// Decode reads a profile written by [Profile.Encode] and validates it
// (see [Profile.Validate]). Input beyond [MaxProfileSize] is refused with
// an error wrapping [ErrTooLarge]; malformed JSON wraps [ErrMalformed]; a
// newer format version wraps [ErrUnsupportedVersion]. Unknown JSON
// members are ignored, so a reader of the same version accepts profiles
// from writers that added optional members.
func Decode(r io.Reader) (*Profile, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxProfileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read profile: %w", err)
	}
	if len(b) > MaxProfileSize {
		return nil, fmt.Errorf("read profile: more than %d bytes: %w", MaxProfileSize, ErrTooLarge)
	}
	// Check the version before the rest, so that a future format that
	// changed a member's type reports the version, not a type error.
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, jsonErr("profile JSON", b, err)
	}
	if v.Version < 1 || v.Version > FormatVersion {
		return nil, fmt.Errorf("decode profile: version %d (this program reads up to %d): %w", v.Version, FormatVersion, ErrUnsupportedVersion)
	}
	var p Profile
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&p); err != nil {
		return nil, jsonErr("profile JSON", b, err)
	}
	if dec.More() {
		return nil, formatErr("profile JSON", dec.InputOffset(), "trailing data after the profile")
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("decode profile: %w", err)
	}
	return &p, nil
}

// jsonErr converts an encoding/json error into a FormatError with the
// offset where it is known.
func jsonErr(what string, b []byte, err error) error {
	off := int64(-1)
	switch e := err.(type) {
	case *json.SyntaxError:
		off = e.Offset
	case *json.UnmarshalTypeError:
		off = e.Offset
	}
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		off = int64(len(b))
	}
	return &FormatError{What: what, Off: off, Msg: "decode", Err: err}
}

package profiles

import (
	"errors"
	"fmt"
)

// Sentinel errors. Functions wrap them with context; test for them with
// [errors.Is].
var (
	// ErrNotKernelImage means a file is neither an x86 bzImage nor an
	// ELF vmlinux.
	ErrNotKernelImage = errors.New("not an x86 bzImage or ELF vmlinux")
	// ErrUnsupportedCompression means a bzImage payload uses a
	// compression (or an xz filter) this package does not decode.
	ErrUnsupportedCompression = errors.New("unsupported compression")
	// ErrMalformed means input is structurally invalid. [FormatError]
	// wraps it and says where.
	ErrMalformed = errors.New("malformed input")
	// ErrTooLarge means input, or what it decompresses to, exceeds a
	// size limit of this package.
	ErrTooLarge = errors.New("input too large")
	// ErrNoKallsyms means no kallsyms tables were found in a kernel
	// image and no other symbol source was given.
	ErrNoKallsyms = errors.New("no kallsyms tables found (is the kernel built with CONFIG_KALLSYMS=y and CONFIG_KALLSYMS_ALL=y?)")
	// ErrNoBTF means the kernel carries no BTF type information.
	ErrNoBTF = errors.New("no BTF type information in the kernel: supply a Volatility 3 ISF file (dwarf2json) for it, or use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
	// ErrMissingSymbol means a required symbol is absent. [MissingError]
	// wraps it.
	ErrMissingSymbol = errors.New("required symbol missing")
	// ErrMissingType means a required struct, field, enum value or
	// constant is absent. [MissingError] wraps it.
	ErrMissingType = errors.New("required type information missing")
	// ErrMismatch means two sources of the same fact disagree, for example
	// vmcoreinfo and BTF on a field offset. [MismatchError] wraps it.
	ErrMismatch = errors.New("sources disagree")
	// ErrBannerMismatch means a profile is for another kernel build than
	// the one it is used with. [BannerMismatchError] wraps it.
	ErrBannerMismatch = errors.New("kernel banner mismatch")
	// ErrUnsupportedVersion means a profile has a format version newer
	// than [FormatVersion] (or an invalid one).
	ErrUnsupportedVersion = errors.New("unsupported profile format version")
	// ErrInvalidProfile means a profile failed [Profile.Validate].
	ErrInvalidProfile = errors.New("invalid profile")
	// ErrProfileNotFound means a [Store] holds no profile for a banner.
	ErrProfileNotFound = errors.New("profile not found")
)

// FormatError reports malformed input: what was being parsed, where, and
// why. It wraps [ErrMalformed] unless Err says otherwise.
type FormatError struct {
	// What names the format, for example "bzImage", "xz", "kallsyms".
	What string
	// Off is the byte offset in that input, or -1 if unknown.
	Off int64
	// Msg says what is wrong.
	Msg string
	// Err is the underlying error; nil means [ErrMalformed].
	Err error
}

func (e *FormatError) Error() string {
	s := e.What
	if e.Off >= 0 {
		s += fmt.Sprintf(" at offset %#x", e.Off)
	}
	s += ": " + e.Msg
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *FormatError) Unwrap() error {
	if e.Err == nil {
		return ErrMalformed
	}
	return e.Err
}

// Is reports ErrMalformed for every FormatError, whatever Err is, so a
// caller can tell bad input from other failures.
func (e *FormatError) Is(target error) bool { return target == ErrMalformed }

func formatErr(what string, off int64, format string, args ...any) error {
	return &FormatError{What: what, Off: off, Msg: fmt.Sprintf(format, args...)}
}

// MissingError names a required item that is absent. It wraps
// [ErrMissingSymbol] for Kind "symbol" and [ErrMissingType] otherwise.
type MissingError struct {
	// Kind is "symbol", "struct", "field", "enum value" or "constant".
	Kind string
	// Name is the item, for example "node_data" or "zone.free_area".
	Name string
}

func (e *MissingError) Error() string { return fmt.Sprintf("missing %s %s", e.Kind, e.Name) }

func (e *MissingError) Unwrap() error {
	if e.Kind == "symbol" {
		return ErrMissingSymbol
	}
	return ErrMissingType
}

// MismatchError reports that two sources disagree on one fact. It wraps
// [ErrMismatch].
type MismatchError struct {
	// What is the fact, for example "OFFSET(page.lru)" or "symbol _text".
	What string
	// Source is the source checked against, for example "vmcoreinfo".
	Source string
	// Got is the value this package derived (from BTF or kallsyms).
	Got string
	// Want is the value Source states.
	Want string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("%s: derived %s but %s says %s", e.What, e.Got, e.Source, e.Want)
}

func (e *MismatchError) Unwrap() error { return ErrMismatch }

// BannerMismatchError reports that a profile's banner is not the banner of
// the running kernel. It wraps [ErrBannerMismatch].
type BannerMismatchError struct {
	// Profile is the banner recorded in the profile.
	Profile string
	// Kernel is the banner of the kernel at hand.
	Kernel string
}

func (e *BannerMismatchError) Error() string {
	return fmt.Sprintf("kernel banner mismatch: profile is for %q, kernel is %q", e.Profile, e.Kernel)
}

func (e *BannerMismatchError) Unwrap() error { return ErrBannerMismatch }

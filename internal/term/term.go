// Package term makes untrusted text safe to print on a terminal. Text from
// a checkpoint, a profile, guest memory or QEMU can hold escape sequences
// and carriage returns that would rewrite what an operator sees (hide an
// option in a command line they are about to run, fake a line of output);
// printed through [Escape] it shows every such byte as a visible escape.
// JSON output needs none of this: encoding/json escapes control characters
// itself, so --json stays exact.
package term

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Escape returns s with every byte that is not printable text shown as an
// escape: control characters (newline and tab included), C1 controls,
// bidirectional overrides, invalid UTF-8, and the backslash itself (so
// that an escape in the output always stands for a byte of the input).
func Escape(s string) string { return escape(s, "") }

// EscapeText is [Escape] that leaves newlines and tabs as they are: for
// multi-line messages such as errors, whose lines are the writer's own.
func EscapeText(s string) string { return escape(s, "\n\t") }

func escape(s, keep string) string {
	if safe(s, keep) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case strings.ContainsRune(keep, r):
			b.WriteRune(r)
		case printable(r):
			b.WriteString(s[i : i+n])
		case r < 0x80:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
		i += n
	}
	return b.String()
}

func safe(s, keep string) bool {
	for _, r := range s {
		if r == utf8.RuneError || r == '\\' || !printable(r) && !strings.ContainsRune(keep, r) {
			return false
		}
	}
	return true
}

// printable reports whether r shows as itself: graphic, and not one of
// the format characters that reorder or hide the text around them.
func printable(r rune) bool {
	if r == ' ' {
		return true
	}
	if !unicode.IsGraphic(r) || unicode.Is(unicode.Cf, r) {
		return false
	}
	return true
}

// ShellQuote quotes one word for a POSIX shell so that pasting it gives
// back exactly s: bare where it holds only safe characters, in single
// quotes where it holds other printable text, and as $'...' with escapes
// where it holds anything a terminal would act on.
func ShellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=,:@+", r))
	}) < 0 {
		return s
	}
	if safe(s, "") {
		return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
	}
	var b strings.Builder
	b.WriteString("$'")
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\'' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c >= 0x20 && c < 0x7f:
			b.WriteByte(c)
		default:
			// Every other byte, UTF-8 included, as an escape: a
			// bidirectional override must not act on the terminal.
			fmt.Fprintf(&b, `\x%02x`, c)
		}
	}
	b.WriteByte('\'')
	return b.String()
}

// ShellJoin quotes argv for a POSIX shell with [ShellQuote].
func ShellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = ShellQuote(a)
	}
	return strings.Join(q, " ")
}

package term

import (
	"os/exec"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestEscape(t *testing.T) {
	for _, c := range []struct{ in, want, text string }{
		{"plain text, 100%", "plain text, 100%", "plain text, 100%"},
		{"Linux version 6.1.0 (gcc-12) #1", "Linux version 6.1.0 (gcc-12) #1", ""},
		{"a\x1b[2Kb", `a\x1b[2Kb`, `a\x1b[2Kb`},
		{"restore into: x\rfake", `restore into: x\x0dfake`, `restore into: x\x0dfake`},
		{"two\nlines\tand tab", `two\x0alines\x09and tab`, "two\nlines\tand tab"},
		{"back\\slash", `back\\slash`, `back\\slash`},
		{"bad \xff utf8", `bad \xff utf8`, `bad \xff utf8`},
		{"c1 \u009b control", `c1 \u009b control`, `c1 \u009b control`},
		{"bidi \u202e override", `bidi \u202e override`, `bidi \u202e override`},
		{"del \x7f", `del \x7f`, `del \x7f`},
		{"Grüße, 日本", "Grüße, 日本", "Grüße, 日本"},
	} {
		if got := Escape(c.in); got != c.want {
			t.Errorf("Escape(%q) = %q, want %q", c.in, got, c.want)
		}
		text := c.text
		if text == "" {
			text = c.want
		}
		if got := EscapeText(c.in); got != text {
			t.Errorf("EscapeText(%q) = %q, want %q", c.in, got, text)
		}
	}
}

// terminalSafe reports whether s holds nothing a terminal acts on.
func terminalSafe(s, keep string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if strings.ContainsRune(keep, r) {
			continue
		}
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069 {
			return false
		}
	}
	return true
}

func FuzzEscape(f *testing.F) {
	for _, s := range []string{"", "abc", "a\x1b]0;title\x07b", "\r\n\t", "\xff\xfe", "\u202e", "'\\$'"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if e := Escape(s); !terminalSafe(e, "") {
			t.Fatalf("Escape(%q) = %q is not safe to print", s, e)
		}
		if e := EscapeText(s); !terminalSafe(e, "\n\t") {
			t.Fatalf("EscapeText(%q) = %q is not safe to print", s, e)
		}
		if q := ShellQuote(s); !terminalSafe(q, "") {
			t.Fatalf("ShellQuote(%q) = %q is not safe to print", s, q)
		}
	})
}

// TestShellQuoteRoundTrip pastes quoted words into bash and checks it
// gives back the bytes.
func TestShellQuoteRoundTrip(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	words := []string{"plain", "with space", "it's", "esc\x1b[31mred", "cr\rlf\n", "back\\slash", "ümlaut", "\u202eevil", "$HOME", ""}
	script := "printf '%s\\0' " + ShellJoin(words)
	out, err := exec.Command(bash, "-c", script).Output()
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	if len(got) != len(words) {
		t.Fatalf("bash gave %d words, want %d: %q", len(got), len(words), got)
	}
	for i := range words {
		if got[i] != words[i] {
			t.Errorf("word %d: bash gave %q, want %q", i, got[i], words[i])
		}
	}
}

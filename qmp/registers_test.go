package qmp

import (
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// fixtureRegister finds NAME=HEX in a fixture independently of the parser.
func fixtureRegister(tb testing.TB, text, name string) uint64 {
	tb.Helper()
	m := regexp.MustCompile(`(?:^|\s)` + name + ` ?=([0-9a-f]+)`).FindStringSubmatch(text)
	if m == nil {
		tb.Fatalf("fixture has no %s", name)
	}
	v, err := strconv.ParseUint(m[1], 16, 64)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

func TestParseRegistersFixtures(t *testing.T) {
	tests := []struct {
		file     string
		levels   int
		longMode bool
	}{
		{"registers-pc-reset.txt", 0, false},
		{"registers-q35-ovmf.txt", 4, true},
		{"registers-linux-la57.txt", 5, true},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			text := readFixture(t, tt.file)
			got, err := parseRegisters(strings.NewReader(text))
			if err != nil {
				t.Fatal(err)
			}
			ip, sp, fl := "RIP", "RSP", "RFL"
			if !tt.longMode {
				ip, sp, fl = "EIP", "ESP", "EFL"
			}
			want := Registers{
				CPU:    0,
				RIP:    fixtureRegister(t, text, ip),
				RSP:    fixtureRegister(t, text, sp),
				RFLAGS: fixtureRegister(t, text, fl),
				CR0:    fixtureRegister(t, text, "CR0"),
				CR2:    fixtureRegister(t, text, "CR2"),
				CR3:    fixtureRegister(t, text, "CR3"),
				CR4:    fixtureRegister(t, text, "CR4"),
				EFER:   fixtureRegister(t, text, "EFER"),
				CPL:    0,
			}
			if tt.longMode {
				want.HasGPR = true
				for i, n := range gprNames {
					want.GPR[i] = fixtureRegister(t, text, n)
				}
			}
			for i, n := range segNames {
				want.Seg[i] = fixtureSegment(t, text, n)
			}
			if got != want {
				t.Errorf("got  %+v\nwant %+v", got, want)
			}
			if got.PagingLevels() != tt.levels || got.LongMode() != tt.longMode || got.LA57() != (tt.levels == 5) {
				t.Errorf("PagingLevels() = %d, LongMode() = %v, LA57() = %v; want %d levels, long mode %v",
					got.PagingLevels(), got.LongMode(), got.LA57(), tt.levels, tt.longMode)
			}
		})
	}

	// The reset state is architectural (SDM Vol. 3A table 10-1).
	reset, err := parseRegisters(strings.NewReader(readFixture(t, "registers-pc-reset.txt")))
	if err != nil {
		t.Fatal(err)
	}
	if reset.RIP != 0xfff0 || reset.CR0 != 0x60000010 || reset.CR3 != 0 || reset.CR4 != 0 || reset.EFER != 0 || reset.RFLAGS != 2 {
		t.Errorf("reset state: %+v", reset)
	}
}

func TestParseRegisters(t *testing.T) {
	twoCPUs := "\r\nCPU#3\r\nRIP=0000000000001000 RFL=00000002 [-------] CPL=3 II=0\r\n" +
		"R8 =0000000000000008 R9 =0000000000000009\r\n" +
		"CR0=80000011 CR2=0000000000000000 CR3=0000000000002000 CR4=00000020\r\n" +
		"EFER=0000000000000500\r\n" +
		"CPU#4\r\nRIP=0000000000009999\r\nCR0=1 CR3=1 CR4=1 EFER=1\r\n"
	got, err := parseRegisters(strings.NewReader(twoCPUs))
	if err != nil {
		t.Fatal(err)
	}
	want := Registers{CPU: 3, RIP: 0x1000, RFLAGS: 2, CR0: 0x80000011, CR3: 0x2000, CR4: 0x20, EFER: 0x500, CPL: 3}
	// R8 and R9 alone are not the general-purpose registers.
	if got != want {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
	if got.PagingLevels() != 4 {
		t.Errorf("PagingLevels() = %d, want 4", got.PagingLevels())
	}

	vals := map[string]uint64{}
	parseRegisterLine("R8 =0000000000807000 R9 =0000000000807020 R10=0000000000000000 ES =0008 0000000000000000 ffffffff 00c09300 DPL=0 DS   [-WA]", vals)
	for name, v := range map[string]uint64{"R8": 0x807000, "R9": 0x807020, "R10": 0, "ES": 8, "ES_BASE": 0, "DPL": 0} {
		if got, ok := vals[name]; !ok || got != v {
			t.Errorf("%s = %#x, %v; want %#x", name, got, ok, v)
		}
	}
	if len(vals) != 6 {
		t.Errorf("parsed %v", vals)
	}

	for _, tt := range []struct{ pae, la57 bool }{{false, false}, {true, false}} {
		r := Registers{CR0: CR0PG | CR0PE}
		if tt.pae {
			r.CR4 |= CR4PAE
		}
		if want := map[bool]int{false: 2, true: 3}[tt.pae]; r.PagingLevels() != want {
			t.Errorf("PAE=%v: PagingLevels() = %d, want %d", tt.pae, r.PagingLevels(), want)
		}
	}

	bad := map[string]string{
		"empty":     "",
		"no header": "RIP=0 CR0=0 CR3=0 CR4=0 EFER=0\n",
		"bad cpu":   "CPU#x\nRIP=0 CR0=0 CR3=0 CR4=0 EFER=0\n",
		"no CR3":    "CPU#0\nRIP=0 CR0=0 CR4=0 EFER=0\n",
		"no EFER":   "CPU#0\nEIP=0 CR0=0 CR3=0 CR4=0\n",
		"no RIP":    "CPU#0\nCR0=0 CR3=0 CR4=0 EFER=0\n",
		"bad hex":   "CPU#0\nRIP=0 CR0=0 CR3=xyz CR4=0 EFER=0\n",
		"too wide":  "CPU#0\nRIP=0 CR0=0 CR3=00000000000000000 CR4=0 EFER=0\n",
		"long line": "CPU#0\n" + strings.Repeat("A", registersMaxLine+1) + "\n",
		"HMP error": "Parameter 'cpu-index' expects a CPU number\r\n",
	}
	for name, in := range bad {
		if got, err := parseRegisters(strings.NewReader(in)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %+v, %v; want ErrMalformed", name, got, err)
		}
	}
}

func FuzzParseRegisters(f *testing.F) {
	addFixtureSeeds(f, "testdata/registers-*.txt")
	f.Fuzz(func(t *testing.T, in string) {
		r, err := parseRegisters(strings.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			return
		}
		if r.CPU < 0 || r.CPL < 0 || r.CPL > 3 {
			t.Fatalf("bad registers %+v", r)
		}
		if l := r.PagingLevels(); l < 0 || l > 5 {
			t.Fatalf("PagingLevels() = %d", l)
		}
	})
}

// fixtureSegment reads a segment register's selector and base from a
// fixture's "NAME =SSSS BASE ..." line; zero if the dump has none.
func fixtureSegment(tb testing.TB, text, name string) Segment {
	tb.Helper()
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != name || !strings.HasPrefix(f[1], "=") {
			continue
		}
		sel, err1 := strconv.ParseUint(f[1][1:], 16, 16)
		base, err2 := strconv.ParseUint(f[2], 16, 64)
		if err1 != nil || err2 != nil {
			tb.Fatalf("segment %s in %q", name, line)
		}
		return Segment{Selector: uint16(sel), Base: base}
	}
	return Segment{}
}

package qmp

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func readFixture(tb testing.TB, name string) string {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	return string(b)
}

func mem0(size uint64) []Backend {
	return []Backend{{ID: "mem0", Type: "memory-backend-file", Size: size, Share: true, region: "mem0"}}
}

const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
)

func TestRAMLayoutFixtures(t *testing.T) {
	// Below 4 GiB, RAM stops at the legacy VGA window (0xa0000) or, with no
	// VGA device, at the option ROM area (0xc0000); the BIOS area up to
	// 1 MiB is firmware. pc puts at most 3 GiB below 4 GiB, q35 at most 2
	// GiB once RAM reaches 2.75 GiB (hw/i386/pc_piix.c, pc_q35.c).
	tests := []struct {
		file string
		size uint64
		want []Mapping
	}{
		{"mtree-pc-1g.txt", 1 * gib, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 1*gib - 1*mib},
		}},
		{"mtree-q35-3g.txt", 3 * gib, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 2*gib - 1*mib},
			{"mem0", 4 * gib, 2 * gib, 1 * gib},
		}},
		{"mtree-pc-4g.txt", 4 * gib, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 3*gib - 1*mib},
			{"mem0", 4 * gib, 3 * gib, 1 * gib},
		}},
		{"mtree-q35-3g-kvm.txt", 3 * gib, []Mapping{
			{"mem0", 0, 0, 0xc0000},
			{"mem0", 1 * mib, 1 * mib, 2*gib - 1*mib},
			{"mem0", 4 * gib, 2 * gib, 1 * gib},
		}},
		// OVMF made 0xc0000-0xc3fff read-only RAM (PAM), the VGA device
		// claims 0xa0000-0xbffff.
		{"mtree-q35-2g-ovmf.txt", 2 * gib, []Mapping{
			{"mem0", 0, 0, 0xa0000},
			{"mem0", 0xc0000, 0xc0000, 16 * kib},
			{"mem0", 1 * mib, 1 * mib, 2*gib - 1*mib},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			views, err := parseMtree(strings.NewReader(readFixture(t, tt.file)))
			if err != nil {
				t.Fatal(err)
			}
			got, err := layout(views, mem0(tt.size))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("layout:\n got %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestParseMtreeViews(t *testing.T) {
	views, err := parseMtree(strings.NewReader(readFixture(t, "mtree-q35-2g-ovmf.txt")))
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(views, func(v flatView) bool { return v.hasSpace("memory") })
	if i < 0 {
		t.Fatal("no view of address space memory")
	}
	v := views[i]
	if v.root != "system" {
		t.Errorf("root = %q, want system", v.root)
	}
	for _, as := range []string{"memory", "cpu-memory-0", "cpu-memory-1", "VGA", "e1000"} {
		if !v.hasSpace(as) {
			t.Errorf("view lacks address space %q: %q", as, v.spaces)
		}
	}
	want := flatRange{start: 0xc1062400, last: 0xc106241f, prio: 0, kind: "i/o", name: "vga ioports remapped"}
	if !slices.Contains(v.ranges, want) {
		t.Errorf("view lacks %+v", want)
	}
	// The SMM address spaces have views of their own; RAMLayout must not
	// pick them although their root region is called "memory".
	smm := slices.IndexFunc(views, func(v flatView) bool { return v.hasSpace("cpu-smm-0") })
	if smm < 0 || views[smm].root != "memory" || smm == i {
		t.Errorf("cpu-smm-0 view: index %d (system %d)", smm, i)
	}
}

func TestParseRange(t *testing.T) {
	tests := []struct {
		line string
		want flatRange
	}{
		{"0000000000000000-00000000000bffff (prio 0, ram): mem0",
			flatRange{0, 0xbffff, 0, "ram", "mem0", 0}},
		{"0000000100000000-000000013fffffff (prio 0, ram): mem0 @0000000080000000",
			flatRange{0x100000000, 0x13fffffff, 0, "ram", "mem0", 0x80000000}},
		{"0000000100000000-000000013fffffff (prio 0, ram): mem0 @0000000080000000 KVM",
			flatRange{0x100000000, 0x13fffffff, 0, "ram", "mem0 KVM", 0x80000000}},
		{"00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM",
			flatRange{0xfffc0000, 0xffffffff, 0, "rom", "pc.bios KVM", 0}},
		{"00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi",
			flatRange{0xfee00000, 0xfeefffff, 4096, "i/o", "apic-msi", 0}},
		{"0000000000000000-0000000000000fff (prio -1, nv-ram): pmem0 @0000000000001000",
			flatRange{0, 0xfff, -1, "nv-ram", "pmem0", 0x1000}},
		{"00000000c1062400-00000000c106241f (prio 0, i/o): vga ioports remapped",
			flatRange{0xc1062400, 0xc106241f, 0, "i/o", "vga ioports remapped", 0}},
		{"0000000000000000-0000000000000fff (prio 0, i/o): odd @name @0000000000000010",
			flatRange{0, 0xfff, 0, "i/o", "odd @name", 0x10}},
	}
	for _, tt := range tests {
		got, err := parseRange(tt.line)
		if err != nil {
			t.Errorf("parseRange(%q): %v", tt.line, err)
			continue
		}
		if got != tt.want {
			t.Errorf("parseRange(%q) =\n %+v, want\n %+v", tt.line, got, tt.want)
		}
	}

	bad := []string{
		"0000000000000000-00000000000bffff",
		"0000000000000000-00000000000bffff (prio 0, ram)",
		"0000000000000000-00000000000bffff (prio 0, ram): ",
		"00000000000c0000-00000000000bffff (prio 0, ram): mem0",
		"0000000000000000-0000000000000000x (prio 0, ram): mem0",
		"00000000000000000-0000000000000001 (prio 0, ram): mem0",
		"0000000000000000-00000000000bffff (prio x, ram): mem0",
		"0000000000000000-00000000000bffff (prio 0, ): mem0",
	}
	for _, line := range bad {
		if got, err := parseRange(line); !errors.Is(err, ErrMalformed) {
			t.Errorf("parseRange(%q) = %+v, %v; want ErrMalformed", line, got, err)
		}
	}
}

func TestParseMtreeErrors(t *testing.T) {
	tests := map[string]string{
		"empty":          "",
		"HMP error":      "unknown command: 'info mtre'\r\n",
		"range first":    "  0000000000000000-00000000000bffff (prio 0, ram): mem0\n",
		"AS first":       ` AS "memory", root: system` + "\n",
		"bad range":      "FlatView #0\n AS \"memory\", root: system\n  0000000000000000-00000000000bffff (prio 0, ram) mem0\n",
		"bad AS":         "FlatView #0\n AS \"memory\n",
		"line too long":  "FlatView #0\n" + strings.Repeat("x", mtreeMaxLine+1) + "\n",
		"root before FV": " Root memory region: system\n",
	}
	for name, in := range tests {
		t.Run(name, func(t *testing.T) {
			if views, err := parseMtree(strings.NewReader(in)); !errors.Is(err, ErrMalformed) {
				t.Errorf("got %v, %v; want ErrMalformed", views, err)
			}
		})
	}
}

func TestLayout(t *testing.T) {
	const hdr = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n"
	tests := []struct {
		name     string
		mtree    string
		backends []Backend
		want     []Mapping
		err      error
	}{
		{
			name:     "two backends, merge adjacent, file offset",
			backends: []Backend{{ID: "a", Size: 2 * mib, region: "a", FileOffset: 4096}, {ID: "b", Size: 1 * mib, region: "b"}},
			mtree: hdr +
				"  0000000000000000-00000000000fffff (prio 0, ram): a\n" +
				"  0000000000100000-00000000001fffff (prio 0, rom): a @0000000000100000\n" +
				"  0000000000200000-00000000002fffff (prio 0, ram): b\n" +
				"  0000000000300000-00000000003fffff (prio 0, i/o): a\n" +
				"  0000000000400000-00000000004fffff (prio 0, romd): b\n",
			want: []Mapping{{"a", 0, 4096, 2 * mib}, {"b", 2 * mib, 0, 1 * mib}},
		},
		{
			name:     "canonical path region names",
			backends: []Backend{{ID: "mem0", Size: 1 * mib, region: "/objects/mem0"}},
			mtree: hdr +
				"  0000000000000000-000000000009ffff (prio 0, ram): /objects/mem0 KVM\n" +
				"  00000000000c0000-00000000000fffff (prio 0, ram): mem0 @00000000000c0000\n",
			want: []Mapping{{"mem0", 0, 0, 0xa0000}},
		},
		{
			name:     "not contiguous in the file",
			backends: mem0(1 * mib),
			mtree: hdr +
				"  0000000000000000-000000000007ffff (prio 0, ram): mem0 @0000000000080000\n" +
				"  0000000000080000-00000000000fffff (prio 0, ram): mem0\n",
			want: []Mapping{{"mem0", 0, 0x80000, 0x80000}, {"mem0", 0x80000, 0, 0x80000}},
		},
		{
			name:     "other address spaces only",
			backends: mem0(1 * mib),
			mtree:    "FlatView #0\n AS \"cpu-smm-0\", root: memory\n  0000000000000000-00000000000fffff (prio 0, ram): mem0\n",
			err:      ErrMalformed,
		},
		{
			name:     "no backend mapped",
			backends: mem0(1 * mib),
			mtree:    hdr + "  0000000000000000-00000000000fffff (prio 0, ram): pc.ram\n",
			err:      ErrNoRAM,
		},
		{
			name:     "beyond the backend",
			backends: mem0(1 * mib),
			mtree:    hdr + "  0000000000000000-00000000000fffff (prio 0, ram): mem0 @0000000000000001\n",
			err:      ErrMalformed,
		},
		{
			name:     "offset beyond the backend",
			backends: mem0(1 * mib),
			mtree:    hdr + "  0000000000000000-0000000000000fff (prio 0, ram): mem0 @ffffffffffffffff\n",
			err:      ErrMalformed,
		},
		{
			name:     "overlap",
			backends: mem0(1 * mib),
			mtree: hdr +
				"  0000000000000000-00000000000fffff (prio 0, ram): mem0\n" +
				"  0000000000080000-00000000000fffff (prio 0, ram): mem0\n",
			err: ErrMalformed,
		},
		{
			name:     "top of the address space",
			backends: mem0(1 << 63),
			mtree:    hdr + "  ffffffffffff0000-ffffffffffffffff (prio 0, ram): mem0\n",
			err:      ErrMalformed,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			views, err := parseMtree(strings.NewReader(tt.mtree))
			if err != nil {
				t.Fatal(err)
			}
			got, err := layout(views, tt.backends)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("got %v, %v; want error %v", got, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("got %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestMapping(t *testing.T) {
	m := Mapping{Backend: "mem0", GPA: 4 * gib, Offset: 2 * gib, Size: 1 * gib}
	if s := m.String(); s != "mem0 [0x100000000, 0x140000000) @0x80000000" {
		t.Errorf("String() = %q", s)
	}
	for _, tt := range []struct {
		gpa  uint64
		off  uint64
		isIn bool
	}{
		{4 * gib, 2 * gib, true},
		{5*gib - 1, 3*gib - 1, true},
		{5 * gib, 0, false},
		{4*gib - 1, 0, false},
		{0, 0, false},
	} {
		off, ok := m.FileOffset(tt.gpa)
		if ok != tt.isIn || off != tt.off {
			t.Errorf("FileOffset(%#x) = %#x, %v; want %#x, %v", tt.gpa, off, ok, tt.off, tt.isIn)
		}
	}
}

// addFixtureSeeds seeds a fuzz target with the captured fixtures matching
// pattern.
func addFixtureSeeds(f *testing.F, pattern string) {
	f.Helper()
	files, _ := filepath.Glob(pattern)
	if len(files) == 0 {
		f.Fatalf("no fixtures match %s", pattern)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
}

func FuzzParseMtree(f *testing.F) {
	addFixtureSeeds(f, "testdata/mtree-*.txt")
	f.Fuzz(func(t *testing.T, in string) {
		views, err := parseMtree(strings.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			return
		}
		const size = 1 << 40
		maps, err := layout(views, mem0(size))
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrNoRAM) {
				t.Fatalf("unexpected error: %v", err)
			}
			return
		}
		for i, m := range maps {
			if m.Size == 0 || m.End() < m.GPA || m.Offset+m.Size > size || m.Offset+m.Size < m.Offset {
				t.Fatalf("bad mapping %v", m)
			}
			if i > 0 && maps[i-1].End() > m.GPA {
				t.Fatalf("mappings out of order or overlapping: %v", maps)
			}
		}
	})
}

func TestParseGPA2HVA(t *testing.T) {
	for _, c := range []struct {
		out  string
		want uint64
		ok   bool
	}{
		{"Host virtual address for 0x1000 (pc.ram) is 0x7f1c2fe01000\r\n", 0x7f1c2fe01000, true},
		{"Host virtual address for 0x100000000 (/objects/mem0) is 0x7f0000000000\n", 0x7f0000000000, true},
		{"Memory at address 0xffffffff0000is not RAM\r\n", 0, false},
		{"Host virtual address for 0x1000 (pc.ram) is 12\n", 0, false},
		{"", 0, false},
	} {
		got, err := parseGPA2HVA(c.out, 0x1000)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseGPA2HVA(%q) = %#x, %v", c.out, got, err)
		}
	}
}

func FuzzParseGPA2HVA(f *testing.F) {
	f.Add("Host virtual address for 0x1000 (pc.ram) is 0x7f1c2fe01000\r\n")
	f.Fuzz(func(t *testing.T, s string) { _, _ = parseGPA2HVA(s, 0) })
}

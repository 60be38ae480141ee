package introspect

import "testing"

func TestPAddr(t *testing.T) {
	for _, tt := range []struct {
		a         PAddr
		off       uint64
		down      PAddr
		up        PAddr
		upOK      bool
		aligned   bool
		formatted string
	}{
		{0, 0, 0, 0, true, true, "0x0"},
		{0x1234, 0x234, 0x1000, 0x2000, true, false, "0x1234"},
		{0x2000, 0, 0x2000, 0x2000, true, true, "0x2000"},
		{0xfffffffffffff000, 0, 0xfffffffffffff000, 0xfffffffffffff000, true, true, "0xfffffffffffff000"},
		{0xfffffffffffff001, 1, 0xfffffffffffff000, 0, false, false, "0xfffffffffffff001"},
	} {
		t.Run(tt.formatted, func(t *testing.T) {
			if got := tt.a.PageOffset(); got != tt.off {
				t.Errorf("PageOffset = %#x, want %#x", got, tt.off)
			}
			if got := tt.a.RoundDown(); got != tt.down {
				t.Errorf("RoundDown = %v, want %v", got, tt.down)
			}
			up, ok := tt.a.RoundUp()
			if ok != tt.upOK || (ok && up != tt.up) {
				t.Errorf("RoundUp = %v, %v; want %v, %v", up, ok, tt.up, tt.upOK)
			}
			if got := tt.a.IsPageAligned(); got != tt.aligned {
				t.Errorf("IsPageAligned = %v, want %v", got, tt.aligned)
			}
			if got := tt.a.String(); got != tt.formatted {
				t.Errorf("String = %q, want %q", got, tt.formatted)
			}
			// VAddr has the same arithmetic.
			v := VAddr(tt.a)
			vup, vok := v.RoundUp()
			if v.PageOffset() != tt.off || v.RoundDown() != VAddr(tt.down) ||
				vok != tt.upOK || (vok && vup != VAddr(tt.up)) ||
				v.IsPageAligned() != tt.aligned || v.String() != tt.formatted {
				t.Errorf("VAddr(%v) arithmetic differs from PAddr", v)
			}
		})
	}
}

func TestAddLength(t *testing.T) {
	for _, tt := range []struct {
		a    uint64
		n    uint64
		want uint64
		ok   bool
	}{
		{0x1000, 0x1000, 0x2000, true},
		{0xfffffffffffff000, 0xfff, 0xffffffffffffffff, true},
		{0xfffffffffffff000, 0x1000, 0, false},
		{1, 0xffffffffffffffff, 0, false},
	} {
		if got, ok := PAddr(tt.a).AddLength(tt.n); ok != tt.ok || (ok && uint64(got) != tt.want) {
			t.Errorf("PAddr(%#x).AddLength(%#x) = %v, %v; want %#x, %v", tt.a, tt.n, got, ok, tt.want, tt.ok)
		}
		if got, ok := VAddr(tt.a).AddLength(tt.n); ok != tt.ok || (ok && uint64(got) != tt.want) {
			t.Errorf("VAddr(%#x).AddLength(%#x) = %v, %v; want %#x, %v", tt.a, tt.n, got, ok, tt.want, tt.ok)
		}
		if r, ok := PAddr(tt.a).ToRange(tt.n); ok != tt.ok || (ok && r.Length() != tt.n) {
			t.Errorf("PAddr(%#x).ToRange(%#x) = %v, %v", tt.a, tt.n, r, ok)
		}
		if r, ok := VAddr(tt.a).ToRange(tt.n); ok != tt.ok || (ok && r.Length() != tt.n) {
			t.Errorf("VAddr(%#x).ToRange(%#x) = %v, %v", tt.a, tt.n, r, ok)
		}
	}
}

func TestRanges(t *testing.T) {
	r := PAddrRange{0x1000, 0x3000}
	if got, want := r.String(), "[0x1000, 0x3000)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	if r.Length() != 0x2000 || !r.Contains(0x1000) || !r.Contains(0x2fff) || r.Contains(0x3000) {
		t.Errorf("%v: Length/Contains wrong", r)
	}
	if (PAddrRange{0x3000, 0x1000}).Length() != 0 {
		t.Error("inverted range has non-zero length")
	}
	for _, tt := range []struct {
		o    PAddrRange
		want bool
	}{
		{PAddrRange{0, 0x1000}, false},
		{PAddrRange{0, 0x1001}, true},
		{PAddrRange{0x2fff, 0x4000}, true},
		{PAddrRange{0x3000, 0x4000}, false},
		{PAddrRange{0x2000, 0x2000}, false},
		{PAddrRange{0, 0x10000}, true},
	} {
		if got := r.Overlaps(tt.o); got != tt.want {
			t.Errorf("%v.Overlaps(%v) = %v, want %v", r, tt.o, got, tt.want)
		}
	}
	v := VAddrRange{0xffffffff80000000, 0xffffffffc0000000}
	if got, want := v.String(), "[0xffffffff80000000, 0xffffffffc0000000)"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	if v.Length() != 1<<30 || !v.Contains(0xffffffff81000000) || v.Contains(0xffffffffc0000000) {
		t.Errorf("%v: Length/Contains wrong", v)
	}
}

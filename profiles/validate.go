package profiles

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
)

const (
	// maxBanner bounds linux_banner; it is about 150 bytes in practice.
	maxBanner = 1024
	// maxStructSize bounds a struct size in a profile (struct zone and
	// pglist_data are a few KiB; page is 64 bytes).
	maxStructSize = 1 << 24
)

// nameRE is what a profile name may look like; names become file names
// in a [Store], so nothing that could escape a directory is allowed.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$`)

// releaseFromBanner returns the release in a banner: "Linux version
// 6.1.0-47-amd64 (...) #1 SMP ..." gives "6.1.0-47-amd64" (see
// init/version-timestamp.c).
func releaseFromBanner(banner string) (string, error) {
	f := strings.Fields(banner)
	if len(f) < 3 || f[0] != "Linux" || f[1] != "version" {
		return "", formatErr("linux_banner", -1, "does not start with \"Linux version\": %q", truncate(banner, 80))
	}
	return f[2], nil
}

// NameForBanner returns the profile name for a kernel banner: the release
// and the first 8 hex digits of the SHA-256 of the banner (without
// trailing newline), for example "6.1.0-47-amd64-3f2a9c1d".
func NameForBanner(banner string) (string, error) {
	banner = normalizeBanner(banner)
	rel, err := releaseFromBanner(banner)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(banner))
	name := rel + "-" + hex.EncodeToString(sum[:4])
	if !nameRE.MatchString(name) {
		return "", formatErr("linux_banner", -1, "release %q is not usable in a profile name", truncate(rel, 80))
	}
	return name, nil
}

// normalizeBanner drops the trailing newline (and NULs or spaces) that
// linux_banner and /proc/version carry.
func normalizeBanner(b string) string { return strings.TrimRight(b, "\n\r\x00 ") }

// setIdentity fills Banner, Release and Name from a raw banner.
func (p *Profile) setIdentity(banner string) error {
	p.Banner = normalizeBanner(banner)
	rel, err := releaseFromBanner(p.Banner)
	if err != nil {
		return err
	}
	p.Release = rel
	p.Name, err = NameForBanner(p.Banner)
	return err
}

// MatchBanner checks that the profile is for the kernel whose banner is
// given (as read from linux_banner in guest memory, or /proc/version). It
// returns a [*BannerMismatchError] if not.
func (p *Profile) MatchBanner(banner string) error {
	if normalizeBanner(banner) != p.Banner {
		return &BannerMismatchError{Profile: p.Banner, Kernel: normalizeBanner(banner)}
	}
	return nil
}

// PCPListOrder returns the page order of the pages on per-CPU free list
// pindex (index into per_cpu_pages.lists); see the derivation in the
// package documentation.
func (p *Profile) PCPListOrder(pindex int) (int, bool) {
	c := p.Constants
	if pindex < 0 || int64(pindex) >= c["NR_PCP_LISTS"] || c["MIGRATE_PCPTYPES"] <= 0 {
		return 0, false
	}
	if int64(pindex) >= c["NR_LOWORDER_PCP_LISTS"] {
		return int(c["PAGEBLOCK_ORDER"]), true
	}
	return pindex / int(c["MIGRATE_PCPTYPES"]), true
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrInvalidProfile)
}

// Validate checks that the profile is complete and self-consistent:
// a supported version, identity, required symbols, structs, fields and
// constants, every field inside its struct, and array lengths that agree
// with the constants derived from them. Errors wrap [ErrInvalidProfile]
// (or [ErrUnsupportedVersion]).
func (p *Profile) Validate() error {
	if p.Version < 1 || p.Version > FormatVersion {
		return fmt.Errorf("profile version %d (this program reads up to %d): %w", p.Version, FormatVersion, ErrUnsupportedVersion)
	}
	if p.Banner == "" || len(p.Banner) > maxBanner || p.Banner != normalizeBanner(p.Banner) {
		return invalid("bad banner %q", truncate(p.Banner, 80))
	}
	rel, err := releaseFromBanner(p.Banner)
	if err != nil || rel != p.Release {
		return invalid("release %q does not match banner %q", truncate(p.Release, 80), truncate(p.Banner, 80))
	}
	if !nameRE.MatchString(p.Name) {
		return invalid("bad name %q", truncate(p.Name, 80))
	}
	if p.BuildID != "" && (len(p.BuildID)%2 != 0 || len(p.BuildID) > 128 || strings.Trim(p.BuildID, "0123456789abcdef") != "") {
		return invalid("bad build ID %q", truncate(p.BuildID, 80))
	}
	for _, s := range requiredSymbols {
		if p.Symbols[s] == 0 {
			return invalid("missing symbol %s", s)
		}
	}
	for _, w := range wantStructs {
		s, ok := p.Structs[w.name]
		if !ok {
			if w.optional {
				continue
			}
			return invalid("missing struct %s", w.name)
		}
		for _, f := range w.required {
			if _, ok := s.Fields[f]; !ok {
				return invalid("missing field %s.%s", w.name, f)
			}
		}
	}
	for _, name := range sortedKeys(p.Structs) {
		s := p.Structs[name]
		if s.Size == 0 || s.Size > maxStructSize {
			return invalid("struct %s has size %d", name, s.Size)
		}
		for _, fn := range sortedKeys(s.Fields) {
			f := s.Fields[fn]
			if f.Offset > s.Size || f.Size > s.Size-f.Offset {
				return invalid("field %s.%s [%#x, %#x) is outside the struct's %d bytes", name, fn, f.Offset, f.Offset+f.Size, s.Size)
			}
			if f.Count > f.Size {
				return invalid("field %s.%s has %d elements in %d bytes", name, fn, f.Count, f.Size)
			}
		}
	}
	for _, c := range requiredConstants {
		if _, ok := p.Constants[c]; !ok {
			return invalid("missing constant %s", c)
		}
	}
	c := p.Constants
	for _, chk := range []struct {
		constant, s, f string
	}{
		{"MAX_ORDER", "zone", "free_area"},
		{"MIGRATE_TYPES", "free_area", "free_list"},
		{"NR_PCP_LISTS", "per_cpu_pages", "lists"},
	} {
		if got := p.Structs[chk.s].Fields[chk.f].Count; int64(got) != c[chk.constant] {
			return invalid("%s is %d but %s.%s has %d elements", chk.constant, c[chk.constant], chk.s, chk.f, got)
		}
	}
	bounded := []struct {
		name   string
		lo, hi int64
	}{
		{"MAX_ORDER", 1, 64},
		{"MIGRATE_TYPES", 1, 64},
		{"MIGRATE_PCPTYPES", 1, 64},
		{"NR_PCP_LISTS", 1, 4096},
		{"NR_FREE_PAGES", 0, 4096},
		{"MAX_NR_ZONES", 1, 64},
		{"N_ONLINE", 0, 64},
		{"MAX_NUMNODES", 1, 1 << 16},
		{"PAGE_ALLOC_COSTLY_ORDER", 0, 63},
		{"PAGEBLOCK_ORDER", 0, 63},
		{"PAGE_SIZE", 4096, 1 << 20},
	}
	for _, b := range bounded {
		if v := c[b.name]; v < b.lo || v > b.hi {
			return invalid("constant %s = %d is outside [%d, %d]", b.name, v, b.lo, b.hi)
		}
	}
	if c["NR_LOWORDER_PCP_LISTS"] != c["MIGRATE_PCPTYPES"]*(c["PAGE_ALLOC_COSTLY_ORDER"]+1) ||
		c["NR_PCP_THP"] != c["NR_PCP_LISTS"]-c["NR_LOWORDER_PCP_LISTS"] || c["NR_PCP_THP"] < 0 {
		return invalid("per-CPU list constants are inconsistent")
	}
	if c["MIGRATE_PCPTYPES"] > c["MIGRATE_TYPES"] {
		return invalid("MIGRATE_PCPTYPES %d > MIGRATE_TYPES %d", c["MIGRATE_PCPTYPES"], c["MIGRATE_TYPES"])
	}
	return nil
}

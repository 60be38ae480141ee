package profiles

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/stretchr/testify/require"
)

// savedProfile decodes the committed amd64 profile.
func savedProfile(t *testing.T) *Profile {
	t.Helper()
	p, err := Decode(bytes.NewReader(readTestdata(t, savedProfiles["amd64"])))
	require.NoError(t, err)
	return p
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	p := savedProfile(t)
	var b bytes.Buffer
	require.NoError(t, p.Encode(&b))
	require.Equal(t, readTestdata(t, savedProfiles["amd64"]), b.Bytes(), "encoding is deterministic")
	q, err := Decode(&b)
	require.NoError(t, err)
	require.Equal(t, p, q)
}

// TestDecodeRejects edits a valid profile one way at a time.
func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(p map[string]any)
		want error
	}{
		{"newer version", func(p map[string]any) { p["version"] = FormatVersion + 1 }, ErrUnsupportedVersion},
		{"no version", func(p map[string]any) { delete(p, "version") }, ErrUnsupportedVersion},
		{"no banner", func(p map[string]any) { p["banner"] = "" }, ErrInvalidProfile},
		{"release mismatch", func(p map[string]any) { p["release"] = "6.1.0-48-amd64" }, ErrInvalidProfile},
		{"path in name", func(p map[string]any) { p["name"] = "../../etc/passwd" }, ErrInvalidProfile},
		{"bad build id", func(p map[string]any) { p["build_id"] = "xyz" }, ErrInvalidProfile},
		{"missing symbol", func(p map[string]any) { delete(p["symbols"].(map[string]any), "node_data") }, ErrInvalidProfile},
		{"missing struct", func(p map[string]any) { delete(p["structs"].(map[string]any), "zone") }, ErrInvalidProfile},
		{"missing field", func(p map[string]any) {
			delete(p["structs"].(map[string]any)["page"].(map[string]any)["fields"].(map[string]any), "lru")
		}, ErrInvalidProfile},
		{"field outside struct", func(p map[string]any) {
			p["structs"].(map[string]any)["page"].(map[string]any)["fields"].(map[string]any)["lru"] = map[string]any{"offset": 60, "size": 16}
		}, ErrInvalidProfile},
		{"offset overflow", func(p map[string]any) {
			p["structs"].(map[string]any)["page"].(map[string]any)["fields"].(map[string]any)["lru"] = map[string]any{"offset": uint64(1<<64 - 8), "size": 16}
		}, ErrInvalidProfile},
		{"huge struct", func(p map[string]any) { p["structs"].(map[string]any)["page"].(map[string]any)["size"] = 1 << 40 }, ErrInvalidProfile},
		{"missing constant", func(p map[string]any) { delete(p["constants"].(map[string]any), "MAX_ORDER") }, ErrInvalidProfile},
		{"inconsistent constant", func(p map[string]any) { p["constants"].(map[string]any)["MAX_ORDER"] = 12 }, ErrInvalidProfile},
		{"constant out of range", func(p map[string]any) { p["constants"].(map[string]any)["MAX_NUMNODES"] = -1 }, ErrInvalidProfile},
		{"wrong type", func(p map[string]any) { p["symbols"] = []int{1} }, ErrMalformed},
		{"negative address", func(p map[string]any) { p["symbols"].(map[string]any)["_text"] = -1 }, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m map[string]any
			require.NoError(t, json.Unmarshal(readTestdata(t, savedProfiles["amd64"]), &m))
			tc.edit(m)
			b, err := json.Marshal(m)
			require.NoError(t, err)
			_, err = Decode(bytes.NewReader(b))
			require.ErrorIs(t, err, tc.want)
		})
	}
	for _, tc := range []struct {
		name  string
		input string
		want  error
	}{
		{"empty", "", ErrMalformed},
		{"not JSON", "profile", ErrMalformed},
		{"truncated", string(readTestdata(t, savedProfiles["amd64"])[:1000]), ErrMalformed},
		{"trailing data", strings.TrimSpace(string(readTestdata(t, savedProfiles["amd64"]))) + " {}", ErrMalformed},
		{"too large", strings.Repeat(" ", MaxProfileSize+1), ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode(strings.NewReader(tc.input))
			require.ErrorIs(t, err, tc.want)
		})
	}
}

// TestDecodeFlipOneByte flips each byte of a small valid profile's
// significant region in turn: the result either decodes to a valid
// profile or fails with an error; it never panics.
func TestDecodeFlipOneByte(t *testing.T) {
	good := readTestdata(t, savedProfiles["amd64"])
	for i := 0; i < len(good); i += 7 {
		b := bytes.Clone(good)
		b[i] ^= 0x01
		p, err := Decode(bytes.NewReader(b))
		if err == nil {
			require.NoError(t, p.Validate())
		}
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	p := savedProfile(t)
	p.Name = "a/b"
	require.ErrorIs(t, p.Encode(&bytes.Buffer{}), ErrInvalidProfile)
}

func TestMatchBanner(t *testing.T) {
	p := savedProfile(t)
	require.NoError(t, p.MatchBanner(p.Banner+"\n"))
	err := p.MatchBanner("Linux version 6.1.0-48-amd64 (x) #1\n")
	require.ErrorIs(t, err, ErrBannerMismatch)
	var bm *BannerMismatchError
	require.ErrorAs(t, err, &bm)
	require.Equal(t, p.Banner, bm.Profile)
	require.Equal(t, "Linux version 6.1.0-48-amd64 (x) #1", bm.Kernel)
	require.Contains(t, err.Error(), "6.1.0-48-amd64")
	require.Contains(t, err.Error(), p.Banner)
}

func TestNameForBanner(t *testing.T) {
	name, err := NameForBanner("Linux version 6.1.0-47-amd64 (debian-kernel@lists.debian.org) #1 SMP\n")
	require.NoError(t, err)
	require.Regexp(t, `^6\.1\.0-47-amd64-[0-9a-f]{8}$`, name)
	_, err = NameForBanner("Darwin Kernel Version 23.0.0")
	require.ErrorIs(t, err, ErrMalformed)
	_, err = NameForBanner("Linux version ../../x (y)")
	require.ErrorIs(t, err, ErrMalformed)
}

func TestStore(t *testing.T) {
	s := Store{Dir: filepath.Join(t.TempDir(), "profiles")}
	list, err := s.List()
	require.NoError(t, err)
	require.Empty(t, list)

	p := savedProfile(t)
	path, err := s.Save(p)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(s.Dir, p.Name+".json"), path)
	q, err := s.Lookup(p.Banner + "\n")
	require.NoError(t, err)
	require.Equal(t, p, q)

	// A profile saved under another file name is still found.
	require.NoError(t, os.Rename(path, filepath.Join(s.Dir, "renamed.json")))
	q, err = s.Lookup(p.Banner)
	require.NoError(t, err)
	require.Equal(t, p.Name, q.Name)

	require.NoError(t, os.WriteFile(filepath.Join(s.Dir, "broken.json"), []byte("{"), 0o644))
	// A FIFO in the store blocked every save (the guest already paused)
	// until something wrote to it: now it is passed over at once.
	require.NoError(t, syscall.Mkfifo(filepath.Join(s.Dir, "fifo.json"), 0o644))
	require.NoError(t, syscall.Mkfifo(filepath.Join(s.Dir, p.Name+".json"), 0o644))
	list, err = s.List()
	require.ErrorIs(t, err, ErrMalformed)
	require.ErrorIs(t, err, safefile.ErrNotRegular)
	q, err = s.Lookup(p.Banner)
	require.NoError(t, err, "the readable profiles still serve")
	require.Equal(t, []StoreEntry{{Name: p.Name, Release: p.Release, Banner: p.Banner, Path: filepath.Join(s.Dir, "renamed.json")}}, list)

	_, err = s.Lookup("Linux version 6.1.0-48-amd64 (x) #1")
	require.ErrorIs(t, err, ErrProfileNotFound)

	bad := *p
	bad.Version = 0
	_, err = s.Save(&bad)
	require.ErrorIs(t, err, ErrUnsupportedVersion)
}

func TestDefaultStoreDir(t *testing.T) {
	t.Setenv("KVMCKPT_CACHE", "/c")
	dir, err := DefaultStoreDir()
	require.NoError(t, err)
	require.Equal(t, "/c/profiles", dir)
	t.Setenv("KVMCKPT_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	dir, err = DefaultStoreDir()
	require.NoError(t, err)
	require.Equal(t, "/xdg/kvmckpt/profiles", dir)
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "/home/u")
	dir, err = DefaultStoreDir()
	require.NoError(t, err)
	require.Equal(t, "/home/u/.cache/kvmckpt/profiles", dir)
}

package profiles

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kvmckpt/kvmckpt/internal/cachedir"
	"github.com/kvmckpt/kvmckpt/internal/safefile"
)

// Store is a directory of profiles, one "<Name>.json" file each. Saves are
// atomic (write to a temporary file, then rename), so concurrent readers
// see whole files; concurrent saves of one profile leave one of them.
type Store struct {
	Dir string
}

// StoreEntry describes one profile in a [Store].
type StoreEntry struct {
	Name    string
	Release string
	Banner  string
	Path    string
}

// DefaultStoreDir returns the profiles directory of kvmckpt's cache
// (see [cachedir.Dir]): $KVMCKPT_CACHE/profiles, by default
// ~/.cache/kvmckpt/profiles.
func DefaultStoreDir() (string, error) {
	dir, err := cachedir.Path("profiles")
	if err != nil {
		return "", fmt.Errorf("find profile store: %w", err)
	}
	return dir, nil
}

// DefaultStore returns the Store in [DefaultStoreDir].
func DefaultStore() (Store, error) {
	dir, err := DefaultStoreDir()
	return Store{Dir: dir}, err
}

// List returns the profiles in the store, sorted by name. Files that do
// not decode are left out and reported in the joined error, which is
// returned alongside the entries that do decode. A missing directory is
// an empty store.
func (s Store) List() ([]StoreEntry, error) {
	des, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list profiles: %w", err)
	}
	var out []StoreEntry
	var errs []error
	for _, de := range des {
		if de.IsDir() || !strings.HasSuffix(de.Name(), ".json") || strings.HasPrefix(de.Name(), ".") {
			continue
		}
		path := filepath.Join(s.Dir, de.Name())
		p, err := readProfileFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, StoreEntry{Name: p.Name, Release: p.Release, Banner: p.Banner, Path: path})
	}
	return out, errors.Join(errs...)
}

// Lookup returns the profile for a kernel banner (linux_banner as read
// from the guest; a trailing newline is ignored). It tries the file named
// after the banner first, then every profile. It returns an error
// wrapping [ErrProfileNotFound] if none matches.
func (s Store) Lookup(banner string) (*Profile, error) {
	banner = normalizeBanner(banner)
	if name, err := NameForBanner(banner); err == nil {
		p, err := readProfileFile(filepath.Join(s.Dir, name+".json"))
		if err == nil && p.Banner == banner {
			return p, nil
		}
	}
	entries, _ := s.List()
	for _, e := range entries {
		if e.Banner != banner {
			continue
		}
		if p, err := readProfileFile(e.Path); err == nil && p.Banner == banner {
			return p, nil
		}
	}
	return nil, fmt.Errorf("look up profile for %q in %s: %w", truncate(banner, 100), s.Dir, ErrProfileNotFound)
}

// Save validates p and writes it as "<p.Name>.json", replacing an
// existing file of that name. It returns the file's path.
func (s Store) Save(p *Profile) (string, error) {
	if err := p.Validate(); err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	path := filepath.Join(s.Dir, p.Name+".json") // Validate checked Name
	tmp, err := os.CreateTemp(s.Dir, ".profile-*.json")
	if err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if err := p.Encode(tmp); err != nil {
		tmp.Close()
		return "", fmt.Errorf("save profile: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", fmt.Errorf("save profile: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	return path, nil
}

func readProfileFile(path string) (*Profile, error) {
	f, err := safefile.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read profile: %w", err)
	}
	defer f.Close()
	p, err := Decode(f)
	if err != nil {
		return nil, fmt.Errorf("read profile %s: %w", path, err)
	}
	return p, nil
}

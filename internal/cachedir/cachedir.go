// Package cachedir decides where kvmckpt keeps what it caches: kernel
// profiles, and for the tests the guest kernels and emulators that
// `make deps` fetches. It is the one place that decides; the Makefile
// exports the same rule to the scripts as KVMCKPT_CACHE.
package cachedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Env names the variable that overrides the cache directory.
const Env = "KVMCKPT_CACHE"

// ErrNoHome is returned when neither KVMCKPT_CACHE, XDG_CACHE_HOME nor a
// home directory names a place for the cache.
var ErrNoHome = errors.New("no cache directory: set KVMCKPT_CACHE or HOME")

// Dir returns $KVMCKPT_CACHE, else $XDG_CACHE_HOME/kvmckpt, else
// $HOME/.cache/kvmckpt. Relative values of the variables are ignored, as
// the XDG base directory specification asks, except KVMCKPT_CACHE, which is
// made absolute against the working directory.
func Dir() (string, error) {
	if d := os.Getenv(Env); d != "" {
		abs, err := filepath.Abs(d)
		if err != nil {
			return "", fmt.Errorf("cache directory %s: %w", Env, err)
		}
		return abs, nil
	}
	if d := os.Getenv("XDG_CACHE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "kvmckpt"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return "", ErrNoHome
	}
	return filepath.Join(home, ".cache", "kvmckpt"), nil
}

// Path returns Dir joined with elem.
func Path(elem ...string) (string, error) {
	d, err := Dir()
	if err != nil {
		return "", err
	}
	return filepath.Join(append([]string{d}, elem...)...), nil
}

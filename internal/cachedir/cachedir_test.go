package cachedir

import (
	"errors"
	"path/filepath"
	"testing"
)

func TestDir(t *testing.T) {
	for _, c := range []struct {
		name, cache, xdg, home, want string
		err                          error
	}{
		{name: "variable", cache: "/c", xdg: "/x", home: "/h", want: "/c"},
		{name: "xdg", xdg: "/x", home: "/h", want: "/x/kvmckpt"},
		{name: "relative xdg ignored", xdg: "x", home: "/h", want: "/h/.cache/kvmckpt"},
		{name: "home", home: "/h", want: "/h/.cache/kvmckpt"},
		{name: "nothing", err: ErrNoHome},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv(Env, c.cache)
			t.Setenv("XDG_CACHE_HOME", c.xdg)
			t.Setenv("HOME", c.home)
			got, err := Dir()
			if !errors.Is(err, c.err) || got != c.want {
				t.Fatalf("Dir() = %q, %v; want %q, %v", got, err, c.want, c.err)
			}
		})
	}
	t.Run("relative variable made absolute", func(t *testing.T) {
		t.Setenv(Env, "rel")
		got, err := Dir()
		if err != nil || !filepath.IsAbs(got) || filepath.Base(got) != "rel" {
			t.Fatalf("Dir() = %q, %v", got, err)
		}
	})
	t.Run("path", func(t *testing.T) {
		t.Setenv(Env, "/c")
		got, err := Path("kernels", "amd64")
		if err != nil || got != "/c/kernels/amd64" {
			t.Fatalf("Path() = %q, %v", got, err)
		}
	})
}

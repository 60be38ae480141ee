package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/kvmckpt/kvmckpt/internal/term"
	"github.com/kvmckpt/kvmckpt/profiles"
)

func cmdProfile(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("profile needs a subcommand: build, list or show")
	}
	switch args[0] {
	case "build":
		return profileBuild(e, args[1:])
	case "list":
		return profileList(e, args[1:])
	case "show":
		return profileShow(e, args[1:])
	}
	return usagef("unknown profile subcommand %q: build, list or show", args[0])
}

func profileBuild(e *env, args []string) error {
	fs, verbose := e.flags("profile build")
	kernel := fs.String("kernel", "", "kernel image: bzImage (vmlinuz) or ELF vmlinux")
	isf := fs.String("isf", "", "Volatility 3 ISF JSON file, for a kernel without BTF")
	systemMap := fs.String("system-map", "", "System.map to use and cross-check (optional)")
	out := fs.String("o", "", "write the profile here (default: the profile store)")
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	if (*kernel == "") == (*isf == "") {
		return usagef("give one of --kernel or --isf")
	}
	var p *profiles.Profile
	var err error
	if *kernel != "" {
		p, err = profiles.BuildFromImageWithOptions(*kernel, profiles.BuildOptions{SystemMap: *systemMap})
	} else {
		var f *os.File
		if f, err = safefile.Open(*isf); err != nil {
			return err
		}
		p, err = profiles.FromISF(f)
		f.Close()
	}
	if err != nil {
		return err
	}
	path := *out
	if path == "" {
		store, err := profiles.DefaultStore()
		if err != nil {
			return err
		}
		if path, err = store.Save(p); err != nil {
			return err
		}
	} else {
		if err := safefile.Write(path, 0o644, p.Encode); err != nil {
			return err
		}
	}
	fmt.Fprintf(e.stdout, "profile %s (%d symbols, %d structs) written to %s\n", term.Escape(p.Name), len(p.Symbols), len(p.Structs), term.Escape(path))
	return nil
}

func profileList(e *env, args []string) error {
	fs, verbose := e.flags("profile list")
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	store, err := profiles.DefaultStore()
	if err != nil {
		return err
	}
	list, err := store.List()
	if err != nil {
		// The readable ones are listed all the same.
		fmt.Fprintf(e.stderr, "kvmckpt: warning: %s\n", term.Escape(err.Error()))
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "NAME\tRELEASE\tPATH\n")
	for _, p := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", term.Escape(p.Name), term.Escape(p.Release), term.Escape(p.Path))
	}
	return tw.Flush()
}

func profileShow(e *env, args []string) error {
	fs, verbose := e.flags("profile show")
	asJSON := fs.Bool("json", false, "print the profile as JSON")
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("profile show takes a profile name or file")
	}
	p, err := loadProfile(pos[0])
	if err != nil {
		return err
	}
	if *asJSON {
		return p.Encode(e.stdout)
	}
	w := e.stdout
	esc := term.Escape // a profile is untrusted input
	fmt.Fprintf(w, "name:    %s\nbanner:  %s\nrelease: %s\nsource:  %s\n", esc(p.Name), esc(p.Banner), esc(p.Release), esc(p.Source))
	if p.BuildID != "" {
		fmt.Fprintf(w, "build id: %s\n", esc(p.BuildID))
	}
	fmt.Fprintf(w, "symbols:\n")
	for _, n := range sortedKeys(p.Symbols) {
		fmt.Fprintf(w, "  %-28s %#x\n", esc(n), p.Symbols[n])
	}
	fmt.Fprintf(w, "structs:\n")
	for _, n := range sortedKeys(p.Structs) {
		s := p.Structs[n]
		var fields []string
		for _, f := range sortedKeys(s.Fields) {
			fields = append(fields, fmt.Sprintf("%s@%d", esc(f), s.Fields[f].Offset))
		}
		fmt.Fprintf(w, "  %-16s size %-5d %s\n", esc(n), s.Size, strings.Join(fields, " "))
	}
	fmt.Fprintf(w, "constants:\n")
	for _, n := range sortedKeys(p.Constants) {
		fmt.Fprintf(w, "  %-28s %d\n", esc(n), p.Constants[n])
	}
	return nil
}

// loadProfile reads a profile file, or a stored profile by name.
func loadProfile(nameOrPath string) (*profiles.Profile, error) {
	f, err := safefile.Open(nameOrPath)
	if err == nil {
		defer f.Close()
		return profiles.Decode(f)
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("profile: %w", err)
	}
	store, err := profiles.DefaultStore()
	if err != nil {
		return nil, err
	}
	list, _ := store.List() // unreadable files are not the one asked for
	for _, p := range list {
		if p.Name == nameOrPath {
			return loadProfile(p.Path)
		}
	}
	return nil, fmt.Errorf("profile %q: no such file and no stored profile of that name (see kvmckpt profile list)", nameOrPath)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

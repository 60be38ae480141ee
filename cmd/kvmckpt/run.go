package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/objstore"
	"github.com/kvmckpt/kvmckpt/writer"
)

// errSilent is an error already reported to the user.
var errSilent = errors.New("reported")

// usageError is a mistake on the command line: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

const usage = `kvmckpt checkpoints KVM/QEMU guests by saving only the pages the guest uses.

Usage:
  kvmckpt scan    (--qmp PATH | --domain NAME [--connect URI]) [--json] [--profile auto|FILE] [--require-introspection] [--map FILE.png]
  kvmckpt save    (--qmp PATH | --domain NAME [--connect URI]) -o FILE [--live [--max-pause D] [--no-predict]] [--profile auto|FILE] [--require-introspection] [--keep-paused | --quit] [--squeeze[=auto|SIZE]] [--parent FILE] [--compress auto|lz4|none] [--encrypt-key FILE] [--json]
  kvmckpt restore -i FILE (--qmp PATH | --launch [--ram-dir DIR] [--qemu PATH] | --domain NAME [--connect URI]) [--resume] [--parent FILE]... [--encrypt-key FILE] [--json]
  kvmckpt ps      (--qmp PATH | --domain NAME [--connect URI] | FILE) [--threads] [--json]
  kvmckpt core    (--qmp PATH | --domain NAME [--connect URI] | FILE) --pid N -o CORE [--json]
  kvmckpt export  FILE -o OUT --format qemu|libvirt [--xml DOMAIN.xml] [--paused] [--encrypt-key FILE] [--json]
  kvmckpt inspect FILE [--parent FILE]... [--encrypt-key FILE] [--json]
  kvmckpt verify  FILE [--parent FILE]... [--encrypt-key FILE]
  kvmckpt flatten FILE -o OUT [--parent FILE]... [--compress lz4|none] [--json]
  kvmckpt resume  (--qmp PATH | --domain NAME [--connect URI])
  kvmckpt profile build --kernel PATH [-o FILE]
  kvmckpt profile list
  kvmckpt profile show NAME|FILE

Every command takes -v for structured logs on stderr.
A checkpoint FILE, and -o of save and flatten, may be an object in an S3-compatible
store, s3://BUCKET/KEY, found with the AWS_* variables and files; --s3-endpoint URL names
a store that is not AWS.
Exit codes: 0 done; 1 failed; 2 usage; 3 checkpoint invalid; 4 guest busy or in the wrong state; 130 interrupted.
`

// env is what every command gets.
type env struct {
	stdout, stderr io.Writer
	log            *slog.Logger
	s3Endpoint     *string // --s3-endpoint
}

type command func(ctx context.Context, e *env, args []string) error

func commands() map[string]command {
	return map[string]command{
		"scan":    cmdScan,
		"save":    cmdSave,
		"restore": cmdRestore,
		"resume":  cmdResume,
		"export":  cmdExport,
		"ps":      cmdPS,
		"core":    cmdCore,
		"inspect": cmdInspect,
		"verify":  cmdVerify,
		"flatten": cmdFlatten,
		"profile": cmdProfile,
	}
}

func run(ctx context.Context, stdout, stderr io.Writer, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return usagef("no command given")
		}
		return nil
	}
	cmd, ok := commands()[args[0]]
	if !ok {
		return usagef("unknown command %q (see kvmckpt --help)", args[0])
	}
	// Warnings reach stderr whatever the flags (an earlier kvmckpt killed
	// mid-save, a profile that could not be stored); -v adds the rest.
	e := &env{stdout: stdout, stderr: stderr, log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	return cmd(ctx, e, args[1:])
}

// flags makes a flag set for a subcommand with the common -v flag; parse
// it with e.parse.
func (e *env) flags(name string) (*flag.FlagSet, *bool) {
	fs := flag.NewFlagSet("kvmckpt "+name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	verbose := fs.Bool("v", false, "structured logs on stderr")
	e.s3Endpoint = fs.String("s3-endpoint", "", "URL of an S3-compatible store for s3://BUCKET/KEY names (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS); keys are addressed path-style")
	return fs, verbose
}

// parse parses args, allowing flags after positional arguments, and turns
// on logging for -v.
func (e *env) parse(fs *flag.FlagSet, verbose *bool, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errSilent
			}
			return nil, &usageError{err.Error()}
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if *verbose {
		e.log = slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	// Checkpoints may be named s3://BUCKET/KEY anywhere a file is.
	cfg := objstore.Config{}
	if e.s3Endpoint != nil {
		cfg.Endpoint = *e.s3Endpoint
	}
	objstore.Register(cfg)
	return pos, nil
}

// printJSON writes v as one JSON object on stdout.
func (e *env) printJSON(v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// keyFlag adds --encrypt-key to a command.
func keyFlag(fs *flag.FlagSet) *string {
	return fs.String("encrypt-key", "", "key file (32 raw bytes or 64 hex digits, mode 0600): encrypt or decrypt the checkpoint with AES-256-GCM")
}

// loadKey reads the key file named by --encrypt-key, if any.
func loadKey(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	return writer.LoadKeyFile(path)
}

// targetFlags adds --qmp, --domain and --connect to a command; check the
// result with target.
func targetFlags(fs *flag.FlagSet) *targetFlag {
	return &targetFlag{
		qmp:     fs.String("qmp", "", "QMP socket of the guest (PATH or unix:PATH)"),
		domain:  fs.String("domain", "", "or: the libvirt domain of the guest (name), reached through libvirt's virt-qemu-qmp-proxy"),
		connect: fs.String("connect", "", "with --domain: libvirt connection URI (default: libvirt's, qemu:///system for root)"),
	}
}

type targetFlag struct{ qmp, domain, connect *string }

// target returns the guest the flags name: exactly one of --qmp and
// --domain.
func (f *targetFlag) target() (checkpoint.Target, error) {
	t := checkpoint.Target{QMP: *f.qmp, Domain: *f.domain, Connect: *f.connect}
	switch {
	case t.QMP != "" && t.Domain != "":
		return t, usagef("give --qmp or --domain, not both")
	case t.QMP == "" && t.Domain == "":
		return t, usagef("--qmp (a QMP socket) or --domain (a libvirt domain) is required")
	case t.Connect != "" && t.Domain == "":
		return t, usagef("--connect goes with --domain")
	}
	return t, nil
}

func required(name, value string) error {
	if strings.TrimSpace(value) == "" {
		return usagef("--%s is required", name)
	}
	return nil
}

package checkpoint

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/kvmckpt/kvmckpt/writer"
)

// Info describes a checkpoint file.
type Info struct {
	Path             string            `json:"path"`
	FileBytes        int64             `json:"file_bytes"`
	Created          time.Time         `json:"created"`
	Encrypted        bool              `json:"encrypted"`
	KernelBanner     string            `json:"kernel_banner"`
	Profile          string            `json:"profile"`
	QEMUVersion      string            `json:"qemu_version"`
	MachineType      string            `json:"machine_type"`
	Compression      string            `json:"compression"`
	FillByte         byte              `json:"fill_byte"`
	Regions          []writer.Region   `json:"regions"`
	Pages            writer.PageCounts `json:"pages"`
	Chunks           int               `json:"chunks"`
	DeviceStateBytes int64             `json:"device_state_bytes"`
	CommandLine      []string          `json:"command_line,omitempty"`
	// RestoreCommandLine is the source's command line made into a restore
	// target: -incoming defer -S added. Point its mem-path at a new file.
	RestoreCommandLine []string `json:"restore_command_line,omitempty"`
	// LibvirtDomain is the libvirt domain it was saved from; its XML is
	// recorded too, for `restore --domain` and `export --format libvirt`.
	// A libvirt domain's QEMU command line (descriptors libvirt passed)
	// is no restore command line: RestoreCommandLine is then empty.
	LibvirtDomain string `json:"libvirt_domain,omitempty"`
	// DeviceStateForm is how the device state leaves the RAM out (see
	// writer.Header).
	DeviceStateForm string `json:"device_state_form,omitempty"`
	// ID is the checkpoint's identity, by which a child names it.
	ID string `json:"id"`
	// Chain lists, for an incremental checkpoint, it and its parents, the
	// newest first, as far as they were found; ChainError says why the
	// chain is broken, if it is.
	Chain      []ChainLink `json:"chain,omitempty"`
	ChainError string      `json:"chain_error,omitempty"`
}

// ChainLink is one checkpoint of a chain, in [Info].
type ChainLink struct {
	Path string `json:"path"`
	ID   string `json:"id"`
	// Depth is the number of parents below it.
	Depth int `json:"depth"`
	// Created is when it was saved; PagesStored the pages the file holds,
	// PagesInUse those in use at that moment, PagesRestored those a
	// restore of the chain takes from it.
	Created       time.Time `json:"created"`
	PagesStored   uint64    `json:"pages_stored"`
	PagesInUse    uint64    `json:"pages_in_use"`
	PagesRestored uint64    `json:"pages_restored"`
	FileBytes     int64     `json:"file_bytes"`
}

// Inspect reads a checkpoint's header and structure (not its pages).
// key is the encryption key of an encrypted checkpoint, else nil.
//
// For an incremental checkpoint it also follows the chain of parents
// (beside it, or among parents): a broken chain is reported in the Info,
// not as an error, so that the file itself can still be inspected.
func Inspect(path string, key []byte, parents []string) (*Info, error) {
	r, err := writer.OpenKey(path, key)
	if err != nil {
		return nil, invalid(err)
	}
	defer r.Close()
	h := r.Header()
	info := &Info{
		Path: path, FileBytes: r.Size(), Created: h.Created, KernelBanner: h.KernelBanner,
		Profile: h.Profile, QEMUVersion: h.QEMUVersion, MachineType: h.MachineType,
		Compression: string(h.Compression), FillByte: h.FillByte, Regions: h.Regions,
		Pages: h.Pages, Chunks: r.NumChunks(), DeviceStateBytes: r.DeviceStateLen(),
		CommandLine: h.CommandLine, Encrypted: r.Encrypted(),
		LibvirtDomain: h.LibvirtDomain, DeviceStateForm: h.DeviceStateForm,
	}
	if len(h.CommandLine) > 0 && h.LibvirtDomain == "" {
		info.RestoreCommandLine = RestoreCommandLine(h.CommandLine)
	}
	if info.ID, err = r.ID(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if r.Parent() == nil {
		return info, nil
	}
	c, err := openChain(path, key, parents)
	if err != nil {
		info.ChainError = err.Error()
		return info, nil
	}
	defer c.Close()
	for i, l := range c.Links {
		lh := l.Header()
		link := ChainLink{
			Path: c.Paths[i], ID: c.IDs[i], Created: lh.Created,
			PagesStored: lh.Pages.Saved, PagesInUse: l.InUse().Count(), PagesRestored: c.Provided(i),
		}
		if lh.Parent != nil {
			link.Depth = lh.Parent.Depth
		}
		if st, err := os.Stat(c.Paths[i]); err == nil {
			link.FileBytes = st.Size()
		}
		info.Chain = append(info.Chain, link)
	}
	return info, nil
}

// RestoreCommandLine turns a source QEMU's argv into one for a restore
// target: any -incoming and -S go, "-incoming defer -S" is added.
func RestoreCommandLine(argv []string) []string {
	var out []string
	for i := 0; i < len(argv); i++ {
		switch a := strings.TrimLeft(argv[i], "-"); {
		case a == "incoming" && strings.HasPrefix(argv[i], "-"):
			i++ // and its value
		case a == "S" && strings.HasPrefix(argv[i], "-"):
		default:
			out = append(out, argv[i])
		}
	}
	return append(out, "-incoming", "defer", "-S")
}

// Verify checks every checksum of a checkpoint, and of every link of its
// chain if it is incremental; the error wraps [ErrInvalid] and names the
// first bad part, or link.
func Verify(path string, key []byte, parents []string, progress func(done, total uint64)) error {
	r, err := openChain(path, key, parents)
	if err != nil {
		return err
	}
	defer r.Close()
	if err := r.Verify(progress); err != nil {
		return invalid(err)
	}
	return nil
}

// Resume starts a paused guest (after `kvmckpt save --keep-paused`, or an
// interrupted kvmckpt) and returns its run state.
func Resume(ctx context.Context, t Target) (string, error) {
	g, err := openGuest(ctx, t, logger(nil))
	if err != nil {
		return "", err
	}
	defer g.close()
	if st, err := g.sess.Status(ctx); err == nil && st.Running {
		g.clearPauseRecord()
		return st.State, nil
	}
	if g.prior.State == "inmigrate" {
		return "", fmt.Errorf("%w: the guest is waiting for an incoming migration; restore a checkpoint into it with `kvmckpt restore`", ErrGuestState)
	}
	if err := g.sess.Cont(ctx); err != nil {
		return "", err // says "resume guest"
	}
	g.clearPauseRecord()
	st, err := g.sess.Status(ctx)
	if err != nil {
		return "", err
	}
	return st.State, nil
}

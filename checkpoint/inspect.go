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
}

// Inspect reads a checkpoint's header and structure (not its pages).
// key is the encryption key of an encrypted checkpoint, else nil.
func Inspect(path string, key []byte) (*Info, error) {
	r, err := writer.OpenKey(path, key)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	defer r.Close()
	h := r.Header()
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	info := &Info{
		Path: path, FileBytes: st.Size(), Created: h.Created, KernelBanner: h.KernelBanner,
		Profile: h.Profile, QEMUVersion: h.QEMUVersion, MachineType: h.MachineType,
		Compression: string(h.Compression), FillByte: h.FillByte, Regions: h.Regions,
		Pages: h.Pages, Chunks: r.NumChunks(), DeviceStateBytes: r.DeviceStateLen(),
		CommandLine: h.CommandLine, Encrypted: r.Encrypted(),
		LibvirtDomain: h.LibvirtDomain, DeviceStateForm: h.DeviceStateForm,
	}
	if len(h.CommandLine) > 0 && h.LibvirtDomain == "" {
		info.RestoreCommandLine = RestoreCommandLine(h.CommandLine)
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

// Verify checks every checksum of a checkpoint; the error wraps
// [ErrInvalid] and names the first bad part.
func Verify(path string, key []byte, progress func(done, total uint64)) error {
	r, err := writer.OpenKey(path, key)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	defer r.Close()
	if err := r.Verify(progress); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
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

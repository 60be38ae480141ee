package checkpoint

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// RestoreDomain restores a checkpoint into libvirt as domain opt.Domain
// (on the connection opt.Connect): it exports the checkpoint as a libvirt
// save image ([Export]) into a temporary file and has libvirt restore it
// (virsh restore), so the domain runs under libvirt as after a `virsh
// save` and `virsh restore`. The domain must not be running. Its XML is
// the one the checkpoint recorded, if it was saved from a domain of that
// name; else the domain's own, which must describe the same machine.
// Guests restored this way are filled by QEMU from the stream, not by
// kvmckpt: RestoreOptions.QMP is unused.
func RestoreDomain(ctx context.Context, opt RestoreOptions) (*RestoreResult, error) {
	start := time.Now()
	state, err := qmp.LibvirtDomainState(ctx, opt.Connect, opt.Domain)
	if err != nil {
		return nil, err
	}
	switch state {
	case "", "shut off", "crashed":
	default:
		return nil, fmt.Errorf("%w: libvirt domain %q is %s; a restore starts it: stop it first (virsh destroy %s)", ErrGuestState, opt.Domain, state, opt.Domain)
	}
	r, err := openWhole(opt.Input, opt.Key, "restore --domain")
	if err != nil {
		return nil, err
	}
	h := r.Header()
	devLen := r.DeviceStateLen()
	r.Close()
	var xml []byte
	switch {
	case h.LibvirtDomain == opt.Domain && h.LibvirtXML != "":
		xml = []byte(h.LibvirtXML)
	case state != "":
		if xml, err = qmp.LibvirtDomainXML(ctx, opt.Connect, opt.Domain); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: libvirt has no domain %q and the checkpoint was not saved from one of that name (it records %q); define the domain first (virsh define)",
			ErrGuestState, opt.Domain, h.LibvirtDomain)
	}
	// Beside the checkpoint, where its size of space is known to be
	// wanted; only root (libvirt's daemon) reads it.
	var dir string
	if !writer.IsStored(opt.Input) {
		dir, _ = os.MkdirTemp(filepath.Dir(opt.Input), ".kvmckpt-restore-")
	}
	if dir == "" {
		dir, err = os.MkdirTemp("", "kvmckpt-restore-")
		if err != nil {
			return nil, fmt.Errorf("restore into libvirt: %w", err)
		}
	}
	defer os.RemoveAll(dir)
	image := filepath.Join(dir, "save.img")
	t0 := time.Now()
	_, err = Export(ctx, ExportOptions{Input: opt.Input, Key: opt.Key, Output: image, Format: FormatLibvirt,
		DomainXML: xml, Progress: opt.Progress, Log: opt.Log})
	if err != nil {
		return nil, err
	}
	tExport := time.Since(t0)
	t1 := time.Now()
	if err := qmp.LibvirtRestore(ctx, opt.Connect, image, !opt.Resume); err != nil {
		return nil, err
	}
	res := &RestoreResult{
		PagesRestored:    h.Pages.Saved,
		PagesTotal:       h.Pages.Total,
		DeviceStateBytes: devLen,
		// The export writes the pages, libvirt's QEMU loads them with
		// the device state.
		PagesMS:       tExport.Milliseconds(),
		DeviceStateMS: time.Since(t1).Milliseconds(),
	}
	if st, err := qmp.LibvirtDomainState(ctx, opt.Connect, opt.Domain); err == nil {
		res.GuestState = st
	}
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

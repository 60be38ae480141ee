package checkpoint

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/profiles"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// vmcoreinfoMax is VMCOREINFO_BYTES, one page (include/linux/crash_core.h).
const vmcoreinfoMax = 4096

// profile finds the kernel profile for the paused guest: the file the
// operator named, or (for "auto") a stored profile whose banner matches the
// guest's, or one built from the guest's own memory, which is then stored.
func (g *guest) profile(ctx context.Context, opt ScanOptions, regs qmp.Registers) (*profiles.Profile, error) {
	return findProfile(g.mem, introspect.PAddr(regs.CR3), regs.LA57(), opt, g.log)
}

// findProfile is [guest.profile] for any guest memory whose kernel's page
// tables are at root.
func findProfile(mem *introspect.PhysMem, root introspect.PAddr, la57 bool, opt ScanOptions, log *slog.Logger) (*profiles.Profile, error) {
	if opt.Profile != "" && opt.Profile != "auto" {
		f, err := safefile.Open(opt.Profile)
		if err != nil {
			return nil, fmt.Errorf("open profile: %w", err)
		}
		defer f.Close()
		p, err := profiles.Decode(f)
		if err != nil {
			return nil, fmt.Errorf("load profile %s: %w", opt.Profile, err)
		}
		return p, nil
	}
	img, err := introspect.FindKernelImage(mem, uint64(root), la57)
	if err != nil {
		return nil, err
	}
	store := profiles.Store{Dir: opt.ProfileDir}
	if store.Dir == "" {
		if store, err = profiles.DefaultStore(); err != nil {
			return nil, err
		}
	}
	if p := lookupStored(store, img, log); p != nil && (!opt.needTasks || hasTasks(p)) && (!opt.needCounters || hasCounters(p)) {
		return p, nil
	}
	log.Info("no stored profile fits this kernel; building one from guest memory")
	data, err := img.Data()
	if err != nil {
		return nil, err
	}
	p, err := profiles.BuildFromKernelMemory(data, uint64(img.Text), nil)
	if err != nil {
		return nil, fmt.Errorf("build profile from guest memory: %w", err)
	}
	if vmci := readVmcoreinfo(img, p); vmci != nil {
		if withInfo, err := profiles.BuildFromKernelMemory(data, uint64(img.Text), vmci); err == nil {
			p = withInfo
		} else {
			return nil, fmt.Errorf("build profile from guest memory: %w", err)
		}
	}
	if _, err := store.Save(p); err != nil {
		log.Warn("could not store the profile", "err", err)
	}
	return p, nil
}

// hasCounters reports whether a profile has the node counters' enum
// values (a profile stored before `save --squeeze` has not).
func hasCounters(p *profiles.Profile) bool {
	_, ok := p.Constants["NR_FILE_PAGES"]
	return ok
}

// hasTasks reports whether a profile describes the task structures (a
// profile stored by a kvmckpt before `ps` does not).
func hasTasks(p *profiles.Profile) bool {
	_, task := p.Structs["task_struct"]
	_, init := p.Symbols["init_task"]
	// Profiles from before cores lack the stack's registers and paths.
	_, regs := p.Structs["pt_regs"]
	_, dentry := p.Structs["dentry"]
	return task && init && regs && dentry
}

// readVmcoreinfo reads the kernel's vmcoreinfo text (what makedumpfile
// reads): vmcoreinfo_data points to a zeroed page the kernel fills at boot.
// It returns nil when the kernel has none.
func readVmcoreinfo(img *introspect.KernelImage, p *profiles.Profile) []byte {
	sym, ok := p.Symbols["vmcoreinfo_data"]
	text, ok2 := p.Symbols["_text"]
	if !ok || !ok2 {
		return nil
	}
	ptr, err := img.Translator.Uint64Virt(introspect.VAddr(sym - text + uint64(img.Text)))
	if err != nil || ptr == 0 {
		return nil
	}
	buf := make([]byte, vmcoreinfoMax)
	n, _ := img.Translator.ReadVirt(buf, introspect.VAddr(ptr))
	buf = buf[:n]
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	if !bytes.HasPrefix(buf, []byte("OSRELEASE=")) {
		return nil
	}
	return buf
}

// lookupStored finds a stored profile whose banner is in guest memory at
// that profile's linux_banner: the guest runs the build it describes.
func lookupStored(store profiles.Store, img *introspect.KernelImage, log *slog.Logger) *profiles.Profile {
	// A file that does not decode is left out of the list and reported;
	// the others still serve.
	list, err := store.List()
	if err != nil {
		log.Warn("some stored profiles cannot be read; they are passed over", "dir", store.Dir, "err", err)
	}
	for _, e := range list {
		p, err := store.Lookup(e.Banner)
		if err != nil {
			continue
		}
		got := make([]byte, len(p.Banner))
		off := p.Symbols["linux_banner"] - p.Symbols["_text"]
		if img.ReadAt(got, off) == nil && string(got) == p.Banner {
			log.Debug("using stored profile", "profile", p.Name)
			return p
		}
	}
	return nil
}

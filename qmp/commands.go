package qmp

import (
	"context"
	"fmt"
	"strings"
)

// Status is the guest's run state (QMP query-status).
type Status struct {
	// Running reports whether the vCPUs are running.
	Running bool
	// State is QEMU's RunState (qapi/run-state.json): "running",
	// "paused", "prelaunch", "inmigrate", "postmigrate", ...
	State string
}

// Status returns the guest's run state.
func (s *Session) Status(ctx context.Context) (Status, error) {
	var r struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := s.Run(ctx, "query-status", nil, &r); err != nil {
		return Status{}, fmt.Errorf("query status: %w", err)
	}
	return Status{Running: r.Running, State: r.Status}, nil
}

// Stop pauses the guest's vCPUs. Stopping a guest that is not running is
// not an error.
func (s *Session) Stop(ctx context.Context) error {
	if err := s.Run(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("stop guest: %w", err)
	}
	return nil
}

// Cont resumes the guest's vCPUs. After [Session.SaveDeviceState] it also
// reactivates the block devices the migration handed over.
func (s *Session) Cont(ctx context.Context) error {
	if err := s.Run(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("resume guest: %w", err)
	}
	return nil
}

// Quit makes QEMU exit. QEMU replies and then closes the connection; the
// session is unusable afterwards but still needs [Session.Close].
func (s *Session) Quit(ctx context.Context) error {
	if err := s.Run(ctx, "quit", nil, nil); err != nil && !isClosed(err) {
		return fmt.Errorf("quit QEMU: %w", err)
	}
	return nil
}

// Version returns QEMU's version as "major.minor.micro", for example
// "7.2.22" (query-version; the distribution's package string is left out).
func (s *Session) Version(ctx context.Context) (string, error) {
	var r struct {
		QEMU struct {
			Major, Minor, Micro int
		} `json:"qemu"`
	}
	if err := s.Run(ctx, "query-version", nil, &r); err != nil {
		return "", fmt.Errorf("query version: %w", err)
	}
	return fmt.Sprintf("%d.%d.%d", r.QEMU.Major, r.QEMU.Minor, r.QEMU.Micro), nil
}

// Chipset is the PC chipset a machine type emulates. It decides where RAM
// sits below and above 4 GiB (hw/i386/pc_piix.c and pc_q35.c).
type Chipset string

// Chipsets.
const (
	ChipsetI440FX Chipset = "i440fx" // "pc" machines
	ChipsetQ35    Chipset = "q35"
	ChipsetOther  Chipset = "other" // isapc, microvm, non-x86, ...
)

// Machine identifies the machine QEMU emulates.
type Machine struct {
	// Type is the versioned machine type, for example "pc-i440fx-7.2" or
	// "pc-q35-7.2", never an alias such as "pc" or "q35": a checkpoint can
	// only be loaded into the same versioned type.
	Type string
	// Chipset is the chipset of Type.
	Chipset Chipset
	// Arch is the target architecture, for example "x86_64".
	Arch string
}

// machineSuffix ends the QOM type name of every machine type
// (TYPE_MACHINE_SUFFIX in include/hw/boards.h).
const machineSuffix = "-machine"

// MachineType returns the machine type. It reads the QOM type of /machine,
// which is the resolved, versioned type whatever alias the command line
// used; query-machines in QEMU 7.2 does not say which machine is current.
func (s *Session) MachineType(ctx context.Context) (Machine, error) {
	var typ string
	if err := s.Run(ctx, "qom-get", map[string]string{"path": "/machine", "property": "type"}, &typ); err != nil {
		return Machine{}, fmt.Errorf("query machine type: %w", err)
	}
	var target struct {
		Arch string `json:"arch"`
	}
	if err := s.Run(ctx, "query-target", nil, &target); err != nil {
		return Machine{}, fmt.Errorf("query target: %w", err)
	}
	return newMachine(typ, target.Arch), nil
}

func newMachine(qomType, arch string) Machine {
	m := Machine{Type: strings.TrimSuffix(qomType, machineSuffix), Arch: arch}
	switch {
	case strings.HasPrefix(m.Type, "pc-q35-"):
		m.Chipset = ChipsetQ35
	case strings.HasPrefix(m.Type, "pc-i440fx-"):
		m.Chipset = ChipsetI440FX
	default:
		m.Chipset = ChipsetOther
	}
	return m
}

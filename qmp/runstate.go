package qmp

import "fmt"

// saveable says, for each QEMU run state (RunState in qapi/run-state.json,
// QEMU 7.2), whether kvmckpt can checkpoint a guest in it, and why not.
// An empty reason means it can: the vCPU and device state are consistent
// and QEMU accepts a migration (migration/migration.c, migrate_prepare).
var saveable = map[string]string{
	"running":        "",
	"paused":         "",
	"prelaunch":      "", // never ran (-S); a valid, boring checkpoint
	"postmigrate":    "a migration (an earlier save) left it paused, and QEMU refuses to migrate it again until it is resumed (migrate_prepare); it has not run since, so a checkpoint taken then is still current (copy it), or resume it first (kvmckpt resume, or QMP cont)",
	"suspended":      "", // ACPI S3; the migration wakes the guest up first
	"debug":          "", // stopped by the gdbstub
	"io-error":       "", // paused on a block I/O error, state intact
	"guest-panicked": "", // useful for post-mortems
	"watchdog":       "", // paused by the watchdog's pause action
	"inmigrate":      "it is waiting for an incoming migration and has no guest state yet; restore a checkpoint into it with kvmckpt restore",
	"finish-migrate": "a migration is finishing",
	"save-vm":        "a snapshot is being saved",
	"restore-vm":     "a snapshot is being loaded",
	"colo":           "it is in COLO fault-tolerance mode",
	"internal-error": "the hypervisor hit an internal error; the vCPU state is not reliable",
	"shutdown":       "the guest has shut down",
}

// CheckSaveable returns nil if a checkpoint can be taken of a guest in run
// state s, and otherwise an error wrapping [ErrNotSaveable] that says why.
// A running guest is saveable: the checkpoint pauses it first.
func (s Status) CheckSaveable() error {
	reason, known := saveable[s.State]
	switch {
	case !known:
		return fmt.Errorf("check guest state: %w: unknown run state %q", ErrNotSaveable, s.State)
	case reason != "":
		return fmt.Errorf("check guest state: %w: state %q: %s", ErrNotSaveable, s.State, reason)
	}
	return nil
}

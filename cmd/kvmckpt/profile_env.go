package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
)

// profileEnv names a directory into which kvmckpt writes a CPU and a
// block profile of its run (cpu-PID.pprof, block-PID.pprof), for finding
// where a save or restore spends its time on a real guest: read them
// with `go tool pprof`. Empty: no profiles.
const profileEnv = "KVMCKPT_PPROF_DIR"

// startProfiles starts the profiles profileEnv asks for and returns the
// function that writes them; it does nothing without the variable.
func startProfiles() (stop func(), err error) {
	dir := os.Getenv(profileEnv)
	if dir == "" {
		return func() {}, nil
	}
	pid := strconv.Itoa(os.Getpid())
	cpu, err := os.Create(filepath.Join(dir, "cpu-"+pid+".pprof"))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", profileEnv, err)
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		cpu.Close()
		return nil, fmt.Errorf("%s: %w", profileEnv, err)
	}
	// Every blocking event: a save blocks a few thousand times.
	runtime.SetBlockProfileRate(1)
	return func() {
		pprof.StopCPUProfile()
		cpu.Close()
		if f, err := os.Create(filepath.Join(dir, "block-"+pid+".pprof")); err == nil {
			pprof.Lookup("block").WriteTo(f, 0)
			f.Close()
		}
	}, nil
}

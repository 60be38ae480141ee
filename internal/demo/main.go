// Command demo shows kvmckpt's main job on a real guest: it boots a Debian
// guest whose workload fills most of its memory and frees it again, takes a
// checkpoint with the kvmckpt command, restores it into a second QEMU,
// checks that the guest runs on with its data intact, and prints the
// figures. `make demo` runs it.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	memMiB := flag.Int("mem", 2048, "guest RAM in MiB")
	machine := flag.String("machine", "pc", "QEMU machine: pc or q35")
	bin := flag.String("kvmckpt", "build/kvmckpt", "the kvmckpt command")
	flag.Parse()

	dir, err := os.MkdirTemp("/var/tmp", "kvmckpt-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	w := vmtest.Workload{Churn: *memMiB * 6 / 10, Anon: *memMiB / 20, Tmpfs: *memMiB / 20, Text: *memMiB / 10}
	cfg := vmtest.Config{Machine: *machine, MemMiB: *memMiB, CPUs: 2, Workload: w}
	fmt.Printf("booting a %d MiB %s guest (accelerator %s); its workload fills %d MiB and frees it, keeps %d MiB\n",
		*memMiB, *machine, vmtest.Accel(), w.Churn, w.Anon+w.Tmpfs+w.Text)
	src, err := vmtest.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer src.Close()
	if _, _, err := src.WaitSerial(ctx, regexp.MustCompile(`KW READY`), 0, vmtest.BootTimeout); err != nil {
		return err
	}
	freeKB := memFreeKB(src.Serial())

	ckpt := filepath.Join(dir, "guest.kvmckpt")
	fmt.Printf("checkpointing: %s save --qmp %s -o %s\n", *bin, src.QMPPath, ckpt)
	var save struct {
		PagesSaved       uint64 `json:"pages_saved"`
		PagesFree        uint64 `json:"pages_free"`
		BytesWritten     int64  `json:"bytes_written"`
		DeviceStateBytes int64  `json:"device_state_bytes"`
		PauseMS          int64  `json:"pause_ms"`
		DurationMS       int64  `json:"duration_ms"`
	}
	if err := runJSON(ctx, &save, *bin, "save", "--qmp", src.QMPPath, "-o", ckpt, "--json"); err != nil {
		return err
	}
	if err := runCmd(ctx, *bin, "verify", ckpt); err != nil {
		return err
	}

	tcfg := cfg
	tcfg.Incoming = true
	dst, err := vmtest.Start(ctx, tcfg)
	if err != nil {
		return err
	}
	defer dst.Close()
	fmt.Printf("restoring into a second QEMU: %s restore -i %s --qmp %s --resume\n", *bin, ckpt, dst.QMPPath)
	var restore struct {
		DurationMS int64 `json:"duration_ms"`
	}
	if err := runJSON(ctx, &restore, *bin, "restore", "-i", ckpt, "--qmp", dst.QMPPath, "--resume", "--json"); err != nil {
		return err
	}
	m, _, err := dst.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY (OK|FAIL).*`), 0, 2*time.Minute)
	if err != nil {
		return err
	}
	fmt.Printf("restored guest says: %s\n\n", m)
	if !bytes.Contains([]byte(m), []byte("OK")) {
		return errors.New("the restored guest's data did not verify")
	}

	ram := uint64(*memMiB) << 20
	used := ram - freeKB<<10
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "guest RAM\t%s\t\n", mib(ram))
	fmt.Fprintf(tw, "used by the guest (RAM - MemFree)\t%s\t\n", mib(used))
	fmt.Fprintf(tw, "free in the guest, found by kvmckpt\t%s\t\n", mib(save.PagesFree*4096))
	fmt.Fprintf(tw, "pages saved\t%s\t\n", mib(save.PagesSaved*4096))
	fmt.Fprintf(tw, "checkpoint file (lz4)\t%s\t\n", mib(uint64(save.BytesWritten)))
	fmt.Fprintf(tw, "  of it QEMU device state\t%s\t\n", mib(uint64(save.DeviceStateBytes)))
	fmt.Fprintf(tw, "guest paused during save\t%d ms\t\n", save.PauseMS)
	fmt.Fprintf(tw, "save, total\t%d ms\t\n", save.DurationMS)
	fmt.Fprintf(tw, "restore, total\t%d ms\t\n", restore.DurationMS)
	return tw.Flush()
}

// mib formats a size in MiB, or in KiB below 10 MiB.
func mib(n uint64) string {
	if n < 10<<20 {
		return fmt.Sprintf("%.0f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
}

func memFreeKB(serial string) uint64 {
	m := regexp.MustCompile(`KW MEM when=kept total_kb=\d+ free_kb=(\d+)`).FindStringSubmatch(serial)
	if m == nil {
		return 0
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

func runCmd(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

func runJSON(ctx context.Context, v any, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%s %s: %w", name, args[0], err)
	}
	return json.Unmarshal(out, v)
}

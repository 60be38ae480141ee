package main

// summary is one tool's operation over the repetitions.
type summary struct {
	Op          string `json:"op"`
	Tool        string `json:"tool"`
	PauseMS     stat   `json:"pause_ms"`
	TotalMS     stat   `json:"total_ms"`
	WithStartMS stat   `json:"with_qemu_start_ms"`
	Allocated   stat   `json:"allocated_bytes"`
	Apparent    stat   `json:"apparent_bytes"`
	ToolCPUMS   stat   `json:"tool_cpu_ms"`
	ToolMaxRSS  stat   `json:"tool_max_rss_bytes"`
	QEMUCPUMS   stat   `json:"qemu_cpu_ms"`
	// Ratios of medians to QEMU's own save or restore (1 for QEMU's).
	PauseVsQEMU float64 `json:"pause_vs_qemu,omitempty"`
	TotalVsQEMU float64 `json:"total_vs_qemu,omitempty"`
	BytesVsQEMU float64 `json:"bytes_vs_qemu,omitempty"`
	// DiskAloneMS is how long the disk alone would take to write the
	// median allocated bytes durably, at its median measured bandwidth
	// through the page cache (dd's way); DiskDirectMS with O_DIRECT.
	DiskAloneMS  float64 `json:"disk_alone_ms,omitempty"`
	DiskDirectMS float64 `json:"disk_direct_ms,omitempty"`
	Verified     int     `json:"verified"`
	Runs         int     `json:"runs"`
}

// diskSummary is the physical limit: the disk's durable sequential write
// bandwidth at the sizes kvmckpt and QEMU wrote, and how close each tool's
// save comes to it.
type diskSummary struct {
	Rows       []diskRow `json:"rows"`
	Equivalent string    `json:"equivalent"`
}

// diskRow compares one tool's saves with the disk writing as many bytes
// in the same repetition.
type diskRow struct {
	Tool  string `json:"tool"`
	Mode  string `json:"mode"`
	Bytes stat   `json:"bytes"`
	MiBps stat   `json:"mib_per_s"`
	// ToolMiBps is the tool's bytes written over its save's total time;
	// Fraction that over the disk's bandwidth. PauseFraction uses the
	// guest's pause instead of the total.
	ToolMiBps     stat `json:"tool_mib_per_s"`
	Fraction      stat `json:"fraction"`
	PauseFraction stat `json:"pause_fraction"`
	// DiskAloneMS is the disk's time for the tool's bytes.
	DiskAloneMS stat `json:"disk_alone_ms"`
}

var tools = []string{toolQEMU, toolMappedRAM, toolNaive, toolKvmckpt}

// summarizePoint fills in res's summaries from its measurements.
func summarizePoint(res *pointResult) {
	res.Disk = summarizeDisk(res)
	res.Summary = nil
	for _, op := range []string{opSave, opRestore} {
		var qemu summary
		for _, tool := range tools {
			var ms []measurement
			for _, m := range res.Measurements {
				if m.Tool == tool && m.Op == op {
					ms = append(ms, m)
				}
			}
			if len(ms) == 0 {
				continue
			}
			col := func(f func(measurement) float64) stat {
				v := make([]float64, len(ms))
				for i, m := range ms {
					v[i] = f(m)
				}
				return summarize(v)
			}
			s := summary{
				Op: op, Tool: tool, Runs: len(ms),
				PauseMS:     col(func(m measurement) float64 { return m.PauseMS }),
				TotalMS:     col(func(m measurement) float64 { return m.TotalMS }),
				WithStartMS: col(func(m measurement) float64 { return m.WithStartMS }),
				Allocated:   col(func(m measurement) float64 { return float64(m.Allocated) }),
				Apparent:    col(func(m measurement) float64 { return float64(m.Apparent) }),
				ToolCPUMS:   col(func(m measurement) float64 { return m.ToolCPUMS }),
				ToolMaxRSS:  col(func(m measurement) float64 { return float64(m.ToolMaxRSS) }),
				QEMUCPUMS:   col(func(m measurement) float64 { return m.QEMUCPUMS }),
			}
			for _, m := range ms {
				if m.Verified {
					s.Verified++
				}
			}
			if tool == toolQEMU {
				qemu = s
			}
			if qemu.Runs > 0 {
				s.PauseVsQEMU = ratio(s.PauseMS.Median, qemu.PauseMS.Median)
				s.TotalVsQEMU = ratio(s.TotalMS.Median, qemu.TotalMS.Median)
				s.BytesVsQEMU = ratio(s.Allocated.Median, qemu.Allocated.Median)
			}
			if bw := res.Disk.bandwidthFor(tool, diskBuffered); op == opSave && bw > 0 {
				s.DiskAloneMS = s.Allocated.Median / (1 << 20) / bw * 1000
			}
			if bw := res.Disk.bandwidthFor(tool, diskDirect); op == opSave && bw > 0 {
				s.DiskDirectMS = s.Allocated.Median / (1 << 20) / bw * 1000
			}
			res.Summary = append(res.Summary, s)
		}
	}
	var keys = []string{"scan_ms", "pages_ms", "device_state_ms", "sync_ms", "pause_ms", "duration_ms",
		"pages_total", "pages_saved", "pages_free", "pages_zero", "pages_hole", "bytes_written", "device_state_bytes"}
	res.KvmckptSave = map[string]stat{}
	for _, k := range keys {
		var v []float64
		for _, m := range res.Measurements {
			if x, ok := m.Detail[k]; ok && m.Tool == toolKvmckpt && m.Op == opSave {
				v = append(v, x)
			}
		}
		if len(v) > 0 {
			res.KvmckptSave[k] = summarize(v)
		}
	}
}

// summarizeDisk pairs each disk measurement with the save of the same
// repetition whose byte count it wrote.
func summarizeDisk(res *pointResult) diskSummary {
	d := diskSummary{Equivalent: "dd if=RANDOM of=FILE bs=4M conv=fdatasync (buffered) or with oflag=direct (direct), random data generated beforehand"}
	for _, tool := range []string{toolKvmckpt, toolQEMU} {
		for _, mode := range []string{diskBuffered, diskDirect} {
			if row, ok := diskRowFor(res, tool, mode); ok {
				d.Rows = append(d.Rows, row)
			}
		}
	}
	return d
}

func diskRowFor(res *pointResult, tool, mode string) (diskRow, bool) {
	var sizes, bw, got, frac, pauseFrac, alone []float64
	for _, run := range res.DiskRuns {
		if run.For != tool || run.Mode != mode {
			continue
		}
		sizes = append(sizes, float64(run.Bytes))
		bw = append(bw, run.MiBps())
		for _, m := range res.Measurements {
			if m.Tool != tool || m.Op != opSave || m.Rep != run.Rep || m.TotalMS <= 0 || m.PauseMS <= 0 {
				continue
			}
			achieved := mib(m.Allocated) / (m.TotalMS / 1000)
			got = append(got, achieved)
			frac = append(frac, achieved/run.MiBps())
			pauseFrac = append(pauseFrac, mib(m.Allocated)/(m.PauseMS/1000)/run.MiBps())
			alone = append(alone, mib(m.Allocated)/run.MiBps()*1000)
		}
	}
	if len(sizes) == 0 {
		return diskRow{}, false
	}
	return diskRow{
		Tool: tool, Mode: mode, Bytes: summarize(sizes), MiBps: summarize(bw),
		ToolMiBps: summarize(got), Fraction: summarize(frac), PauseFraction: summarize(pauseFrac),
		DiskAloneMS: summarize(alone),
	}, true
}

// bandwidthFor is the median bandwidth of the disk writing as many
// bytes as tool in mode; the naive copy writes about as many as QEMU.
func (d diskSummary) bandwidthFor(tool, mode string) float64 {
	if tool == toolNaive {
		tool = toolQEMU
	}
	for _, r := range d.Rows {
		if r.Tool == tool && r.Mode == mode {
			return r.MiBps.Median
		}
	}
	return 0
}

func findSummary(ss []summary, op, tool string) (summary, bool) {
	for _, s := range ss {
		if s.Op == op && s.Tool == tool {
			return s, true
		}
	}
	return summary{}, false
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

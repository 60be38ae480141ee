package main

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"
	"path/filepath"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

var (
	toolColors = map[string]color.RGBA{
		toolQEMU:      {0xd9, 0x5f, 0x02, 0xff},
		toolNaive:     {0x75, 0x70, 0xb3, 0xff},
		toolKvmckpt:   {0x1b, 0x9e, 0x77, 0xff},
		toolMappedRAM: {0xe7, 0x29, 0x8a, 0xff},
	}
	black = color.RGBA{0, 0, 0, 0xff}
	grey  = color.RGBA{0xcc, 0xcc, 0xcc, 0xff}
)

// bar is one bar of a chart: the median, with the spread as a whisker.
type bar struct {
	tool        string
	med, lo, hi float64
}

type barGroup struct {
	name string
	bars []bar
}

// writePNG draws the main result as two bar charts, times and sizes, one
// bar per tool, and writes it to path.
func writePNG(path string, p *pointResult, title string) error {
	const w, h = 1200, 560
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	text(img, 20, 24, black, title)

	from := func(op string, f func(summary) stat) barGroup {
		var g barGroup
		for _, tool := range tools {
			if s, ok := findSummary(p.Summary, op, tool); ok {
				st := f(s)
				g.bars = append(g.bars, bar{tool, st.Median, st.Min, st.Max})
			}
		}
		return g
	}
	pause := from(opSave, func(s summary) stat { return s.PauseMS })
	pause.name = "save: guest paused"
	total := from(opSave, func(s summary) stat { return s.TotalMS })
	total.name = "save: total"
	restore := from(opRestore, func(s summary) stat { return s.TotalMS })
	restore.name = "restore"
	alone := barGroup{name: "disk alone, dd-style"}
	for _, tool := range tools {
		if s, ok := findSummary(p.Summary, opSave, tool); ok && s.DiskAloneMS > 0 {
			alone.bars = append(alone.bars, bar{tool, s.DiskAloneMS, s.DiskAloneMS, s.DiskAloneMS})
		}
	}
	panel(img, image.Rect(20, 50, 780, 500), "time, ms (median; whiskers min-max)", []barGroup{pause, total, restore, alone})

	size := from(opSave, func(s summary) stat {
		return stat{Median: s.Allocated.Median / (1 << 20), Min: s.Allocated.Min / (1 << 20), Max: s.Allocated.Max / (1 << 20), N: s.Allocated.N}
	})
	size.name = "checkpoint on disk"
	panel(img, image.Rect(820, 50, 1180, 500), "MiB written (allocated)", []barGroup{size})

	x := 20
	for _, tool := range tools {
		fill(img, image.Rect(x, 522, x+14, 536), toolColors[tool])
		text(img, x+20, 534, black, toolNames[tool])
		x += 30 + 7*len(toolNames[tool])
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write chart: %w", err)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write chart: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return fmt.Errorf("write chart: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write chart: %w", err)
	}
	return nil
}

// panel draws grouped bars into r, on a linear scale from zero.
func panel(img *image.RGBA, r image.Rectangle, title string, groups []barGroup) {
	text(img, r.Min.X, r.Min.Y+12, black, title)
	plot := image.Rect(r.Min.X, r.Min.Y+40, r.Max.X, r.Max.Y-24)
	top := 0.0
	nbars := 0
	for _, g := range groups {
		for _, b := range g.bars {
			top = max(top, b.hi, b.med)
		}
		nbars += len(g.bars)
	}
	if top <= 0 || nbars == 0 {
		return
	}
	top *= 1.1
	fill(img, image.Rect(plot.Min.X, plot.Max.Y, plot.Max.X, plot.Max.Y+1), black)
	fill(img, image.Rect(plot.Min.X, plot.Min.Y, plot.Max.X, plot.Min.Y+1), grey)
	text(img, plot.Min.X, plot.Min.Y-4, grey, fmt.Sprintf("%.0f", top))
	y := func(v float64) int { return plot.Max.Y - int(v/top*float64(plot.Dy())) }

	gap := 24
	slot := (plot.Dx() - gap*(len(groups)+1)) / nbars
	bw := slot * 3 / 4
	x := plot.Min.X + gap
	for _, g := range groups {
		gx := x
		for _, b := range g.bars {
			fill(img, image.Rect(x, y(b.med), x+bw, plot.Max.Y), toolColors[b.tool])
			if b.hi > b.lo {
				mid := x + bw/2
				fill(img, image.Rect(mid, y(b.hi), mid+1, y(b.lo)+1), black)
				fill(img, image.Rect(mid-3, y(b.hi), mid+4, y(b.hi)+1), black)
				fill(img, image.Rect(mid-3, y(b.lo), mid+4, y(b.lo)+1), black)
			}
			label := fmt.Sprintf("%.0f", b.med)
			text(img, x+bw/2-7*len(label)/2, min(y(b.hi), y(b.med))-4, black, label)
			x += slot
		}
		text(img, gx+(x-gx-7*len(g.name))/2, plot.Max.Y+16, black, g.name)
		x += gap
	}
}

func fill(img *image.RGBA, r image.Rectangle, c color.Color) {
	draw.Draw(img, r, image.NewUniform(c), image.Point{}, draw.Src)
}

func text(img *image.RGBA, x, y int, c color.Color, s string) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

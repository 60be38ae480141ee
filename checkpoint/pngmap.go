package checkpoint

import (
	"bufio"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/kvmckpt/kvmckpt/pagemap"
)

// Page classes on the map, in the order a block's colour is chosen when
// its pages differ: a block with any page to save shows as saved.
var mapClasses = []struct {
	name string
	c    color.RGBA
}{
	{"saved (used)", color.RGBA{0xd6, 0x3b, 0x2f, 0xff}},
	{"free (buddy, per-CPU)", color.RGBA{0x3a, 0xa6, 0x55, 0xff}},
	{"zero", color.RGBA{0xe8, 0xe8, 0xe8, 0xff}},
	{"hole", color.RGBA{0x30, 0x30, 0x30, 0xff}},
}

const (
	mapWidth     = 1024
	mapMaxPixels = mapWidth * 1024
	legendHeight = 24
)

// drawMap draws the RAM file pages as a picture, left to right and top to
// bottom: one pixel per page, or per block of pages when there are more
// pages than fit, with a legend below.
func drawMap(path string, save, free *pagemap.Bitmap, zeroOrHole func(page uint64) (zero, hole bool)) error {
	n := save.Len()
	per := uint64(1)
	for n/per > mapMaxPixels {
		per *= 2
	}
	pixels := (n + per - 1) / per
	w := min(uint64(mapWidth), pixels)
	rows := (pixels + w - 1) / w
	img := image.NewRGBA(image.Rect(0, 0, int(max(w, 860)), int(rows)+legendHeight))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	for px := uint64(0); px < pixels; px++ {
		class := len(mapClasses) - 1
		for p := px * per; p < min((px+1)*per, n); p++ {
			c := 3
			switch {
			case save.Test(p):
				c = 0
			case free.Test(p):
				c = 1
			default:
				if zero, _ := zeroOrHole(p); zero {
					c = 2
				}
			}
			class = min(class, c)
		}
		img.SetRGBA(int(px%w), int(px/w), mapClasses[class].c)
	}
	d := &font.Drawer{Dst: img, Src: image.Black, Face: basicfont.Face7x13}
	x := 4
	y := int(rows) + 4
	for _, cl := range mapClasses {
		draw.Draw(img, image.Rect(x, y, x+12, y+12), &image.Uniform{cl.c}, image.Point{}, draw.Src)
		d.Dot = fixed.P(x+16, y+11)
		d.DrawString(cl.name)
		x += 16 + d.MeasureString(cl.name).Ceil() + 14
	}
	d.Dot = fixed.P(x, y+11)
	d.DrawString(fmt.Sprintf("%d page/pixel, %d MiB/row, RAM file order", per, per*w*4096>>20))
	err := safefile.Write(path, 0o644, func(f io.Writer) error {
		bw := bufio.NewWriter(f)
		if err := png.Encode(bw, img); err != nil {
			return err
		}
		return bw.Flush()
	})
	if err != nil {
		return fmt.Errorf("write map: %w", err)
	}
	return nil
}

package profiles

import (
	"bytes"
	"testing"
)

// Fuzz targets. Seeds come from testdata/profiles and from the synthetic
// kernel; run one with, for example:
//
//	go test ./profiles -run '^$' -fuzz FuzzKallsyms -fuzztime 1m

func FuzzKallsyms(f *testing.F) {
	for _, layout := range []ksymLayout{layout61, layout62, layout64, layoutAbs} {
		w := &imgBuilder{base: testBase}
		w.b = append(w.b, randomBytes(4, 64)...)
		appendKallsyms(f, w, testSymbols(testBase, 300, layout != layoutAbs), layout, layout != layoutAbs)
		f.Add(w.b)
	}
	f.Add(make([]byte, 4096))
	f.Fuzz(func(t *testing.T, img []byte) {
		k, err := DecodeKallsyms(img, testBase)
		if err != nil {
			return
		}
		if len(k.Symbols) == 0 || len(k.Symbols) > len(img) {
			t.Fatalf("%d symbols from %d bytes", len(k.Symbols), len(img))
		}
		for i := 1; i < len(k.Symbols); i++ {
			if k.Symbols[i].Addr < k.Symbols[i-1].Addr {
				t.Fatal("decoded symbols are not sorted")
			}
		}
	})
}

func FuzzDecodeProfile(f *testing.F) {
	for _, file := range savedProfiles {
		f.Add(readTestdata(f, file))
	}
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Decode(bytes.NewReader(b))
		if err != nil {
			return
		}
		// Whatever decodes re-encodes and decodes to the same profile.
		var out bytes.Buffer
		if err := p.Encode(&out); err != nil {
			t.Fatalf("decoded profile does not encode: %v", err)
		}
		if _, err := Decode(&out); err != nil {
			t.Fatalf("re-encoded profile does not decode: %v", err)
		}
	})
}

func FuzzISF(f *testing.F) {
	k := makeSynthKernel(f, synthOpts{prefAddress: true})
	p, err := BuildFromKernelMemory(k.img, k.base, nil)
	if err != nil {
		f.Fatal(err)
	}
	spec, err := loadBTF(synthBTF(f))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(isfFromBTF(f, spec, p.Symbols, p.Banner, 1024))
	f.Add(readTestdata(f, isfFixture))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := FromISF(bytes.NewReader(b))
		if err == nil {
			if err := p.Validate(); err != nil {
				t.Fatalf("FromISF returned an invalid profile: %v", err)
			}
		}
	})
}

func FuzzBzImage(f *testing.F) {
	k := makeSynthKernel(f, synthOpts{})
	vmlinux := k.elfImage(f)
	f.Add(bzImage(gzipBytes(f, vmlinux)))
	f.Add(vmlinux)
	for _, c := range []string{"gzip", "bzip2", "lzma", "xz", "lz4", "zstd"} {
		f.Add(bzImage(readTestdata(f, "payload.bin."+c)))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		// A small limit keeps runs fast; the code paths are the same.
		p, err := buildFromImageReader(bytes.NewReader(b), int64(len(b)), nil, 8<<20)
		if err == nil {
			if err := p.Validate(); err != nil {
				t.Fatalf("built an invalid profile: %v", err)
			}
		}
	})
}

func FuzzVmcoreinfo(f *testing.F) {
	k := makeSynthKernel(f, synthOpts{})
	f.Add(synthVmcoreinfo(k, 0, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseVmcoreinfo(b)
	})
}

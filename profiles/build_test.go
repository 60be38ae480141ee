package profiles

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/stretchr/testify/require"
)

// synthVmcoreinfo is vmcoreinfo text consistent with the synthetic kernel
// relocated by delta; edit replaces lines by key.
func synthVmcoreinfo(k *synthKernel, delta uint64, edit map[string]string) []byte {
	lines := []struct{ k, v string }{
		{"OSRELEASE", synthRelease},
		{"BUILD-ID", synthBuildID},
		{"PAGESIZE", "4096"},
		{"SYMBOL(init_uts_ns)", "ffffffff82a13e40"},
		{"SYMBOL(node_data)", fmt.Sprintf("%x", k.syms["node_data"]+delta)},
		{"LENGTH(node_data)", "1024"},
		{"SYMBOL(init_top_pgt)", fmt.Sprintf("%x", k.syms["init_top_pgt"]+delta)},
		{"SIZE(page)", "64"},
		{"SIZE(pglist_data)", "7744"},
		{"SIZE(zone)", "1536"},
		{"SIZE(free_area)", "88"},
		{"SIZE(list_head)", "16"},
		{"SIZE(nodemask_t)", "128"},
		{"OFFSET(page.flags)", "0"},
		{"OFFSET(page._refcount)", "52"},
		{"OFFSET(page.mapping)", "24"},
		{"OFFSET(page.lru)", "8"},
		{"OFFSET(page._mapcount)", "48"},
		{"OFFSET(page.private)", "40"},
		{"OFFSET(page.compound_dtor)", "16"},
		{"OFFSET(page.compound_order)", "17"},
		{"OFFSET(page.compound_head)", "8"},
		{"OFFSET(pglist_data.node_zones)", "0"},
		{"OFFSET(pglist_data.nr_zones)", "7680"},
		{"OFFSET(pglist_data.node_start_pfn)", "7688"},
		{"OFFSET(pglist_data.node_spanned_pages)", "7704"},
		{"OFFSET(pglist_data.node_id)", "7712"},
		{"OFFSET(zone.free_area)", "256"},
		{"OFFSET(zone.vm_stat)", "1344"},
		{"OFFSET(zone.spanned_pages)", "144"},
		{"OFFSET(free_area.free_list)", "0"},
		{"OFFSET(list_head.next)", "0"},
		{"OFFSET(list_head.prev)", "8"},
		{"OFFSET(vmap_area.va_start)", "0"},
		{"LENGTH(zone.free_area)", "11"},
		{"LENGTH(free_area.free_list)", "5"},
		{"NUMBER(NR_FREE_PAGES)", "0"},
		{"NUMBER(PG_lru)", "4"},
		{"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", "-129"},
		{"NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)", "-257"},
		{"NUMBER(phys_base)", "-16777216"},
		{"KERNELOFFSET", fmt.Sprintf("%x", delta)},
		{"NUMBER(KERNEL_IMAGE_SIZE)", "1073741824"},
		{"CRASHTIME", "1700000000"},
	}
	var b strings.Builder
	for _, l := range lines {
		v := l.v
		if e, ok := edit[l.k]; ok {
			v = e
			delete(edit, l.k)
		}
		if v != "" {
			fmt.Fprintf(&b, "%s=%s\n", l.k, v)
		}
	}
	for k, v := range edit {
		fmt.Fprintf(&b, "%s=%s\n", k, v)
	}
	return []byte(b.String() + "\x00\x00\x00")
}

func TestBuildFromKernelMemory(t *testing.T) {
	const delta = 0x2e000000
	for _, tc := range []struct {
		name         string
		opts         synthOpts
		vmcoreinfo   bool
		wantDefaults []string
	}{
		{"no KASLR, boot_params", synthOpts{prefAddress: true}, false, []string{"PAGEBLOCK_ORDER", "PAGE_ALLOC_COSTLY_ORDER", "PAGE_BUDDY_MAPCOUNT_VALUE", "PAGE_OFFLINE_MAPCOUNT_VALUE"}},
		{"KASLR, boot_params", synthOpts{delta: delta, prefAddress: true}, false, []string{"PAGEBLOCK_ORDER", "PAGE_ALLOC_COSTLY_ORDER", "PAGE_BUDDY_MAPCOUNT_VALUE", "PAGE_OFFLINE_MAPCOUNT_VALUE"}},
		{"KASLR, assumed _text", synthOpts{delta: delta}, false, []string{"PAGEBLOCK_ORDER", "PAGE_ALLOC_COSTLY_ORDER", "PAGE_BUDDY_MAPCOUNT_VALUE", "PAGE_OFFLINE_MAPCOUNT_VALUE", "_text"}},
		{"KASLR, vmcoreinfo", synthOpts{delta: delta}, true, []string{"PAGEBLOCK_ORDER", "PAGE_ALLOC_COSTLY_ORDER"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := makeSynthKernel(t, tc.opts)
			var vi []byte
			if tc.vmcoreinfo {
				vi = synthVmcoreinfo(k, tc.opts.delta, nil)
			}
			p, err := BuildFromKernelMemory(k.img, k.base, vi)
			require.NoError(t, err)
			require.Equal(t, "guest-memory", p.Source)
			require.Equal(t, strings.TrimSuffix(synthBanner, "\n"), p.Banner)
			require.Equal(t, synthRelease, p.Release)
			require.Regexp(t, `^6\.1\.0-99-synth-[0-9a-f]{8}$`, p.Name)
			require.Equal(t, synthBuildID, p.BuildID)
			require.Equal(t, tc.wantDefaults, p.Defaults)
			for name, addr := range k.syms {
				if !wantedSymbol(name) {
					continue
				}
				require.Equal(t, addr, p.Symbols[name], "symbol %s", name)
			}
			require.Contains(t, p.Symbols, "kallsyms_token_index")
			require.Equal(t, uint64(testBase), p.Symbols["_text"])
			checkLayout61(t, p)
			require.Equal(t, int64(1024), p.Constants["MAX_NUMNODES"])
			require.Equal(t, int64(-129), p.Constants["PAGE_BUDDY_MAPCOUNT_VALUE"])
			if tc.vmcoreinfo {
				require.Equal(t, int64(-257), p.Constants["PAGE_OFFLINE_MAPCOUNT_VALUE"])
				require.NotContains(t, p.Constants, "phys_base")
			}
		})
	}
}

// checkLayout61 checks what Debian 6.1.0-47-amd64 has, which the
// synthetic kernel copies.
func checkLayout61(t *testing.T, p *Profile) {
	t.Helper()
	page := p.Structs["page"]
	require.Equal(t, uint64(64), page.Size)
	for f, off := range map[string]uint64{
		"flags": 0, "lru": 8, "buddy_list": 8, "pcp_list": 8, "compound_head": 8,
		"index": 24 + 8, "private": 40, "_mapcount": 48, "page_type": 48,
	} {
		require.Equal(t, off, page.Fields[f].Offset, "page.%s", f)
	}
	require.Equal(t, Field{Offset: 0, Size: 80, Count: 5}, p.Structs["free_area"].Fields["free_list"])
	require.Equal(t, Field{Offset: 8, Size: 8}, p.Structs["list_head"].Fields["prev"])
	require.Equal(t, Field{Offset: 256, Size: 968, Count: 11}, p.Structs["zone"].Fields["free_area"])
	require.Equal(t, Field{Offset: 1232, Size: 4}, p.Structs["zone"].Fields["lock"])
	require.Equal(t, Field{Offset: 1232, Size: 4}, p.Structs["zone"].Fields["lock.rlock.raw_lock"])
	require.Equal(t, Field{Offset: 24, Size: 224, Count: 14}, p.Structs["per_cpu_pages"].Fields["lists"])
	require.Equal(t, Field{Offset: 0, Size: 4}, p.Structs["atomic_t"].Fields["counter"])
	require.Equal(t, Field{Offset: 0, Size: 8}, p.Structs["atomic_long_t"].Fields["counter"])
	require.Equal(t, Field{Offset: 0, Size: 4}, p.Structs["static_key"].Fields["enabled"])
	require.Equal(t, uint64(128), p.Structs["cpumask"].Fields["bits"].Count)
	require.Equal(t, uint64(4), p.Structs["spinlock"].Size)
	for c, v := range map[string]int64{
		"MAX_ORDER": 11, "MIGRATE_TYPES": 5, "MIGRATE_PCPTYPES": 3, "NR_PCP_LISTS": 14,
		"NR_LOWORDER_PCP_LISTS": 12, "NR_PCP_THP": 2, "NR_FREE_PAGES": 0, "MAX_NR_ZONES": 5,
		"N_ONLINE": 1, "PAGE_ALLOC_COSTLY_ORDER": 3, "PAGEBLOCK_ORDER": 9, "PAGE_SIZE": 4096,
	} {
		require.Equal(t, v, p.Constants[c], "constant %s", c)
	}
	for pindex, order := range map[int]int{0: 0, 2: 0, 3: 1, 11: 3, 12: 9, 13: 9} {
		got, ok := p.PCPListOrder(pindex)
		require.True(t, ok)
		require.Equal(t, order, got, "pindex %d", pindex)
	}
	_, ok := p.PCPListOrder(14)
	require.False(t, ok)
}

func TestBuildFromKernelMemoryErrors(t *testing.T) {
	const delta = 0x4000000
	k := makeSynthKernel(t, synthOpts{delta: delta, prefAddress: true})
	for _, tc := range []struct {
		name string
		opts synthOpts
		edit map[string]string
		want error
	}{
		{"missing node_data", synthOpts{omit: []string{"node_data"}}, nil, ErrMissingSymbol},
		{"no BTF", synthOpts{omit: []string{"__start_BTF", "__stop_BTF"}}, nil, ErrNoBTF},
		{"offset", synthOpts{}, map[string]string{"OFFSET(page.lru)": "16"}, ErrMismatch},
		{"size", synthOpts{}, map[string]string{"SIZE(zone)": "1600"}, ErrMismatch},
		{"length", synthOpts{}, map[string]string{"LENGTH(zone.free_area)": "12"}, ErrMismatch},
		{"number", synthOpts{}, map[string]string{"NUMBER(NR_FREE_PAGES)": "1"}, ErrMismatch},
		{"symbol", synthOpts{}, map[string]string{"SYMBOL(node_data)": "ffffffff8d6f3c20"}, ErrMismatch},
		{"release", synthOpts{}, map[string]string{"OSRELEASE": "6.1.0-48-amd64"}, ErrMismatch},
		{"build id", synthOpts{}, map[string]string{"BUILD-ID": strings.Repeat("ab", 20)}, ErrMismatch},
		{"kernel offset", synthOpts{}, map[string]string{"KERNELOFFSET": "ffffffffff000000"}, ErrMismatch},
		{"bad number", synthOpts{}, map[string]string{"SIZE(page)": "sixty-four"}, ErrMalformed},
		{"too large", synthOpts{}, map[string]string{"PADDING": strings.Repeat("x", maxVmcoreinfo)}, ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kk := k
			var vi []byte
			if tc.opts.omit != nil {
				kk = makeSynthKernel(t, synthOpts{delta: delta, prefAddress: true, omit: tc.opts.omit})
			}
			if tc.edit != nil {
				vi = synthVmcoreinfo(kk, delta, tc.edit)
			}
			_, err := BuildFromKernelMemory(kk.img, kk.base, vi)
			require.ErrorIs(t, err, tc.want)
		})
	}
	var me *MismatchError
	_, err := BuildFromKernelMemory(k.img, k.base, synthVmcoreinfo(k, delta, map[string]string{"OFFSET(page.lru)": "16"}))
	require.ErrorAs(t, err, &me)
	require.Equal(t, "OFFSET(page.lru)", me.What)
	require.Equal(t, "8", me.Got)
	require.Equal(t, "16", me.Want)
}

func writeTemp(t *testing.T, name string, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return path
}

func TestBuildFromImageSynthetic(t *testing.T) {
	k := makeSynthKernel(t, synthOpts{})
	vmlinux := k.elfImage(t)
	for _, tc := range []struct {
		name string
		file []byte
	}{
		{"ELF", vmlinux},
		{"bzImage gzip", bzImage(gzipBytes(t, vmlinux))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := BuildFromImage(writeTemp(t, "vmlinuz", tc.file))
			require.NoError(t, err)
			require.Equal(t, "image", p.Source)
			require.Equal(t, synthBuildID, p.BuildID)
			for name, addr := range k.syms {
				if !wantedSymbol(name) {
					continue
				}
				require.Equal(t, addr, p.Symbols[name], "symbol %s", name)
			}
			require.NotContains(t, p.Defaults, "_text")
			checkLayout61(t, p)
		})
	}
	systemMap := func(edit map[string]uint64) string {
		var b strings.Builder
		for _, name := range sortedKeys(k.syms) {
			a := k.syms[name]
			if e, ok := edit[name]; ok {
				a = e
			}
			fmt.Fprintf(&b, "%016x T %s\n", a, name)
		}
		return b.String()
	}
	elfPath := writeTemp(t, "vmlinux", vmlinux)
	for _, tc := range []struct {
		name, systemMap string
		want            error
	}{
		{"matching", systemMap(nil), nil},
		{"Debian stub", "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n", nil},
		{"other kernel", systemMap(map[string]uint64{"node_data": 0xffffffff82c392e0}), ErrMismatch},
		{"garbage", "not a system map\n", ErrMalformed},
	} {
		t.Run("System.map "+tc.name, func(t *testing.T) {
			_, err := BuildFromImageWithOptions(elfPath, BuildOptions{SystemMap: writeTemp(t, "System.map", []byte(tc.systemMap))})
			if tc.want == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, tc.want)
			}
		})
	}
	_, err := BuildFromImage(writeTemp(t, "notes.txt", []byte("hello, world\n")))
	require.ErrorIs(t, err, ErrNotKernelImage)
	_, err = BuildFromImage(filepath.Join(t.TempDir(), "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestBuildFromKernelMemoryNoTables(t *testing.T) {
	_, err := BuildFromKernelMemory(randomBytes(7, 1<<16), testBase, nil)
	require.ErrorIs(t, err, ErrNoKallsyms)

	// BTF without the kernel's structs.
	spec, err := loadBTF(synthBTF(t))
	require.NoError(t, err)
	var lh *btf.Struct
	require.NoError(t, spec.TypeByName("list_head", &lh))
	b, err := btf.NewBuilder([]btf.Type{lh}, nil)
	require.NoError(t, err)
	raw, err := b.Marshal(nil, nil)
	require.NoError(t, err)
	k := makeSynthKernel(t, synthOpts{prefAddress: true, btf: raw})
	_, err = BuildFromKernelMemory(k.img, k.base, nil)
	require.ErrorIs(t, err, ErrMissingType)
	var me *MissingError
	require.ErrorAs(t, err, &me)
	require.Equal(t, "struct", me.Kind)

	// BTF that does not parse.
	k = makeSynthKernel(t, synthOpts{prefAddress: true, btf: randomBytes(8, 512)})
	_, err = BuildFromKernelMemory(k.img, k.base, nil)
	require.ErrorIs(t, err, ErrMalformed)
}

func TestBuildFromImageErrors(t *testing.T) {
	vmlinux := makeSynthKernel(t, synthOpts{}).elfImage(t)
	noBTF := makeSynthKernel(t, synthOpts{omit: []string{"__start_BTF", "__stop_BTF"}}).elfImage(t)
	garbageELF := bytes.Clone(vmlinux)
	copy(garbageELF[0x1000:], randomBytes(6, len(garbageELF)-0x1000))
	for _, tc := range []struct {
		name  string
		file  []byte
		limit int
		want  error
	}{
		{"lzo payload", bzImage(append([]byte{0x89, 'L', 'Z', 'O', 0, 0x0d, 0x0a, 0x1a}, make([]byte, 16)...)), maxVmlinux, ErrUnsupportedCompression},
		{"payload too large", bzImage(gzipBytes(t, vmlinux)), len(vmlinux) - 1, ErrTooLarge},
		{"payload not ELF", bzImage(readTestdata(t, "payload.bin.xz")), maxVmlinux, ErrMalformed},
		{"no kallsyms", bzImage(gzipBytes(t, garbageELF)), maxVmlinux, ErrNoKallsyms},
		{"no BTF", noBTF, maxVmlinux, ErrNoBTF},
		{"truncated ELF", vmlinux[:0x800], maxVmlinux, ErrMalformed},
		{"empty", nil, maxVmlinux, ErrNotKernelImage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := buildFromImageReader(bytes.NewReader(tc.file), int64(len(tc.file)), nil, tc.limit)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

package profiles

// wantStruct describes a struct a profile carries. Profiles store every
// member of these structs (see [Struct]); required lists the members
// without which introspection cannot work, and [Profile.Validate] checks
// them.
type wantStruct struct {
	name string
	// aliases are other type names to try, for typedefs of anonymous
	// structs such as atomic_long_t (atomic64_t on 64-bit).
	aliases  []string
	required []string
	optional bool
	// depth, if not zero, bounds the named members expanded below the
	// struct's own (as maxFieldDepth does for all): task_struct nests
	// thousands of fields, and the ones wanted would be cut off by
	// maxFields.
	depth int
}

// maxDepth is how deep named members of w are expanded.
func (w wantStruct) maxDepth() int {
	if w.depth > 0 {
		return w.depth
	}
	return maxFieldDepth
}

// wantStructs are the structs a profile carries. Linux 6.1 names; the
// fields are looked up by name in BTF or ISF, never assumed.
var wantStructs = []wantStruct{
	// buddy_list and pcp_list (6.1+) alias lru; page_type shares a union
	// with _mapcount; compound_head is in another union member. All are
	// optional because older kernels lack some of them.
	{name: "page", required: []string{"flags", "lru", "private", "index", "_mapcount"}},
	{name: "pglist_data", required: []string{"node_zones", "nr_zones", "node_start_pfn", "node_present_pages", "node_spanned_pages", "node_id"}},
	{name: "zone", required: []string{"lock", "free_area", "zone_start_pfn", "spanned_pages", "present_pages", "per_cpu_pageset", "vm_stat", "name", "zone_pgdat", "managed_pages"}},
	{name: "free_area", required: []string{"free_list", "nr_free"}},
	{name: "list_head", required: []string{"next", "prev"}},
	// lock was added in 6.0 ("mm/page_alloc: protect PCP lists with a
	// spinlock").
	{name: "per_cpu_pages", required: []string{"count", "high", "batch", "lists"}},
	// spinlock_t is a typedef of struct spinlock; the lock word is
	// rlock.raw_lock (arch_spinlock_t, a qspinlock on x86).
	{name: "spinlock", aliases: []string{"spinlock_t"}, optional: true},
	{name: "atomic_t", required: []string{"counter"}, optional: true},
	{name: "atomic_long_t", aliases: []string{"atomic64_t"}, required: []string{"counter"}, optional: true},
	{name: "static_key", required: []string{"enabled"}, optional: true},
	{name: "cpumask", required: []string{"bits"}, optional: true},

	// Tasks, for `kvmckpt ps` and `core`: optional, as a save never
	// needs them; package introspect checks what it reads. 6.1 names.
	{name: "task_struct", optional: true, depth: 1, required: []string{
		"tasks", "pid", "tgid", "comm", "__state", "flags", "mm", "real_parent",
		"real_cred", "signal", "thread_node", "thread_pid", "exit_state", "stack",
	}},
	{name: "signal_struct", optional: true, depth: 1, required: []string{"thread_head", "nr_threads"}},
	{name: "pid", optional: true, required: []string{"level", "numbers"}},
	{name: "upid", optional: true, required: []string{"nr", "ns"}},
	{name: "pid_namespace", optional: true, depth: 1, required: []string{"level"}},
	{name: "cred", optional: true, depth: 1, required: []string{"uid", "euid"}},
	{name: "mm_struct", optional: true, depth: 1, required: []string{"pgd", "map_count", "arg_start", "arg_end", "rss_stat"}},
	{name: "percpu_counter", optional: true, required: []string{"count", "counters"}},
	// The maple tree of an mm's VMAs (6.1+), for `kvmckpt core`.
	{name: "maple_tree", optional: true, required: []string{"ma_root", "ma_flags"}},
	{name: "maple_node", optional: true, depth: 1, required: []string{"parent", "slot", "mr64", "ma64"}},
	{name: "maple_range_64", optional: true, required: []string{"parent", "pivot", "slot", "meta"}},
	{name: "maple_arange_64", optional: true, required: []string{"parent", "pivot", "slot", "gap", "meta"}},
	{name: "maple_metadata", optional: true, required: []string{"end", "gap"}},
	{name: "vm_area_struct", optional: true, depth: 1, required: []string{"vm_start", "vm_end", "vm_mm", "vm_flags", "vm_pgoff", "vm_file"}},
	// A thread's saved user registers (at the top of its kernel stack),
	// and the per-CPU block holding the running task in 6.2+.
	{name: "pt_regs", optional: true, required: []string{
		"r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx",
		"dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss",
	}},
	{name: "pcpu_hot", optional: true, required: []string{"current_task"}},
	// File paths of mappings (NT_FILE) and the vDSO image of a core.
	{name: "file", optional: true, depth: 1, required: []string{"f_path"}},
	{name: "path", optional: true, required: []string{"mnt", "dentry"}},
	{name: "dentry", optional: true, depth: 1, required: []string{"d_parent", "d_name"}},
	{name: "qstr", optional: true, required: []string{"len", "name"}},
	{name: "mount", optional: true, depth: 1, required: []string{"mnt", "mnt_parent", "mnt_mountpoint"}},
	{name: "vfsmount", optional: true, required: []string{"mnt_root"}},
	{name: "vdso_image", optional: true, required: []string{"data", "size"}},
}

// Symbols a profile must have, and symbols it records when present.
var (
	requiredSymbols = []string{
		"linux_banner", "_text", "node_data", "page_offset_base", "vmemmap_base",
		"__per_cpu_offset", "__cpu_possible_mask", "nr_cpu_ids",
	}
	optionalSymbols = []string{
		"_stext", "_etext", "_end", "node_states", "vmalloc_base", "init_top_pgt",
		"__cpu_online_mask", "vmcoreinfo_data", "vmcoreinfo_note", "__start_BTF",
		"__stop_BTF", "_totalram_pages", "init_on_free", "init_on_alloc",
		"_page_poisoning_enabled", "phys_base", "__start_notes", "__stop_notes",
		"boot_params",
		// Tasks (kvmckpt ps): the list's head, and the per-CPU pointer
		// to the running task (current_task in 6.1, pcpu_hot in 6.2+).
		"init_task", "current_task", "pcpu_hot",
		// Present when the kernel enters with FRED, which pads the top
		// of every kernel stack by 16 bytes (above a thread's pt_regs).
		"asm_fred_entrypoint_user",
	}
)

// Constants every profile has; see [Profile.Constants].
var requiredConstants = []string{
	"MAX_ORDER", "MIGRATE_TYPES", "MIGRATE_PCPTYPES", "NR_PCP_LISTS", "NR_FREE_PAGES",
	"MAX_NR_ZONES", "N_ONLINE", "MAX_NUMNODES", "PAGE_BUDDY_MAPCOUNT_VALUE",
	"PAGE_ALLOC_COSTLY_ORDER", "PAGEBLOCK_ORDER", "NR_LOWORDER_PCP_LISTS", "NR_PCP_THP",
	"PAGE_SIZE",
}

// enumConstant names a constant read from an enum value.
type enumConstant struct {
	constant, enum, value string
	required              bool
}

var enumConstants = []enumConstant{
	{"MIGRATE_PCPTYPES", "migratetype", "MIGRATE_PCPTYPES", true},
	{"NR_FREE_PAGES", "zone_stat_item", "NR_FREE_PAGES", true},
	{"MAX_NR_ZONES", "zone_type", "__MAX_NR_ZONES", true},
	{"N_POSSIBLE", "node_states", "N_POSSIBLE", false},
	{"N_ONLINE", "node_states", "N_ONLINE", true},
	{"N_MEMORY", "node_states", "N_MEMORY", false},
	{"NR_NODE_STATES", "node_states", "NR_NODE_STATES", false},
	{"MIGRATE_MOVABLE", "migratetype", "MIGRATE_MOVABLE", false},
	// The node counters a squeeze sizes the balloon by (pglist_data's
	// vm_stat, what /proc/meminfo sums).
	{"NR_FILE_PAGES", "node_stat_item", "NR_FILE_PAGES", false},
	{"NR_SHMEM", "node_stat_item", "NR_SHMEM", false},
	{"NR_FILE_DIRTY", "node_stat_item", "NR_FILE_DIRTY", false},
	{"NR_WRITEBACK", "node_stat_item", "NR_WRITEBACK", false},
	{"NR_ANON_MAPPED", "node_stat_item", "NR_ANON_MAPPED", false},
	{"NR_VM_NODE_STAT_ITEMS", "node_stat_item", "NR_VM_NODE_STAT_ITEMS", false},
}

// Defaults used when a value cannot be read from the kernel. Each use is
// recorded in [Profile.Defaults].
const (
	// PAGE_BUDDY_MAPCOUNT_VALUE in 6.1 is ~PG_buddy = ~0x00000080 as a
	// 32-bit int (include/linux/page-flags.h); vmcoreinfo states it.
	defaultBuddyMapcount = -129
	// PAGE_OFFLINE_MAPCOUNT_VALUE in 6.1 is ~PG_offline = ~0x00000100.
	defaultOfflineMapcount = -257
	// PAGE_ALLOC_COSTLY_ORDER has been 3 since 2.6.23 and is a macro, so
	// it is in neither BTF nor vmcoreinfo.
	defaultCostlyOrder = 3
	// pageblock_order on x86_64 is HUGETLB_PAGE_ORDER = HPAGE_PMD_ORDER =
	// PMD_SHIFT - PAGE_SHIFT = 21 - 12 (with CONFIG_HUGETLB_PAGE, as
	// Debian builds; without it, MAX_ORDER-1 = 10 in 6.1).
	defaultPageblockOrder = 9
	// x86_64: __START_KERNEL_map + CONFIG_PHYSICAL_START (16 MiB by
	// default), used only when nothing says where _text was linked.
	defaultUnrelocatedText = 0xffffffff81000000
	pageSizeX86            = 4096
)

// checkRequiredFields reports the first required struct or field missing
// from structs.
func checkRequiredFields(structs map[string]Struct) error {
	for _, w := range wantStructs {
		s, ok := structs[w.name]
		if !ok {
			if w.optional {
				continue
			}
			return &MissingError{Kind: "struct", Name: w.name}
		}
		for _, f := range w.required {
			if _, ok := s.Fields[f]; !ok {
				return &MissingError{Kind: "field", Name: w.name + "." + f}
			}
		}
	}
	return nil
}

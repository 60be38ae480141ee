package writer

import (
	"runtime"
	"sync"
)

// The pipelines of this package run one CPU-bound worker per CPU beside
// goroutines that block: the I/O goroutine in its direct writes, a
// store's requests on their sockets. Go's scheduler gives a goroutine
// coming back from a system call (or woken by the network poller) a P to
// run on; when every P is held by a busy worker it waits on a run queue
// until a worker is preempted, up to 10 ms later, and the disk sits idle
// meanwhile. BenchmarkDiskBesideWorkers measures it; on this project's
// 2-core host (BENCHMARKS.md, "The disk beside the workers") 4 MiB
// O_DIRECT writes, one at a time, beside two goroutines compressing went
// at 850-1028 MB/s with GOMAXPROCS=2 against 1466-1805 MB/s with one P
// more, and 1527-1747 MB/s alone. So while a pipeline runs, the process has
// one P more than its workers: the blocked goroutine then finds an idle
// P and runs at once, and the kernel, which runs a thread woken by I/O
// promptly, shares the CPUs among the threads.

// procs counts the pipelines running and remembers GOMAXPROCS as it was
// before the first of them raised it.
var procs struct {
	mu      sync.Mutex
	running int
	base    int
}

// cpus is the default number of workers: GOMAXPROCS as it is outside the
// pipelines (usually the CPUs the process may use).
func cpus() int {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	if procs.running > 0 {
		return procs.base
	}
	return runtime.GOMAXPROCS(0)
}

// spareP raises GOMAXPROCS by one for a pipeline until the function it
// returns is called. Pipelines running at once share the one spare P.
// GOMAXPROCS goes back to what it was when the last ends, unless
// something else changed it meanwhile.
func spareP() (release func()) {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	if procs.running == 0 {
		procs.base = runtime.GOMAXPROCS(0)
		runtime.GOMAXPROCS(procs.base + 1)
	}
	procs.running++
	return sync.OnceFunc(func() {
		procs.mu.Lock()
		defer procs.mu.Unlock()
		procs.running--
		if procs.running == 0 && runtime.GOMAXPROCS(0) == procs.base+1 {
			runtime.GOMAXPROCS(procs.base)
		}
	})
}

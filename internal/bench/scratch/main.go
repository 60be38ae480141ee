package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

func main() {
	mem, _ := strconv.Atoi(os.Args[1])
	churn, _ := strconv.Atoi(os.Args[2])
	keep, _ := strconv.Atoi(os.Args[3])
	ctx := context.Background()
	t0 := time.Now()
	g, err := vmtest.Start(ctx, vmtest.Config{MemMiB: mem, Workload: vmtest.Workload{Churn: churn, Anon: keep / 2, Tmpfs: keep / 2, Text: keep, Interval: 5}})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer g.Close()
	fmt.Println("accel", g.Accel)
	m, off, err := g.WaitSerial(ctx, regexp.MustCompile(`KW (READY|ERROR.*)`), 0, 5*time.Minute)
	fmt.Println(m, err, time.Since(t0))
	for i := 0; i < 3; i++ {
		var mm string
		mm, off, err = g.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY.*`), off, 2*time.Minute)
		fmt.Println(mm, err, time.Since(t0))
	}
	fmt.Println(g.SerialTail(12))
}

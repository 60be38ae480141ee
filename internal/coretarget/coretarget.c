/*
 * coretarget: a process of the test guest whose core `kvmckpt core` writes
 * and gdb reads back in the tests. Each thread blocks in a known chain of
 * functions; with kw.spin=1 on the kernel command line one more thread
 * spins in user mode, so it is running on a vCPU when the guest pauses.
 * marker holds a string made at run time (with the pid), so it is read
 * from the core's memory, not from this file's data.
 *
 * Built static by the Makefile (gcc -static -pthread -g -O0), started by
 * the guest's init.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

char marker[64];
static int pipefd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
volatile unsigned long spins;

__attribute__((noinline)) static void reader_blocked(void)
{
	char c;
	for (;;)
		if (read(pipefd[0], &c, 1) == 0)
			pause();
}

__attribute__((noinline)) static void *reader_thread(void *arg)
{
	reader_blocked();
	return arg;
}

__attribute__((noinline)) static void sleeper_blocked(void)
{
	for (;;) {
		struct timespec ts = {1000, 0};
		nanosleep(&ts, NULL);
	}
}

__attribute__((noinline)) static void *sleeper_thread(void *arg)
{
	sleeper_blocked();
	return arg;
}

__attribute__((noinline)) static void waiter_blocked(void)
{
	pthread_mutex_lock(&mu);
	for (;;)
		pthread_cond_wait(&cv, &mu);
}

__attribute__((noinline)) static void *waiter_thread(void *arg)
{
	waiter_blocked();
	return arg;
}

__attribute__((noinline)) static void spinner_loop(void)
{
	for (;;)
		spins++;
}

__attribute__((noinline)) static void *spinner_thread(void *arg)
{
	spinner_loop();
	return arg;
}

__attribute__((noinline)) static void main_blocked(void)
{
	for (;;)
		pause();
}

static int spin_wanted(void)
{
	char buf[4096];
	FILE *f = fopen("/proc/cmdline", "r");
	size_t n;
	if (f == NULL)
		return 0;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;
	return strstr(buf, "kw.spin=1") != NULL;
}

static void start(void *(*fn)(void *), const char *name)
{
	pthread_t t;
	if (pthread_create(&t, NULL, fn, NULL) != 0) {
		perror("coretarget: pthread_create");
		return;
	}
	pthread_setname_np(t, name);
}

int main(void)
{
	snprintf(marker, sizeof marker, "kvmckpt-core-marker pid=%d", (int)getpid());
	if (pipe(pipefd) != 0) {
		perror("coretarget: pipe");
		return 1;
	}
	start(reader_thread, "ct-reader");
	start(sleeper_thread, "ct-sleeper");
	start(waiter_thread, "ct-waiter");
	if (spin_wanted())
		start(spinner_thread, "ct-spinner");
	main_blocked();
	return 0;
}

/* driver N PROG ARGS...: fork+execve+wait PROG N times; prints one line per exec: its wall time in ns
 * and the minor page faults of the whole exec chain (the kernel's rusage of the child: interpreter,
 * then what it execs), so a figure that is noise in time can still be read as a count. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
extern char **environ;
static long long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  for (int i = 0; i < n; i++) {
    long long t0 = now();
    pid_t p = fork();
    if (p == 0) { execve(argv[2], argv + 2, environ); _exit(127); }
    int st; struct rusage ru; wait4(p, &st, 0, &ru);
    long long t1 = now();
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { fprintf(stderr, "driver: %s failed (status %d)\n", argv[2], st); return 1; }
    printf("%lld %ld\n", t1 - t0, ru.ru_minflt);
  }
  return 0;
}

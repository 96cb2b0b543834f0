/* What each system call an ELF-reading interpreter cannot do without costs on this machine, one at
 * a time in a loop (warm caches, so a floor): lstat of its own path, the open of nixqimg.conf beside
 * it that fails, the open of the program, a pread of its first 4 KiB, an fstat. Their sum is what
 * inspect.c pays over wrap.c before any code of its own runs. Prints "name ns" lines.
 * Usage: calls SELF PROGRAM */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#define N 20000
#define BATCH 500
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}
int main(int argc, char **argv) {
  if (argc != 3) return 2;
  static char conf[4096], head[4096];
  const char *slash = strrchr(argv[1], '/');
  size_t dir = slash ? (size_t)(slash - argv[1]) : 0;
  if (dir + sizeof "/nixqimg.conf" > sizeof conf) return 2;
  memcpy(conf, argv[1], dir);
  memcpy(conf + dir, "/nixqimg.conf", sizeof "/nixqimg.conf");
  struct stat st;
  double t = now();
  for (int i = 0; i < N; i++) lstat(argv[1], &st);
  printf("lstat %.0f\n", (now() - t) / N);
  t = now();
  for (int i = 0; i < N; i++) open(conf, O_RDONLY | O_CLOEXEC);
  printf("open-absent %.0f\n", (now() - t) / N);
  /* Opens in batches, closed untimed: nixqimg never closes the program (exec does). */
  static int fds[BATCH];
  double spent = 0;
  for (int b = 0; b < N / BATCH; b++) {
    t = now();
    for (int i = 0; i < BATCH; i++) fds[i] = open(argv[2], O_RDONLY | O_CLOEXEC);
    spent += now() - t;
    for (int i = 0; i < BATCH; i++) close(fds[i]);
  }
  printf("open %.0f\n", spent / N);
  int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 1;
  t = now();
  for (int i = 0; i < N; i++) pread(fd, head, sizeof head, 0);
  printf("pread %.0f\n", (now() - t) / N);
  t = now();
  for (int i = 0; i < N; i++) fstat(fd, &st);
  printf("fstat %.0f\n", (now() - t) / N);
  return 0;
}

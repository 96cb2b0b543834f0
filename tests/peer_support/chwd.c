/* chwd FILE: changes into /tmp, prints readlink(/proc/self/exe), and checks that /proc/self/exe
 * opens to the same bytes as FILE (the peer suite's change-workdir test). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char *slurp(const char *path, size_t *len) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return NULL;
  size_t cap = 1 << 20, n = 0;
  char *buf = malloc(cap);
  ssize_t r;
  while (buf && (r = read(fd, buf + n, cap - n)) > 0) {
    n += r;
    if (n == cap) buf = realloc(buf, cap *= 2);
  }
  close(fd);
  *len = n;
  return buf;
}
int main(int argc, char **argv) {
  char link[4096];
  if (argc < 2) return 2;
  if (chdir("/tmp") != 0) { perror("chdir /tmp"); return 1; }
  ssize_t n = readlink("/proc/self/exe", link, sizeof link - 1);
  if (n < 0) { perror("readlink /proc/self/exe"); return 1; }
  link[n] = 0;
  printf("%s\n", link);
  size_t a, b;
  char *self = slurp("/proc/self/exe", &a), *file = slurp(argv[1], &b);
  if (!self) { perror("open /proc/self/exe"); return 1; }
  if (!file) { perror(argv[1]); return 1; }
  if (a != b || memcmp(self, file, a) != 0) { printf("/proc/self/exe does not match %s\n", argv[1]); return 1; }
  return 0;
}

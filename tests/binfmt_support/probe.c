/* The foreign program the binfmt, security and load tests run through the kernel. It prints what it
 * received, one fact per line, in a form the tests compare exactly:
 *   argc=N, argv[i]=..., env=... (only BF_*, QEMU_*, NIXQIMG_*, LD_* entries), uid=R euid=E,
 *   fds=0,1,2 (its open descriptors), exe=/proc/self/exe's target.
 * BF_MODE=fds prints only the fds line (the load test's fast path). */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
extern char **environ;

static void fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (!d) { printf("fds=?\n"); return; }
  int self = dirfd(d), seen[256], n = 0;
  struct dirent *de;
  while ((de = readdir(d)) && n < 256)
    if (de->d_name[0] != '.' && atoi(de->d_name) != self) seen[n++] = atoi(de->d_name);
  closedir(d);
  for (int i = 0; i < n; i++)          /* readdir order is not numeric: sort */
    for (int j = i + 1; j < n; j++)
      if (seen[j] < seen[i]) { int t = seen[i]; seen[i] = seen[j]; seen[j] = t; }
  printf("fds=");
  for (int i = 0; i < n; i++) printf(i ? ",%d" : "%d", seen[i]);
  printf("\n");
}

int main(int argc, char **argv) {
  const char *m = getenv("BF_MODE");
  if (m && !strcmp(m, "fds")) { fds(); return 0; }
  printf("argc=%d\n", argc);
  for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
  for (char **e = environ; *e; e++)
    if (!strncmp(*e, "BF_", 3) || !strncmp(*e, "QEMU_", 5) || !strncmp(*e, "NIXQIMG_", 8) || !strncmp(*e, "LD_", 3))
      printf("env=%s\n", *e);
  printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
  fds();
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) { exe[n] = 0; printf("exe=%s\n", exe); }
  return m && !strcmp(m, "fail") ? 3 : 0;
}

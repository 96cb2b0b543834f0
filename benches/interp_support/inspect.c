/* The floor for an interpreter that reads the program before it execs qemu: the system calls
 * nixqimg cannot do without for a static program, in C, with no allocation and no parsing. lstat of
 * its own path and an open of nixqimg.conf beside it (its settings inside a Nix build, where the
 * environment is empty); open, pread of the first 4 KiB and fstat of the program (class, machine,
 * PT_INTERP); then wrap.c's execve, with no stat of qemu first (nixqimg finds qemu by exec'ing it).
 * nixqimg's cost over this is its own code; this one's cost over wrap.c is what reading the ELF
 * costs in any language. */
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifndef QEMU
#define QEMU "/usr/bin/qemu-aarch64-static"
#endif
static char head[4096], conf[4096];
static char *a[256];
int main(int argc, char **argv) {
  if (argc < 3) return 126;
  struct stat st;
  lstat(argv[0], &st);
  const char *slash = strrchr(argv[0], '/');
  size_t dir = slash ? (size_t)(slash - argv[0]) : 0;
  if (dir + sizeof "/nixqimg.conf" > sizeof conf) return 126;
  memcpy(conf, argv[0], dir);
  memcpy(conf + dir, "/nixqimg.conf", sizeof "/nixqimg.conf");
  int c = open(conf, O_RDONLY | O_CLOEXEC);
  if (c >= 0) close(c);
  int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (fd < 0 || pread(fd, head, sizeof head, 0) < 64 || fstat(fd, &st) != 0) return 126;
  int n = 0;
  a[n++] = QEMU; a[n++] = "-0"; a[n++] = argv[2]; a[n++] = "--"; a[n++] = argv[1];
  for (int i = 3; i < argc && n < 255; i++) a[n++] = argv[i];
  a[n] = 0;
  execv(QEMU, a);
  return 127;
}

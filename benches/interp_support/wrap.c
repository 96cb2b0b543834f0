/* The floor for any binfmt wrapper: the minimal static P-flag wrapper (like nixpkgs' own) that
 * turns [w, path, argv0, args...] into [qemu, -0, argv0, --, path, args...] and re-execs. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifndef QEMU
#define QEMU "/usr/bin/qemu-aarch64-static"
#endif
int main(int argc, char **argv) {
  if (argc < 3) return 126;
  char **a = malloc(sizeof(char *) * (argc + 4));
  int n = 0;
  a[n++] = QEMU; a[n++] = "-0"; a[n++] = argv[2]; a[n++] = "--"; a[n++] = argv[1];
  for (int i = 3; i < argc; i++) a[n++] = argv[i];
  a[n] = 0;
  execv(QEMU, a);
  return 126;
}

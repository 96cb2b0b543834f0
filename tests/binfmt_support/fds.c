/* The load test's program: prints "fds=" and its open descriptors (sorted, comma-separated), with no
 * libc, so that an exec costs qemu's start-up and little else. aarch64 only: raw syscalls. */
typedef unsigned long u64;
static long sys3(long n, long a, long b, long c) {
  register long x8 __asm__("x8") = n, x0 __asm__("x0") = a, x1 __asm__("x1") = b, x2 __asm__("x2") = c;
  __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
  return x0;
}
#define SYS_openat 56
#define SYS_close 57
#define SYS_getdents64 61
#define SYS_write 64
#define SYS_exit_group 94
struct d64 { u64 ino; long off; unsigned short reclen; unsigned char type; char name[]; };

void _start(void) {
  static char buf[4096], out[512];
  int fds[64], n = 0;
  long dir = sys3(SYS_openat, -100, (long)"/proc/self/fd", 0x4000 /* O_DIRECTORY on aarch64 */);
  if (dir < 0) sys3(SYS_exit_group, 2, 0, 0);
  long got;
  while ((got = sys3(SYS_getdents64, dir, (long)buf, sizeof buf)) > 0)
    for (long off = 0; off < got;) {
      struct d64 *d = (struct d64 *)(buf + off);
      if (d->name[0] >= '0' && d->name[0] <= '9' && n < 64) {
        int v = 0;
        for (char *c = d->name; *c; c++) v = v * 10 + (*c - '0');
        if (v != dir) fds[n++] = v;
      }
      off += d->reclen;
    }
  sys3(SYS_close, dir, 0, 0);
  for (int i = 0; i < n; i++)
    for (int j = i + 1; j < n; j++)
      if (fds[j] < fds[i]) { int t = fds[i]; fds[i] = fds[j]; fds[j] = t; }
  int o = 0;
  for (const char *p = "fds="; *p; p++) out[o++] = *p;
  for (int i = 0; i < n; i++) {
    if (i) out[o++] = ',';
    char tmp[12]; int t = 0, v = fds[i];
    do { tmp[t++] = '0' + v % 10; v /= 10; } while (v);
    while (t) out[o++] = tmp[--t];
  }
  out[o++] = '\n';
  sys3(SYS_write, 1, (long)out, o);
  sys3(SYS_exit_group, 0, 0, 0);
}

/* The scheduler calls of the peer suite's sched test, as a foreign program sees them under qemu.
 * `sched CASE` runs one case and prints one line per check, "ok NAME" or "FAIL NAME: why". */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
struct attr { uint32_t size, policy; uint64_t flags; int32_t nice; uint32_t prio; uint64_t rt[3]; uint32_t umin, umax; };
static int fails;
static void check(const char *name, int cond, const char *why) {
  printf(cond ? "ok %s\n" : "FAIL %s: %s\n", name, why);
  fails += !cond;
}
static const char *err(void) { return strerror(errno); }
int main(int argc, char **argv) {
  pid_t pid = getpid();
  struct sched_param p = {0};
  const char *c = argc > 1 ? argv[1] : "";
  if (!strcmp(c, "get-set-scheduler")) {
    check("no such pid", sched_getscheduler(1 << 30) < 0 && errno == ESRCH, "expected ESRCH");
    check("own policy is SCHED_OTHER", sched_getscheduler(pid) == SCHED_OTHER, err());
    p.sched_priority = 100;
    check("RR priority 100 is EINVAL", sched_setscheduler(pid, SCHED_RR, &p) < 0 && errno == EINVAL, err());
    p.sched_priority = 90;
    int r = sched_setscheduler(pid, SCHED_RR, &p);
    check("RR priority 90 is not EINVAL", r == 0 || errno != EINVAL, err());
    p.sched_priority = 0;
    check("set SCHED_IDLE", sched_setscheduler(pid, SCHED_IDLE, &p) == 0, err());
    check("get SCHED_IDLE", sched_getscheduler(pid) == SCHED_IDLE, err());
    check("set SCHED_OTHER", sched_setscheduler(pid, SCHED_OTHER, &p) == 0, err());
  } else if (!strcmp(c, "min-max")) {
    check("RR min 1", sched_get_priority_min(SCHED_RR) == 1, err());
    check("RR max 99", sched_get_priority_max(SCHED_RR) == 99, err());
    check("BATCH max 0", sched_get_priority_max(SCHED_BATCH) == 0, err());
  } else if (!strcmp(c, "yield")) {
    check("sched_yield", sched_yield() == 0, err());
  } else if (!strcmp(c, "get-set-param")) {
    check("getparam", sched_getparam(pid, &p) == 0 && p.sched_priority == 0, err());
    p.sched_priority = 0;
    check("setparam", sched_setparam(pid, &p) == 0, err());
  } else if (!strcmp(c, "attr")) {
    struct attr a = {0};
    long r = syscall(SYS_sched_getattr, pid, &a, sizeof a, 0);
    check("getattr", r == 0, err());
    check("getattr size >= 0x30", a.size >= 0x30, "size too small");
    check("getattr policy SCHED_OTHER", a.policy == SCHED_OTHER, "other policy");
    struct attr s = {.size = 0x30, .policy = SCHED_IDLE};
    check("setattr SCHED_IDLE", syscall(SYS_sched_setattr, pid, &s, 0) == 0, err());
    memset(&a, 0, sizeof a);
    check("getattr SCHED_IDLE", syscall(SYS_sched_getattr, pid, &a, sizeof a, 0) == 0 && a.policy == SCHED_IDLE,
          err());
  } else {
    fprintf(stderr, "sched: unknown case %s\n", c);
    return 2;
  }
  return fails ? 1 : 0;
}

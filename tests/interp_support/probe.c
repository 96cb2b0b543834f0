/* The foreign program the interpreter tests run: it reports, byte for byte, what it received.
 * PROBE_MODE selects what it does (default "report"):
 *   report       argv, environ, /proc/self/environ (qemu's own environment), open fds, /proc/self/exe
 *   cat          copy stdin to stdout
 *   exit:N       exit with status N
 *   kill:SIG     kill itself with signal SIG
 *   spawn        fork, exec itself (PROBE_MODE=report in the child's environment), wait
 */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;

static void hex(const char *tag, const char *s, size_t n) {
  printf("%s=", tag);
  for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
  printf("\n");
}

static void report(int argc, char **argv) {
  printf("argc=%d\n", argc);
  for (int i = 0; i < argc; i++) hex("argv", argv[i], strlen(argv[i]));
  for (char **e = environ; *e; e++) hex("env", *e, strlen(*e));
  int fd = open("/proc/self/environ", O_RDONLY);
  if (fd >= 0) {
    static char buf[1 << 16];
    ssize_t n, off = 0;
    while (off < (ssize_t)sizeof buf && (n = read(fd, buf + off, sizeof buf - off)) > 0) off += n;
    close(fd);
    for (ssize_t i = 0, s = 0; i < off; i++)
      if (buf[i] == 0) { hex("qenv", buf + s, i - s); s = i + 1; }
  }
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    int self = dirfd(d);
    struct dirent *de;
    while ((de = readdir(d)))
      if (de->d_name[0] != '.' && atoi(de->d_name) != self) printf("fd=%s\n", de->d_name);
    closedir(d);
  }
  struct sigaction sa;
  sigaction(SIGPIPE, NULL, &sa);
  printf("sigpipe=%s\n", sa.sa_handler == SIG_IGN ? "ignored" : "default");
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) { exe[n] = 0; printf("exe=%s\n", exe); }
}

int main(int argc, char **argv) {
  const char *mode = getenv("PROBE_MODE");
  if (!mode || !strcmp(mode, "report")) { report(argc, argv); return 0; }
  if (!strcmp(mode, "cat")) {
    char b[4096]; ssize_t n;
    while ((n = read(0, b, sizeof b)) > 0) if (write(1, b, n) != n) return 1;
    return 0;
  }
  if (!strncmp(mode, "exit:", 5)) return atoi(mode + 5);
  if (!strncmp(mode, "kill:", 5)) { fflush(stdout); kill(getpid(), atoi(mode + 5)); pause(); return 99; }
  if (!strcmp(mode, "spawn")) {
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
      setenv("PROBE_MODE", "report", 1);
      char *args[] = {"child0", "c1", NULL};
      execv(argv[0][0] == '/' ? argv[0] : getenv("PROBE_SELF"), args);
      _exit(127);
    }
    int st; waitpid(p, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  fprintf(stderr, "probe: unknown PROBE_MODE %s\n", mode);
  return 2;
}

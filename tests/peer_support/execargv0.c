/* execargv0 PROG ARGV0 ARGS...: runs PROG with exactly [ARGV0, ARGS...] and waits for it. PROG is
 * used as is when absolute, made absolute when it starts with "./", else looked up in PATH. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static int lookup(const char *name, char *out) {
  const char *path = getenv("PATH");
  if (!path) return -1;
  while (*path) {
    size_t n = strcspn(path, ":");
    snprintf(out, PATH_MAX, "%.*s/%s", (int)n, path, name);
    if (access(out, X_OK) == 0) return 0;
    path += n + (path[n] == ':');
  }
  return -1;
}
int main(int argc, char **argv) {
  char prog[PATH_MAX], cwd[PATH_MAX];
  if (argc < 3) { fprintf(stderr, "execargv0: at least 2 arguments required\n"); return 1; }
  if (argv[1][0] == '/') {
    snprintf(prog, sizeof prog, "%s", argv[1]);
  } else if (strncmp(argv[1], "./", 2) == 0) {
    if (!getcwd(cwd, sizeof cwd)) { perror("getcwd"); return 1; }
    snprintf(prog, sizeof prog, "%s/%s", cwd, argv[1] + 2);
  } else if (lookup(argv[1], prog) != 0) {
    fprintf(stderr, "execargv0: %s: not found in PATH\n", argv[1]);
    return 1;
  }
  pid_t pid = fork();
  if (pid == 0) {
    execv(prog, argv + 2);
    fprintf(stderr, "execargv0: %s: %s\n", prog, strerror(errno));
    _exit(127);
  }
  int st;
  if (pid < 0 || waitpid(pid, &st, 0) < 0) { perror("execargv0"); return 1; }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

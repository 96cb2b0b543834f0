/* The peer suite's argv0 test: re-executes itself through /proc/self/exe (or $REEXEC_NAME) with
 * argv [first, second, third] and only REEXEC_CHILD=1 in the environment; the child prints its argv
 * joined by commas. The parent prints what the child printed and the child's status. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (getenv("REEXEC_CHILD")) {
    for (int i = 0; i < argc; i++) printf("%s%s", i ? "," : "", argv[i]);
    putchar('\n');
    return 0;
  }
  const char *self = getenv("REEXEC_NAME") ? getenv("REEXEC_NAME") : "/proc/self/exe";
  char *args[] = {"first", "second", "third", NULL}, *env[] = {"REEXEC_CHILD=1", NULL};
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) { execve(self, args, env); perror("execve"); _exit(127); }
  int st;
  waitpid(pid, &st, 0);
  printf("status=%d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
  return 0;
}

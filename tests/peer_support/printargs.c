/* Prints its whole argv, argv[0] included, joined by single spaces (the peer suite's printargs). */
#include <stdio.h>
int main(int argc, char **argv) {
  for (int i = 0; i < argc; i++) printf("%s%s", i ? " " : "", argv[i]);
  putchar('\n');
  return 0;
}

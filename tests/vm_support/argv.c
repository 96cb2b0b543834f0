/* The x86_64 program the guest_base VM test runs: prints its argv on one line, each argument in
 * brackets, so that a lost argv[0] or a split argument shows in the serial log. */
#include <stdio.h>

int main(int argc, char **argv) {
    printf("argv:");
    for (int i = 0; i < argc; i++)
        printf(" [%s]", argv[i]);
    printf("\n");
    return 0;
}

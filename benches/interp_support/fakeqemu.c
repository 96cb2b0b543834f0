/* A native stand-in for qemu-user that exits at once: what remains of an exec's cost is the
 * kernel's binfmt dispatch and whatever runs before this. */
int main(void) { return 0; }

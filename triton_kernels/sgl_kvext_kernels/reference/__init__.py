"""Pure-torch references: the correctness oracle for the kernels and the CPU path."""

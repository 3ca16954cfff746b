"""NumPy emulator of the NKI API subset the kernel uses (installs itself as `nki` when absent)."""

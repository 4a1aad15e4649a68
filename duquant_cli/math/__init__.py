"""Pure tensor math: transforms, quantizers, bit packing. No I/O, nothing above it imported."""

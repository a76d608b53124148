"""Pure Triton kernels and their launchers (no torch.library code here; see ``swa_rewrite.ops``)."""

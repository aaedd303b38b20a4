"""Does the MLP forward kernel's block choice change what it computes? fused_kernels' H100 forward (persistent,
128x256 tiles) against the tiled 128x128 blocks it replaced, at the training shape; bitwise comparison.
    python bench/experiments/mlp_blocks_equal.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_kernels as fk  # noqa: E402

torch.manual_seed(0)
M, D, H = 196608, 512, 2048
x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
w = torch.randn(H, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
h_new, a_new = fk.mlp_up_act(x, w)
h_old, a_old = torch.empty_like(h_new), torch.empty_like(a_new)
fk.launch_mlp_kernel(x, w.t(), h_old, a_old, False, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4,
                                                          num_stages=3, PERSISTENT=False))
print(f"blocks now {fk.mlp_kernel_blocks(x.device, False)} vs tiled 128x128x64: h equal {torch.equal(h_new, h_old)}, "
      f"a equal {torch.equal(a_new, a_old)}, max |dh| {(h_new.float() - h_old.float()).abs().max().item():.3g}")

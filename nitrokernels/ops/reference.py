"""Plain eager references for every fused op: the definition of what each kernel must compute.

Written as plainly as possible (no fusion, no tricks); tests run them in float64. One section per kernel
family; each op module's eager backend calls these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ===================================================================== group norm family (group_norm.py)

# ===================================================================== discriminator heads (heads.py)

# ===================================================================== attention / GEGLU / LayerNorm (attention.py, geglu.py)

"""SmoothQuant-style smoothing: move part of each activation channel's range into the weight.

x W^T = (x / s)(W s)^T for any positive s per input channel. With s_j = amax_j^a / wmax_j^(1-a)
(amax: calibration max |x| of channel j, wmax: max |W[:, j]|), large activation channels shrink
and their weight columns grow, so both sides are easier to quantize.
"""

from __future__ import annotations

import torch

S_MIN = 1e-2  # never amplify a channel's activations more than 100x
S_MAX = 1e4
_TINY = 1e-12


def smooth_scales(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel s (float64, in [S_MIN, S_MAX]); 1 for channels dead on either side, where
    there is nothing to balance and the ratio would divide by zero."""
    a = amax.double()
    w = wmax.double()
    dead = (a <= _TINY) | (w <= _TINY) | ~torch.isfinite(a) | ~torch.isfinite(w)
    s = a.clamp_min(_TINY).pow(alpha) / w.clamp_min(_TINY).pow(1.0 - alpha)
    s = s.clamp(S_MIN, S_MAX)
    return torch.where(dead, torch.ones_like(s), s)

"""A SegNet-style shared encoder-decoder with one head per NYUv2 task.

The trunk follows SegNet (Badrinarayanan, Kendall, Cipolla, TPAMI 2017) as multi-task NYUv2
code uses it (MTAN's "split" baseline, Liu et al., CVPR 2019): with base width w, five
encoder stages of 3 x 3 conv-BN-ReLU layers at c = (w, 2w, 4w, 8w, 8w) channels (2, 2, 3, 3,
3 layers), each followed by 2 x 2 max pooling that remembers its indices; five decoder
stages mirror them, each unpooling with the stage's indices, then conv-BN-ReLU layers (3, 3,
3, 2, 2 from the deepest) down to w channels at full resolution. That last feature map h
[B, w, H, W] is the shared representation; its last layer's conv weight is the "last shared
layer" where GradNorm measures (``SegNet.last_shared``). Each head is conv 3 x 3 (w -> w),
ReLU, conv 1 x 1 to its outputs: 13 class logits, 1 depth value, 3 normal components
(normalised to unit length). w = 64 is the literature's size: 25,055,185 parameters with
the three heads, 24,981,069 with the segmentation head alone (the single-task count MTAN's
scripts print their sizes against); tests run w = 4.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from .nyuv2_data import NUM_CLASSES

TASKS = ("segmentation", "depth", "normal")
OUTPUTS = {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}


def _stage(c_in: int, c_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for k in range(layers):
        mods += [nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1),
                 nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*mods)


class SegNet(nn.Module):
    """Shared SegNet trunk and one head per task in ``tasks`` (any of :data:`TASKS`)."""

    def __init__(self, width: int = 64, tasks: Sequence[str] = TASKS) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width}")
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks}")
        self.tasks = tasks
        c = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        depth = [2, 2, 3, 3, 3]
        self.encoder = nn.ModuleList(
            _stage(3 if k == 0 else c[k - 1], c[k], depth[k]) for k in range(5))
        # decoder[k] undoes encoder[k]: c[k] -> c[k-1] (w for k = 0), the same number of layers
        self.decoder = nn.ModuleList(
            _stage(c[k], c[k - 1] if k else c[0], depth[k]) for k in range(5))
        self.heads = nn.ModuleDict({
            t: nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, OUTPUTS[t], 1))
            for t in tasks
        })
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def last_shared(self) -> nn.Parameter:
        """The weight of the last shared conv (decoder stage 0's last conv), W for GradNorm."""
        return self.decoder[0][-3].weight

    def trunk(self, x: Tensor) -> Tensor:
        """The shared representation h [B, w, H, W] of images x [B, 3, H, W]."""
        indices = []
        for stage in self.encoder:
            x, idx = F.max_pool2d(stage(x), 2, 2, return_indices=True)
            indices.append(idx)
        for k in reversed(range(5)):
            x = self.decoder[k](F.max_unpool2d(x, indices[k], 2, 2))
        return x

    def head(self, task: str, h: Tensor) -> Tensor:
        """Task output from h: logits [B, 13, H, W], depth [B, 1, H, W] or unit normals
        [B, 3, H, W] (normalised in float32)."""
        out = self.heads[task](h)
        if task == "normal":
            out = F.normalize(out.float(), dim=1)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {t: self.head(t, h) for t in self.tasks}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


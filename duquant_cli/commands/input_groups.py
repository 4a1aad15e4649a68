"""Input groups of a calibrated pack: layers fed the same input are built together.

Statistics store one row sample for layers that saw the very same input tensor (q/k/v, gate/up;
see `collect_stats`). Those layers get one transform and one error-compensated rounding pass,
built when the pack loop reaches the first of them and handed out layer by layer after.
"""

from __future__ import annotations

import torch

from duquant_cli.config import QuantConfig
from duquant_cli.formats.checkpoint import Checkpoint
from duquant_cli.formats.selection import PlannedLayer
from duquant_cli.formats.stats import Stats
from duquant_cli.math.calibrated import build_calibrated_layers
from duquant_cli.math.layer_pack import LayerPack


class InputGroups:
    """Builds the calibrated layers of `layers` a whole input group at a time."""

    def __init__(
        self, ckpt: Checkpoint, layers: list[PlannedLayer], stats: Stats, cfg: QuantConfig
    ) -> None:
        self.ckpt, self.stats, self.cfg = ckpt, stats, cfg
        by_rows: dict[int, list[PlannedLayer]] = {}
        for pl in layers:
            by_rows.setdefault(id(stats[pl.name].rows), []).append(pl)
        self.members = {group[0].name: group for group in by_rows.values()}
        self._leader = {pl.name: group[0].name for group in by_rows.values() for pl in group}
        self._ready: dict[str, LayerPack] = {}

    def leader(self, name: str) -> str:
        """The group's first layer: it names the group in the manifest."""
        return self._leader[name]

    def layer(self, pl: PlannedLayer) -> LayerPack:
        """The layer's pack, building its whole group on first use."""
        if pl.name not in self._ready:
            self._build(self._leader[pl.name])
        return self._ready.pop(pl.name)

    def _build(self, leader: str) -> None:
        weights, biases, members = [], [], []
        for pl in self.members[leader]:
            w = self.ckpt.tensor(pl.weight_key)
            b = self.ckpt.tensor(pl.bias_key) if pl.bias_key else None
            if not bool(torch.isfinite(w).all()):  # the pack loop reports (or skips) it
                continue
            weights.append(w)
            biases.append(b)
            members.append(pl)
        st = self.stats[leader]
        with torch.inference_mode():  # a third less dispatch overhead in the step loops
            packs = build_calibrated_layers(
                [pl.name for pl in members],
                weights,
                biases,
                self.cfg,
                [pl.precision for pl in members],
                st.amax,
                st.rows,
            )
        self._ready.update(zip([pl.name for pl in members], packs, strict=True))

"""The resampler's view of a latent-sharded SAE (:mod:`sae_lightning.callbacks.resampling_view`).

Every read is a collective over the tensor-parallel group and returns what one process holding
the whole SAE returns: the dead mask and the encoder row norms are gathered from the shards (a
few bytes per latent), candidates are reconstructed by the sharded forward, and each row's
smallest active code is the minimum over the shards. No rank holds the whole dictionary. The
write keeps to the shards: each rank rewrites the chosen latents it owns and resets their Adam
moments (``live_mean`` averages the kept rows over all shards, one all-reduce per state).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_lightning.components.sparsity.jumprelu import JumpReLU
from sae_lightning.parallel.comm import all_gather, all_reduce
from sae_lightning.parallel.mesh import ShardLayout
from sae_lightning.parallel.sharded import local, shard_codes, shard_pre_acts, sharded_run

if TYPE_CHECKING:
    from sae_lightning.callbacks.resampling_view import NewLatents, StateReset
    from sae_lightning.parallel.module import ShardedSAEModule

_CHUNK = 4096  # rows per sharded forward, as the one-process scoring chunks them
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # Adam / AMSGrad


class ShardedView:
    """A :class:`~sae_lightning.callbacks.resampling_view.ResamplingView` of one sharded SAE.

    Every rank calls every method, in the same order, on the same inputs.
    """

    collective = True

    def __init__(self, module: ShardedSAEModule, layout: ShardLayout) -> None:
        self.module = module
        self.layout = layout
        self.sae = module.sae

    @property
    def d_in(self) -> int:
        return self.sae.d_in

    def dead_mask(self, window_tokens: int | None) -> Tensor:
        return self.module.dead_mask(window_tokens)

    def row_norms(self) -> Tensor:
        norms = local(self.sae.encoder.W_enc).detach().norm(dim=1).float()
        return torch.cat(all_gather(norms, self.layout.tp_group, "tp"))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        step = self.module.global_step
        return torch.cat(
            [
                sharded_run(self.sae, chunk, self.layout, step=step, training=False).x_hat
                for chunk in x.split(_CHUNK)
            ]
        )

    @torch.no_grad()
    def smallest_active(self, x: Tensor) -> Tensor:
        out = []
        for chunk in x.split(_CHUNK):
            pre = shard_pre_acts(self.sae, chunk, self.layout)
            codes = shard_codes(self.sae, pre, self.layout, step=0, training=False)
            values = codes.values.float()
            mine = values.masked_fill(values == 0, math.inf).min(dim=1).values  # (chunk,)
            smallest = torch.stack(all_gather(mine, self.layout.tp_group, "tp")).min(dim=0).values
            out.append(torch.where(torch.isfinite(smallest), smallest, 0.0))
        return torch.cat(out)

    def encoder_input(self, x: Tensor) -> Tensor:
        b_dec = local(self.sae.decoder.b_dec).detach()
        return x - b_dec if self.sae.encoder.center_input else x

    @torch.no_grad()
    def resample(self, new: NewLatents, reset: StateReset) -> None:
        """Rewrite the latents of ``new`` (global ids) that this shard owns, and reset their
        optimizer state on this shard."""
        ids, directions, norm = new
        layout, sae = self.layout, self.sae
        mine = (ids >= layout.offset) & (ids < layout.offset + layout.shard_size)
        rows = ids[mine] - layout.offset  # (m,) local ids
        dirs = directions[mine]
        scale = norm[mine] if norm.ndim > 0 else norm
        w_enc = local(sae.encoder.W_enc)
        w_enc[rows] = dirs.to(w_enc.dtype) * scale
        local(sae.encoder.b_enc)[rows] = 0.0
        w_dec = local(sae.decoder.W_dec)
        w_dec[rows] = dirs.to(w_dec.dtype)
        params = [sae.encoder.W_enc, sae.encoder.b_enc, sae.decoder.W_dec]
        if isinstance(sae.sparsity, JumpReLU):  # resampled latents restart from init_threshold
            local(sae.sparsity.log_threshold)[rows] = math.log(sae.sparsity.config.init_threshold)
            params.append(sae.sparsity.log_threshold)
        self.module.restart_dead_windows(rows)
        for param in params:
            for optimizer in reset.optimizers:
                self._reset_state(optimizer.state.get(param), param, rows, reset.second_moment)

    def _reset_state(
        self, state: dict[str, Any] | None, param: Tensor, rows: Tensor, second_moment: str
    ) -> None:
        """Zero (or, for ``live_mean``, set to the kept rows' mean over all shards) the
        per-row optimizer ``state`` of ``param``'s ``rows`` of this shard."""
        if not state:
            return
        for key, value in state.items():
            if key == "step" or not isinstance(value, Tensor) or value.shape != param.shape:
                continue
            shard = local(value)
            if second_moment == "live_mean" and key in _SECOND_MOMENTS:
                keep = torch.ones(shard.shape[0], dtype=torch.bool, device=shard.device)
                keep[rows] = False
                kept = shard[keep].double()
                packed = torch.cat([kept.sum(dim=0).reshape(-1), kept.new_tensor([kept.shape[0]])])
                all_reduce(packed, self.layout.tp_group, "tp")
                if packed[-1] > 0:
                    mean = (packed[:-1] / packed[-1]).to(shard.dtype).view(shard.shape[1:])
                    shard[rows] = mean.expand_as(shard[rows])
                    continue
            shard.index_fill_(0, rows, 0)

"""The three plugin protocols an SAE is composed of; the values that flow between them are in
:mod:`sae_lightning.components.values` and re-exported here.

Data flows one way: ``x -> Encoder -> pre-activations -> SparsityFn -> Codes -> Decoder -> x_hat``.
The core only calls the methods and reads the attributes declared here, each with a default
where it is optional (the fused path, resampling, the peer-format mapping); it never checks a
plugin's concrete class or probes for undeclared attributes. ``docs/writing-a-plugin.md``
("The plugin contract") lists the whole contract with shapes. The data-parallel helpers at the
end let a plugin compute batch statistics over the global batch when it trains under DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_lightning.components.values import (
    AuxSource as AuxSource,
)
from sae_lightning.components.values import (
    Codes as Codes,
)
from sae_lightning.components.values import (
    DeadLatents as DeadLatents,
)
from sae_lightning.components.values import (
    PeerActivation as PeerActivation,
)
from sae_lightning.components.values import (
    SparsityOutput as SparsityOutput,
)
from sae_lightning.components.values import (
    Touched as Touched,
)
from sae_lightning.config import PluginConfig
from sae_lightning.functional import as_points
from sae_lightning.kernels.decode import sparse_decode
from sae_lightning.kernels.encode import EncoderInputs
from sae_lightning.solo import trains_alone

ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(Generic[ConfigT]):
    """Mixin of every plugin: a pydantic ``Config`` and a one-line docstring description.

    A plugin names its config once, as the type argument (``class Mine(Decoder[MineConfig])``):
    that types ``self.config`` and sets ``Config``, the model the registry validates parameters
    with. ``Config = MineConfig`` in the class body still works, and wins.
    """

    Config: ClassVar[type[PluginConfig]] = PluginConfig
    config: ConfigT
    state_version: ClassVar[int] = 1
    """Bump when the meaning or layout of the plugin's state changes; an older checkpoint then
    loads only through :attr:`migrate_state` (see :mod:`sae_lightning.versioning`)."""
    migrate_state: ClassVar[Callable[[dict[str, Tensor], int], dict[str, Tensor]] | None] = None
    """Optional classmethod ``migrate_state(state, from_version) -> state``: the plugin's state
    dict (keys relative to the plugin) written at ``from_version``, rewritten for
    :attr:`state_version`. None (the default): older checkpoints are refused."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, PluginConfig):
                    cls.Config = arg
                    return


class Encoder(Plugin[ConfigT], nn.Module):
    """Maps inputs ``(batch, d_in)`` to pre-activations ``(batch, d_sae)``.

    Attributes:
        center_input: when True the module subtracts the decoder bias before encoding.
        functional: when True the encoder takes function batches ``(batch, d_in, *grid)``
            (``d_in`` channels) and returns ``(batch, d_sae)`` or concept maps
            ``(batch, d_sae, *grid)`` (see :mod:`sae_lightning.functional`).
    """

    center_input: bool = False
    functional: bool = False
    trains_through_affine: ClassVar[bool] = True
    """True when :meth:`affine` returns the trained parameters themselves, so the SAE may train
    through them on a sparsity plugin's fused path; False when it builds them (e.g. a dense
    matrix out of a sparse parameterisation), which only export and evaluation then read."""

    def __init__(self, config: ConfigT, *, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - protocol
        raise NotImplementedError

    def affine(self) -> tuple[Tensor, Tensor] | None:
        """``(W_enc (d_sae, d_in), b_enc (d_sae,))`` when ``forward(x) == x @ W_enc.T + b_enc``
        (before any centring by ``b_dec``), else None (the default).

        The ``linear`` decoder starts from ``W_enc``'s transpose and the ``tied`` one shares it;
        a sparsity plugin's fused path encodes with it (see :attr:`trains_through_affine`);
        export writes it.
        """
        return None

    def fused_sparsify(
        self, x: Tensor, sparsity: SparsityFn, *, step: int, decoder: Decoder
    ) -> SparsityOutput | None:
        """Optional: the codes of ``x`` by ``sparsity`` in one pass of the encoder's own.

        An encoder that can encode and select together without materialising the
        ``(batch, d_sae)`` pre-activations (the expander plugin) returns the sparsity plugin's
        output here, computed by the plugin's rule; the SAE then skips ``forward`` and
        ``sparsity.forward``, and hands the output's ``aux_source`` to
        ``sparsity.auxiliary_losses``. It is tried before the sparsity's ``fused_encode``.

        Args:
            x: ``(batch, d_in)`` inputs, not centred (centre with ``decoder.b_dec`` when
                :attr:`center_input`); never empty.
            sparsity, step, decoder: as the SAE would pass them to ``sparsity.forward``.

        Returns:
            None (the default): not available for this encoder or sparsity function.
        """
        return None

    def row_norms(self) -> Tensor | None:
        """``(d_sae,)`` the scale of each latent's encoder row; None when there is none.

        The resampler gives new rows a norm relative to the mean norm of the live ones.
        Default: the norms of :meth:`affine`'s rows.
        """
        affine = self.affine()
        return None if affine is None else affine[0].detach().norm(dim=1)

    @torch.no_grad()
    def resample_rows(self, ids: Tensor, directions: Tensor, norm: Tensor) -> list[Touched]:
        """Optional: point the encoder rows ``ids`` along ``directions`` with L2 norm ``norm``.

        Part of the resampling interface (Anthropic, "Towards Monosemanticity"): the encoder
        row of each dead latent becomes its new direction scaled to ``norm`` and its bias 0.

        Args:
            ids: ``(n,)`` latent ids to rewrite.
            directions: ``(n, d_in)`` unit-norm directions, one per id.
            norm: the L2 norm to give each new row: a scalar tensor, or ``(n, 1)`` with one
                norm per row (the ``topk`` resampling procedure sets each row's own).

        Returns:
            Every parameter slice that was rewritten, so its optimizer state can be reset.

        Raises:
            NotImplementedError: the encoder does not support resampling (the default; the
                resampler checks at setup, see :func:`supports_resampling`).
        """
        raise NotImplementedError(f"encoder {type(self).__name__} does not implement resample_rows")


class Decoder(Plugin[ConfigT], nn.Module):
    """Maps codes to reconstructions ``(batch, d_in)`` through a dictionary of ``d_sae`` atoms.

    Attributes:
        b_dec: ``(d_in,)`` output bias, also used to centre inputs for encoders that ask.
        takes_flat_codes: the decoder reads flat codes (:attr:`Codes.is_flat`), as
            :meth:`decode_without_bias` does. A decoder that overrides it without handling them
            leaves this False: the SAE then hands it the codes padded per row
            (:meth:`Codes.padded`, which reads their width on the host).
    """

    b_dec: nn.Parameter
    takes_flat_codes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "takes_flat_codes" not in cls.__dict__:  # the inherited decode reads them
            cls.takes_flat_codes = cls.decode_without_bias is Decoder.decode_without_bias

    def __init__(self, config: ConfigT, *, d_in: int, d_sae: int, encoder: Encoder) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, codes: Codes) -> Tensor:
        """Reconstruct: ``codes @ atoms() + b_dec``."""
        return self.decode_without_bias(codes) + self.b_dec

    def decode_without_bias(self, codes: Codes) -> Tensor:
        """``codes @ atoms()``, gathering only active rows when the codes are sparse."""
        atoms = self.atoms()
        if codes.indices is None:
            return codes.values @ atoms
        # ids and weights -> (batch, d_in), a gather-and-sum over each row's atom rows.
        return sparse_decode(codes.indices, codes.values.to(atoms.dtype), atoms, codes.offsets)

    def atoms(self) -> Tensor:  # pragma: no cover - protocol
        """The ``(d_sae, d_in)`` dictionary, one atom (feature direction) per row."""
        raise NotImplementedError

    def atom_norms(self) -> Tensor:
        """``(d_sae,)`` L2 norm of each atom."""
        return self.atoms().norm(dim=1)

    @torch.no_grad()
    def resample_atoms(self, ids: Tensor, directions: Tensor) -> list[Touched]:
        """Optional: set the atoms ``ids`` to the unit-norm ``directions`` (resampling interface).

        Called after :meth:`Encoder.resample_rows` for the same ids.

        Args:
            ids: ``(n,)`` latent ids to rewrite.
            directions: ``(n, d_in)`` unit-norm directions, one per id.

        Returns:
            Every parameter slice that was rewritten (empty when the atoms live elsewhere, as
            for tied weights).

        Raises:
            NotImplementedError: the decoder does not support resampling (the default).
        """
        raise NotImplementedError(
            f"decoder {type(self).__name__} does not implement resample_atoms"
        )

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Adjust gradients before the optimizer step (e.g. project out radial components)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Restore constraints after the optimizer step (e.g. unit-norm atoms)."""


class SparsityFn(Plugin[ConfigT], nn.Module):
    """Turns pre-activations into sparse codes plus penalty terms.

    Attributes:
        functional: when True the plugin receives concept maps ``(batch, d_sae, *grid)`` as they
            are (it sparsifies over functions, e.g. joint concept/domain sparsity). When False
            (the default) the SAE applies it point-wise to concept maps: each grid point is a
            row, so a mean over rows is the quadrature mean over the domain.
    """

    functional: bool = False

    def __init__(self, config: ConfigT, *, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        raise NotImplementedError  # pragma: no cover - protocol

    def fused_encode(
        self,
        inputs: EncoderInputs,
        *,
        step: int,
        decoder: Decoder,
        dead: DeadLatents | None = None,
    ) -> SparsityOutput | None:
        """Optional fused path: encode and sparsify without the ``(batch, d_sae)`` product.

        The SAE calls it instead of ``encoder`` + :meth:`forward` when the encoder is affine
        and trains through :meth:`Encoder.affine` (``inputs`` holds ``x``, the centring shift,
        ``W_enc`` and ``b_enc``). The codes must equal :meth:`forward`'s on
        ``(x - shift) @ W_enc.T + b_enc``; ``aux_source`` is typically ``inputs``, or what
        :meth:`auxiliary_losses` needs, selected in the same pass when ``dead`` is given.

        Args:
            dead: the step's dead latents when the caller knows them before the forward pass
                (training), else None.

        Returns:
            The output, or None (the default) to decline: the dense path then runs.
        """
        return None

    @property
    def auxiliary_loss_switch(self) -> str | None:
        """The config field that turns :meth:`auxiliary_losses` on, when it is on (e.g.
        ``aux_coefficient``); None when the plugin computes no auxiliary term (the default).
        The SAE refuses a point-wise plugin with one on concept maps, naming this field."""
        return None

    def auxiliary_losses(
        self, source: AuxSource | None, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        """Extra loss terms that need the reconstruction (e.g. AuxK for dead latents).

        Args:
            source: the ``aux_source`` of this step's :class:`SparsityOutput`, or the
                ``(batch, d_sae)`` pre-activations when the plugin set none.
            x: ``(batch, d_in)`` the input batch.
            residual: ``(batch, d_in)`` ``x - x_hat`` with ``x_hat`` detached.
            decoder: the decoder, to decode auxiliary codes.
            dead: ``(d_sae,)`` bool mask of latents that have not fired recently.
        """
        return {}

    @torch.no_grad()
    def resample_latents(self, ids: Tensor) -> list[Touched]:
        """Reset per-latent state of resampled latents (e.g. thresholds); default: none.

        Returns:
            Every parameter slice that was rewritten, so its optimizer state can be reset.
        """
        return []

    def peer_activation(self) -> PeerActivation | None:
        """How SAELens and sparsify express this plugin at inference, or None (the default):
        no equivalent, so export to those formats is refused.

        Raises:
            ValueError: with the reason, when the mapping needs state the plugin lacks yet
                (e.g. a threshold measured in training); export reports it.
        """
        return None


def supports_resampling(encoder: Encoder, decoder: Decoder) -> list[str]:
    """The resampling methods ``encoder`` and ``decoder`` lack (empty: resampling works)."""
    missing = []
    if type(encoder).resample_rows is Encoder.resample_rows:
        missing.append(f"encoder {type(encoder).__name__}.resample_rows")
    elif encoder.row_norms() is None:
        missing.append(f"encoder {type(encoder).__name__}.row_norms")
    if type(decoder).resample_atoms is Decoder.resample_atoms:
        missing.append(f"decoder {type(decoder).__name__}.resample_atoms")
    return missing


# ---- data parallelism ----------------------------------------------------------------------


def data_parallel_world_size() -> int:
    """Number of processes training together (1 without an initialised process group, or
    inside :func:`~sae_lightning.solo.training_alone`)."""
    if not trains_alone() and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def total_variance_share(x: Tensor) -> Tensor:
    """This rank's share of the global batch's total variance ``sum ||x - mean(x)||^2``.

    DDP averages gradients over ranks, so a per-rank loss ``err_r / total_variance_share(x_r)``
    with ``err_r`` a sum over the local rows equals, on average over ranks, the global
    ``sum err / total variance``: what one process sees on the whole batch. With one process
    this is the plain total variance of ``x``. Under DDP it is a collective (two all-reduces
    of ``d_in + 1`` floats): every rank must call it.

    Args:
        x: ``(batch, d_in)`` this rank's rows, or a function batch (each grid point a row);
            treated as data (no gradient flows).
    """
    x = as_points(x.detach())
    world = data_parallel_world_size()
    if world == 1:
        return (x - x.mean(dim=0)).pow(2).sum()
    stats = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
    dist.all_reduce(stats)
    mean = stats[:-1] / stats[-1]
    variance = (x - mean).pow(2).sum()
    dist.all_reduce(variance)
    return variance / world

"""The plugin contract is declared, not probed: the core reads no undeclared plugin attribute.

Every optional part of the contract (the fused path, the auxiliary-loss source, resampling,
state versions, the peer-format mapping, ``functional``) has a declared default on the bases in
``components/base.py``; the modules, the runner and the callbacks reach the data module and the
trained module through declared protocols. So no ``getattr``/``hasattr`` on a plugin, the SAE,
the trained module or the data module may appear outside ``registry.py``, which loads plugin
classes and must look at what it loaded.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from sae_lightning.components.base import Decoder, Encoder, PeerActivation, SparsityFn
from sae_lightning.config import PluginConfig
from sae_lightning.sae import SparseAutoencoder

PACKAGE = Path(__file__).resolve().parents[1] / "sae_lightning"

PLUGIN_OBJECT = re.compile(
    r"\b(encoder|decoder|sparsity|plugin|sae|pl_module|module|datamodule|generative|member)\b"
)
"""Expressions that name a plugin, the SAE, the trained module or the data module."""

ALLOWED: set[tuple[str, str, str]] = set()
"""``(file, object, attribute)`` probes still allowed, each with its reason above (at most 3)."""


def plugin_probes() -> set[tuple[str, str, str]]:
    """``(file, object, attribute)`` of every getattr/hasattr on a plugin-like object."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
            ):
                continue
            target = ast.unparse(node.args[0])
            if PLUGIN_OBJECT.search(target):
                found.add((rel, target, ast.unparse(node.args[1])))
    return found


def test_no_probe_of_plugin_attributes_outside_the_registry() -> None:
    assert len(ALLOWED) <= 3
    probes = plugin_probes()
    assert probes - ALLOWED == set(), "declare the attribute on the base class or a Protocol"


def test_the_scan_finds_a_probe(tmp_path, monkeypatch) -> None:
    """The scan itself: a probe written into a scanned file is reported."""
    (tmp_path / "probe.py").write_text('x = getattr(self.sparsity, "fused_encode", None)\n')
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    assert plugin_probes() == {("probe.py", "self.sparsity", "'fused_encode'")}


class _Identity(Encoder):
    """An encoder that is not affine: declares nothing optional."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Relu(SparsityFn):
    def forward(self, pre_acts, *, step, decoder):
        from sae_lightning.components.base import Codes, SparsityOutput

        return SparsityOutput(Codes(torch.relu(pre_acts), None, self.d_sae), {})


def test_the_optional_parts_have_declared_defaults() -> None:
    config = PluginConfig()
    encoder = _Identity(config, d_in=4, d_sae=4)
    sparsity = _Relu(config, d_in=4, d_sae=4)
    assert encoder.affine() is None and encoder.row_norms() is None
    assert encoder.trains_through_affine and not encoder.functional
    assert sparsity.fused_encode(None, step=0, decoder=None) is None  # type: ignore[arg-type]
    assert sparsity.auxiliary_loss_switch is None and not sparsity.functional
    assert sparsity.auxiliary_losses(None, None, None, None, None) == {}  # type: ignore[arg-type]
    assert sparsity.resample_latents(torch.arange(2)) == []
    assert sparsity.peer_activation() is None
    assert SparsityFn.state_version == 1 and SparsityFn.migrate_state is None
    assert Decoder.resample_atoms is not None


def test_core_plugins_declare_their_peer_mapping() -> None:
    specs = {
        "relu": PeerActivation("relu"),
        "topk": PeerActivation("topk", k=3),
        "jumprelu": "jumprelu",
    }
    for name, want in specs.items():
        spec = {"name": name, "k": 3} if name == "topk" else {"name": name}
        sae = SparseAutoencoder(6, 10, {"name": "linear"}, {"name": "linear"}, spec)
        peer = sae.sparsity.peer_activation()
        if isinstance(want, str):
            assert peer.activation == want and peer.threshold.shape == (10,)
        else:
            assert peer == want


class _GainConfig(PluginConfig):
    gain: float = 1.0


class _WideGainConfig(_GainConfig):
    width: int = 2


class _Gain(SparsityFn[_GainConfig]):
    def forward(self, pre_acts, *, step, decoder):
        from sae_lightning.components.base import Codes, SparsityOutput

        return SparsityOutput(Codes(pre_acts * self.config.gain, None, self.d_sae), {})


def test_config_follows_from_the_type_argument() -> None:
    """``SparsityFn[X]`` sets ``Config = X``; a class-body ``Config`` wins; subclasses inherit."""
    from sae_lightning.components.base import ConfigT

    class Explicit(SparsityFn[_GainConfig]):
        Config = _WideGainConfig

    class Refined(_Gain):
        Config = _WideGainConfig

    class OpenBase(SparsityFn[ConfigT]):
        pass

    class FromOpenBase(OpenBase[_WideGainConfig]):
        pass

    class Inherited(_Gain):
        pass

    assert _Gain.Config is _GainConfig and Inherited.Config is _GainConfig
    assert Explicit.Config is _WideGainConfig and Refined.Config is _WideGainConfig
    assert OpenBase.Config is PluginConfig and FromOpenBase.Config is _WideGainConfig
    assert _Relu.Config is PluginConfig
    plugin = _Gain(_Gain.Config.model_validate({"gain": 2.0}), d_in=3, d_sae=3)
    out = plugin(torch.ones(1, 3), step=0, decoder=None)  # type: ignore[arg-type]
    assert out.codes.values.tolist() == [[2.0, 2.0, 2.0]]


def test_registered_plugins_name_their_own_config() -> None:
    """Every built-in plugin converted to the generic form still validates with its own model."""
    from sae_lightning.components.decoders.linear import LinearDecoder, LinearDecoderConfig
    from sae_lightning.components.decoders.tied import TiedDecoder, TiedDecoderConfig
    from sae_lightning.components.encoders.linear import LinearEncoder, LinearEncoderConfig
    from sae_lightning.components.sparsity.jumprelu import JumpReLU, JumpReLUConfig
    from sae_lightning.components.sparsity.relu import ReLUL1, ReLUL1Config

    pairs = [
        (LinearDecoder, LinearDecoderConfig),
        (TiedDecoder, TiedDecoderConfig),
        (LinearEncoder, LinearEncoderConfig),
        (JumpReLU, JumpReLUConfig),
        (ReLUL1, ReLUL1Config),
    ]
    for cls, config in pairs:
        assert cls.Config is config, cls.__name__

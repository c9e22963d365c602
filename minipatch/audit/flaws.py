"""Patch sets as other implementations might make them: deliberately flawed, or valid but different.

For demonstrating and testing ``verify-patches`` (notebook 10, tests/test_verify_patches.py, the
patch fixtures of tools/make_patch_fixtures.py), like the course kit's mutants. Every function
takes the model, the with-context tokens and the context positions and returns unbound
:class:`~minipatch.patches.Patches` (no origin: as read from another implementation's file).

Flawed (verify-patches must name the layer, the sublayer and the parameter):
  :func:`float32_activations` -- built in float32, then cast to float64 (M1 off by ~1e-7);
  :func:`m6a_without_eps` -- M6a's scale patch from rms_unit without the norm's epsilon;
  :func:`swapped_layers` -- layers 1 and 2 exchanged.
Valid but not minipatch's default (verify-patches must say "different valid construction"):
  :func:`other_method` -- another named construction (M6a, M6c, MoE 'all', a bias shift);
  :func:`mixed_expert_split` -- half the MoE delta through the top expert, half over all.
"""
from __future__ import annotations

import numpy as np

from ..absorb import absorb
from ..backend import to_numpy
from ..patchfile import cast_patches as cast
from ..patches import Patches, Rank1, Scale


def unbound(patches, layers=None):
    """Patches without origin (another implementation's), optionally with other layer patches."""
    return Patches(tuple(patches.layers if layers is None else layers), np.asarray(patches.positions))


def other_method(model, tokens, context, method):
    """A correct patch set by another construction than ``method='auto'``."""
    return unbound(absorb(model, tokens, context, method=method).patches)


def float32_activations(model, tokens, context):
    """The whole construction run in float32, the patches then cast to the model's float64."""
    res = absorb(model.astype("float32"), tokens, context)
    return cast(unbound(res.patches), np.dtype(str(model.dtype)))


def swapped_layers(model, tokens, context, a=1, b=2):
    """Correct patches, but layer ``a``'s and layer ``b``'s exchanged."""
    res = absorb(model, tokens, context)
    layers = list(res.patches.layers)
    layers[a], layers[b] = layers[b], layers[a]
    return unbound(res.patches, layers)


def m6a_without_eps(model, tokens, context):
    """M6a with u^C = m^C / rms(m^C) instead of m^C / sqrt(mean(m^C^2) + eps) (post-norm families)."""
    res = absorb(model, tokens, context, method="m6a")
    tr = {}
    model.run(tokens, trace=tr, head=False)
    layers = []
    for l, lp in enumerate(res.patches.layers):
        d = to_numpy(tr["layers"][l]["d"])[res.kept]
        ms = np.mean(d * d, axis=-1, keepdims=True)
        ratio = np.sqrt(ms / (ms + model.cfg.norm_eps))        # u_eps / u_without_eps
        layers.append(dict(lp, **{"mlp_post_norm.weight": Scale(add=lp["mlp_post_norm.weight"].add * ratio)}))
    return unbound(res.patches, layers)


def mixed_expert_split(model, tokens, context, alpha=0.5):
    """MoE: alpha of the delta through the top expert ('one'), the rest over every active expert
    ('all'): exact, and none of minipatch's constructions."""
    one = absorb(model, tokens, context, method="one").patches
    all_ = absorb(model, tokens, context, method="all").patches
    layers = []
    for lo, la in zip(one.layers, all_.layers):
        po, pa = lo["experts.down_proj.weight"], la["experts.down_proj.weight"]
        layers.append(dict(lo, **{"experts.down_proj.weight": Rank1(alpha * po.u + (1 - alpha) * pa.u, pa.v)}))
    return unbound(one, layers)


FLAWS = {"float32 activations": float32_activations, "M6a without eps": m6a_without_eps,
         "swapped layers": swapped_layers}
"""name -> builder of the flawed patch sets."""

"""Unit m7: the multi-layer algorithm (MATH.md M7), the block theorem and the model from the
reference (:func:`~minipatch.course.checks.harness.absorb_with`), only the loop the student's."""
from __future__ import annotations

import numpy as np

from ...errors import NotControllableError
from .base import TOL32, TOL64_MODEL, check, close, raises, rng, same_dtype, setup_far
from .harness import absorb_with, reference_block_patch

U = "m7"


def deep(n_layers=12, dtype=np.float64, family="gemma3", seed=11):
    """12 layers: sliding window 4 with a global layer every 6th, q/k norms, GQA."""
    from ...models import tiny

    return tiny(family, seed=seed, n_layers=n_layers, dtype=dtype)


def scattered(seed, T, k):
    """T tokens and a non-prefix context of k positions (BOS and the last token kept)."""
    g = rng(seed)
    return g.integers(0, 256, T), np.sort(g.choice(np.arange(1, T - 1), k, replace=False))


def theorem(impl, model, tok, ctx, method, tol, what, every_layer=True):
    r = absorb_with(model, tok, ctx, impl.m7, method=method)
    setup_far(r.unpatched, r.target, "unpatched model")
    same_dtype(r.patched, model.dtype, "patched logits")
    close(r.patched, r.target, tol, what)
    if every_layer:
        streams(r, tol)
    return r


def streams(r, tol):
    """M7 by induction: the patched stream is X_l^C at the kept tokens at EVERY layer."""
    for l, err in enumerate(r.streams):
        if not err <= tol:
            raise AssertionError(f"layer {l}'s output stream: relative error {err:.2e} > {tol:.0e} "
                                 "(the logits alone can hide it: the last layer's patch absorbs any drift)")


@check(U, "exact64", public=[dict(method="m6d")],
       hidden=[dict(method="m6c", seed=3, T=25, k=9), dict(method="m6a", seed=0, T=40, k=22)])
def twelve_layers(impl, method, seed=0, T=40, k=22):
    """Through 12 Gemma layers with a non-prefix context: logits at the kept tokens to 1e-10."""
    tok, ctx = scattered(seed, T, k)
    theorem(impl, deep(), tok, ctx, method, TOL64_MODEL, f"logits through 12 layers ({method})")


@check(U, "exact64", public=[dict(family="llama")], hidden=[dict(family="gpt2"), dict(family="olmo2")])
def other_family(impl, family):
    """Another block family (the block theorem is M8's): logits to 1e-10."""
    tok, ctx = scattered(5, 16, 7)
    theorem(impl, deep(3, family=family), tok, ctx, "auto", TOL64_MODEL, f"{family} logits")


@check(U, "exact64", public=[dict(n_new=3)], hidden=[dict(n_new=5, seed=9)])
def greedy_identical(impl, n_new, seed=5):
    """Greedy generation with the context absorbed (patches rebuilt per token) keeps every token."""
    model = deep(4)
    prompt = rng(seed).integers(0, 256, 10)
    ctx = np.arange(1, 8)
    seq = list(prompt)
    for step in range(n_new):
        want = int(np.argmax(model.forward(np.asarray(seq))[-1]))
        r = absorb_with(model, np.asarray(seq), ctx, impl.m7, method="m6d")
        got = int(np.argmax(r.patched[-1]))
        if got != want:
            raise AssertionError(f"generated token {step}: {got} with the context absorbed, {want} with it")
        seq.append(want)


@check(U, "exact32", public=[dict(seed=1, T=30, k=15)], hidden=[dict(seed=2, T=24, k=12)])
def closed_loop_float32(impl, seed, T, k):
    """float32 with M6a (scale patches ~1e5): closed loop holds 1e-4, building on X_l^C (open loop) does not.

    Only the logits: the intermediate streams drift by rounding times M6a's large patches, and
    each later layer's delta absorbs that drift (MATH.md M7, open vs closed loop).
    """
    tok, ctx = scattered(seed, T, k)
    theorem(impl, deep(dtype=np.float32), tok, ctx, "m6a", TOL32, "float32 logits through 12 layers (m6a)",
            every_layer=False)


@check(U, "control", public=[None], hidden=[dict(T=12, k=3)])
def context_after_every_kept_token(impl, T=10, k=4):
    """Context only after the last kept token (causal: nothing to absorb): the patched model is the plain one."""
    model = deep(4)
    tok = rng(7).integers(0, 256, T)
    ctx = np.arange(T - k, T)
    r = absorb_with(model, tok, ctx, impl.m7, method="m6d")
    close(r.patched, r.target, TOL64_MODEL, "patched logits vs with-context logits")
    close(r.patched, r.unpatched, TOL64_MODEL, "patched logits vs the unpatched model")
    streams(r, TOL64_MODEL)


@check(U, "errors", public=[None])
def missing_witness_propagates(impl):
    """A layer without a witness raises NotControllableError; m7 must let it through, not skip the layer."""
    model = deep(3)
    tok, ctx = scattered(2, 12, 4)
    ref = reference_block_patch(model, "m6d")

    def block_patch(l, noctx, rows):
        if l == 1:
            raise NotControllableError("||h^C||^2", 0.0, layer=1, position=3)
        return ref(l, noctx, rows)

    def run():
        return absorb_with(model, tok, ctx, impl.m7, block_patch)
    raises(NotControllableError, run, what="m7 when layer 1 has no witness")


@check(U, "no_mutation", public=[None])
def no_mutation(impl):
    """m7 leaves the with-context values and the kept positions untouched."""
    model = deep(3)
    tok, ctx = scattered(3, 12, 5)
    tr = {}
    model.run(tok, trace=tr, head=False)
    values = [{k: lt[k] for k in ("x", "a", "z", "h", "out")} for lt in tr["layers"]]
    kept = np.setdiff1d(np.arange(tok.size), ctx)
    copies = [{k: np.array(v) for k, v in d.items()} for d in values]
    kcopy = kept.copy()
    from ...blocks import attention_values, mlp_values

    spec, cfg, layers = model.spec, model.cfg, model.params["layers"]

    def attention(l, x, positions):
        at = attention_values(spec, layers[l], x, cfg, l, np.asarray(positions))
        return at.a, at.z
    impl.m7(values, kept, attention, reference_block_patch(model, "m6d"),
            lambda l, x, a, z, patch: mlp_values(spec, layers[l], x, z, a, cfg, patch).out)
    if not np.array_equal(kept, kcopy):
        raise AssertionError("the input kept was modified in place")
    for l, (d, c) in enumerate(zip(values, copies)):
        if set(d) != set(c) or any(d[k] is not tr["layers"][l][k] or not np.array_equal(d[k], c[k]) for k in c):
            raise AssertionError(f"ctx[{l}] was modified (entries replaced or arrays written)")


"""Unit m8: controllability (MATH.md section 5, M8): the witnesses on every row of the table,
the executable definitions, and the general theorem composing them."""
from __future__ import annotations

import numpy as np

from ...controllability import check_input_controllable as ref_check_input
from ...controllability import check_output_controllable as ref_check_output
from ...controllability import max_abs_diff
from ...errors import MethodError, NotControllableError
from ..adapt import as_patch_dict, as_rank1, injected
from .base import (TOL32, TOL64_BLOCK, TOL64_MODEL, check, close, dense, frozen, raises, rank, rng,
                   same_dtype, setup_far, unchanged)

U = "m8"
D, T = 64, 7


def layer(family, dtype=np.float64):
    from ...models import tiny

    m = tiny(family, seed=11, dtype=dtype)
    return m.params["layers"][1], m.cfg, m.spec


def rand(seed, shape, dtype=np.float64):
    return rng(seed).standard_normal(shape).astype(dtype)


def scale_of(x):
    if isinstance(x, dict):
        return max(float(np.max(np.abs(x["gates"]))), float(np.max(np.abs(x["experts"]))))
    return float(np.max(np.abs(x)))


def parts(family, dtype=np.float64):
    """The reference parts as the plain callables m8 and the checks take."""
    p, cfg, spec = layer(family, dtype)
    inner, outer = spec.inner, spec.outer
    return dict(
        f=lambda z, patch=None: inner.forward(p, z, cfg, patch),
        g=lambda h, patch=None: outer.forward(p, h, cfg, patch),
        iw=lambda z, zt: inner.witness(p, z, zt, cfg),
        ow=lambda h, d: outer.witness(p, h, d, cfg)[1], p=p, cfg=cfg, spec=spec)


INNER = ["gemma3", "llama", "gpt2", "olmo2", "mixtral", "qwen2_moe"]


@check(U, "exact64", public=[dict(family=f) for f in ("llama", "mixtral")],
       hidden=[dict(family=f) for f in INNER if f not in ("llama", "mixtral")])
def inner_witness_rows(impl, family):
    """inner_witness makes every inner part of the table input-controllable: f'(z) = f(z') (float64)."""
    p, cfg, spec = layer(family)
    z, zt = rand(1, (T, D)), 3.0 * rand(2, (T, D))
    with injected(U, impl):
        err, _ = ref_check_input(spec.inner, p, cfg, z, zt)
    target = spec.inner.forward(p, zt, cfg)
    setup_far(np.array([max_abs_diff(spec.inner.forward(p, z, cfg), target)]), np.array([scale_of(target)]),
              "unpatched hidden")
    if not err <= TOL64_BLOCK * scale_of(target):
        raise AssertionError(f"{family}: max |f'(z) - f(z')| = {err:.2e}, relative {err / scale_of(target):.1e}")


@check(U, "exact64", public=[dict(family="mixtral", method="one"), dict(family="qwen2_moe", method="all")],
       hidden=[dict(family="mixtral", method="all"), dict(family="qwen2_moe", method="one")])
def moe_outer_rows(impl, family, method):
    """moe_outer_witness makes the MoE outer part output-controllable: g'(h) = g(h) + delta (float64)."""
    p, cfg, spec = layer(family)
    h = spec.inner.forward(p, rand(5, (T, D)), cfg)
    delta = rand(6, (T, D))
    with injected(U, impl):
        err, _ = ref_check_output(spec.outer, p, cfg, h, delta, method)
    if not err <= TOL64_BLOCK * max(scale_of(delta), scale_of(spec.outer.forward(p, h, cfg))):
        raise AssertionError(f"{family} '{method}': max |g'(h) - (g(h) + delta)| = {err:.2e}")


FAMILIES = ["gemma3", "llama", "gpt2", "olmo2", "mixtral", "qwen2_moe", "vanilla_m4"]


def compose(impl, family, dtype=np.float64, seed=12):
    c = parts(family, dtype)
    z, z_ctx = rand(seed, (T, D), dtype), rand(seed + 1, (T, D), dtype)
    patch = impl.m8(c["iw"], c["ow"], c["f"], z, z_ctx, z_ctx - z)
    if not isinstance(patch, dict):
        raise AssertionError(f"m8 must return a patch dict, got {type(patch).__name__}")
    got = z + c["g"](c["f"](z, patch), patch)
    want = z_ctx + c["g"](c["f"](z_ctx))
    return got, want, z + c["g"](c["f"](z))


@check(U, "exact64", public=[dict(family=f) for f in ("gemma3", "qwen2_moe")],
       hidden=[dict(family=f) for f in FAMILIES if f not in ("gemma3", "qwen2_moe")])
def m8_composes(impl, family):
    """M8: z + g'(f'(z)) = z^C + g(f(z^C)) from the table's witnesses (float64)."""
    got, want, plain = compose(impl, family)
    setup_far(plain, want, "unpatched sublayer")
    close(got, want, TOL64_BLOCK, f"{family}: z + g'(f'(z)) vs z^C + g(f(z^C))")


@check(U, "exact64", public=(), hidden=[None])
def m8_parallel_and_noskip(impl):
    """M8 with z_ctx = None (parallel blocks: outer patch only, at f(z)) and delta = None (M3: inner only)."""
    c = parts("neox")
    x, delta = rand(14, (T, D)), rand(15, (T, D))
    patch = impl.m8(c["iw"], c["ow"], c["f"], x, None, delta)
    close(c["g"](c["f"](x, patch), patch), c["g"](c["f"](x)) + delta, TOL64_BLOCK, "parallel: g'(f(x)) vs g(f(x)) + delta")
    c = parts("vanilla_m3")
    z, zc = rand(16, (T, D)), rand(17, (T, D))
    patch = impl.m8(c["iw"], c["ow"], c["f"], z, zc, None)
    close(c["g"](c["f"](z, patch), patch), c["g"](c["f"](zc)), TOL64_BLOCK, "M3: g(f'(z)) vs g(f(z^C))")


@check(U, "exact64", public=[dict(family="llama")], hidden=[dict(family="qwen2_moe"), dict(family="gemma3")])
def through_a_model(impl, family):
    """Every function of the unit in the spine (absorb, 4 layers): logits to 1e-10."""
    import minipatch as mp
    from ...models import tiny

    model = tiny(family, seed=2)
    tok = rng(3).integers(0, 256, 14)
    with injected(U, impl):
        res = mp.absorb(model, tok, [1, 2, 4, 6, 7, 9])
    want = model.forward(tok)[res.kept]
    close(mp.patched_forward(model, tok, res), want, TOL64_MODEL, f"{family} logits")


@check(U, "exact64", public=[None])
def checkers_measure(impl):
    """check_input/output_controllable report ~0 for the table's witnesses, and return the patch."""
    c = parts("llama")
    z, zt = rand(20, (T, D)), rand(21, (T, D))
    err, patch = impl.check_input_controllable(c["f"], c["iw"], z, zt)
    if not (float(err) <= TOL64_BLOCK * scale_of(c["f"](zt)) and set(patch) == {"gate_proj.weight", "up_proj.weight"}):
        raise AssertionError(f"check_input_controllable: error {float(err):.2e} or patch {sorted(patch)}")
    h, d = c["f"](z), rand(22, (T, D))
    err, patch = impl.check_output_controllable(c["g"], c["ow"], h, d)
    if not (float(err) <= TOL64_BLOCK * scale_of(d) and set(patch) == {"down_proj.weight"}):
        raise AssertionError(f"check_output_controllable: error {float(err):.2e} or patch {sorted(patch)}")


@check(U, "exact32", public=[None])
def m8_float32(impl):
    """M8 in float32 (1e-4), float32 kept."""
    got, want, _ = compose(impl, "llama", np.float32)
    same_dtype(got, np.float32, "patched sublayer output")
    close(got, want, TOL32, "llama: z + g'(f'(z)) vs z^C + g(f(z^C)) (float32)")


@check(U, "control", public=[None])
def checkers_have_teeth(impl):
    """With an empty witness the checks report the full miss: max |f(z) - f(z')|, max |delta|."""
    c = parts("gemma3")
    z, zt = rand(23, (T, D)), rand(24, (T, D))
    err, _ = impl.check_input_controllable(c["f"], lambda a, b: {}, z, zt)
    close(np.array([float(err)]), np.array([max_abs_diff(c["f"](z), c["f"](zt))]), 1e-12, "input check, no witness")
    h, d = c["f"](z), rand(25, (T, D))
    err, _ = impl.check_output_controllable(c["g"], lambda a, b: {}, h, d)
    close(np.array([float(err)]), np.array([scale_of(d)]), 1e-12, "output check, no witness")


@check(U, "control", public=[None])
def m8_null(impl):
    """z^C = z and delta = 0: the M8 patch changes nothing."""
    c = parts("llama")
    z = rand(26, (T, D))
    patch = impl.m8(c["iw"], c["ow"], c["f"], z, z.copy(), np.zeros_like(z))
    close(c["g"](c["f"](z, patch), patch), c["g"](c["f"](z)), TOL64_BLOCK, "g'(f'(z)) with no context")


@check(U, "rank", public=[None])
def inner_shared_v_rank_one(impl):
    """inner_witness: one rank-1 patch per weight and token, every weight with the same v = n / ||n||^2."""
    g = rng(27)
    ws = {"gate": g.standard_normal((9, 6)), "up": g.standard_normal((9, 6))}
    n, nc = g.standard_normal((4, 6)), g.standard_normal((4, 6))
    out = as_patch_dict(impl.inner_witness(ws, n, nc), "inner_witness")
    if set(out) != set(ws):
        raise AssertionError(f"inner_witness patched {sorted(out)}, expected {sorted(ws)}")
    for t in range(4):
        dg, du = dense(out["gate"], t), dense(out["up"], t)
        if rank(dg) != 1 or rank(du) != 1:
            raise AssertionError(f"token {t}: patches of rank {rank(dg)}, {rank(du)}, not 1")
        vg = np.linalg.svd(dg)[2][0]
        vu = np.linalg.svd(du)[2][0]
        close(np.abs(vg @ vu), 1.0, 1e-10, f"token {t}: the two patches read along one direction v")


@check(U, "rank", public=[dict(method="one")], hidden=[dict(method="all")])
def moe_outer_experts_patched(impl, method):
    """'one' patches only each token's highest-gate expert, 'all' every active one; each rank 1."""
    p, cfg, spec = layer("qwen2_moe")
    h = spec.inner.forward(p, rand(9, (T, D)), cfg)
    r = as_rank1(impl.moe_outer_witness(h["gates"], h["experts"], rand(10, (T, D)), method), "moe_outer_witness")
    for t in range(T):
        d = dense(r, t)                                             # [E, D, F]
        on = np.abs(d).reshape(d.shape[0], -1).sum(-1) != 0
        want = (np.arange(d.shape[0]) == np.argmax(h["gates"][t])) if method == "one" else h["gates"][t] != 0
        if not np.array_equal(on, want):
            raise AssertionError(f"token {t}: patched experts {np.flatnonzero(on).tolist()}, "
                                 f"expected {np.flatnonzero(want).tolist()}")
        if any(rank(d[e]) != 1 for e in np.flatnonzero(on)):
            raise AssertionError(f"token {t}: an expert's patch is not rank 1")


@check(U, "min_norm", public=[None])
def inner_minimum_norm(impl):
    """Each inner patch is the minimum-norm one: (W (n^C - n)) n^+."""
    g = rng(28)
    w = g.standard_normal((5, 6))
    n, nc = g.standard_normal((3, 6)), g.standard_normal((3, 6))
    r = as_patch_dict(impl.inner_witness({"w": w}, n, nc), "inner_witness")["w"]
    for t in range(3):
        close(dense(r, t), (w @ (nc[t] - n[t]))[:, None] @ np.linalg.pinv(n[t][:, None]), 1e-10, f"token {t}")


@check(U, "errors", public=[None])
def inner_zero_input(impl):
    """inner_witness where a normalized input row is 0: NotControllableError."""
    g = rng(29)
    n = g.standard_normal((3, 6))
    n[1] = 0.0
    raises(NotControllableError, impl.inner_witness, {"w": g.standard_normal((4, 6))}, n, g.standard_normal((3, 6)),
           what="inner_witness with n[1] = 0")


@check(U, "errors", public=[dict(method="all")], hidden=[dict(method="one")])
def moe_dead_expert(impl, method):
    """An expert the witness needs has a zero hidden: NotControllableError (never NaN)."""
    p, cfg, spec = layer("mixtral")
    h = spec.inner.forward(p, rand(30, (T, D)), cfg)
    ex = h["experts"].copy()
    ex[2, int(np.argmax(h["gates"][2]))] = 0.0
    raises(NotControllableError, impl.moe_outer_witness, h["gates"], ex, rand(31, (T, D)), method,
           what=f"moe_outer_witness '{method}' with a dead expert hidden")


@check(U, "errors", public=[None])
def moe_unknown_method(impl):
    """An unknown method is a MethodError (a named InputError), not a KeyError or a silent default."""
    p, cfg, spec = layer("mixtral")
    h = spec.inner.forward(p, rand(32, (T, D)), cfg)
    raises(MethodError, impl.moe_outer_witness, h["gates"], h["experts"], rand(33, (T, D)), "m2",
           what="moe_outer_witness with method 'm2'")


@check(U, "no_mutation", public=[None])
def no_mutation(impl):
    """inner_witness, moe_outer_witness and m8 leave their inputs untouched."""
    g = rng(34)
    w, n, nc = g.standard_normal((4, 6)), g.standard_normal((3, 6)), g.standard_normal((3, 6))
    cw = frozen(w, n, nc)
    impl.inner_witness({"w": w}, n, nc)
    unchanged((w, n, nc), cw, ("weights['w']", "n", "n_ctx"))
    p, cfg, spec = layer("qwen2_moe")
    h = spec.inner.forward(p, rand(35, (T, D)), cfg)
    d = rand(36, (T, D))
    ch = frozen(h["gates"], h["experts"], d)
    impl.moe_outer_witness(h["gates"], h["experts"], d, "all")
    unchanged((h["gates"], h["experts"], d), ch, ("gates", "experts", "delta"))
    c = parts("llama")
    z, zc = rand(37, (T, D)), rand(38, (T, D))
    delta = zc - z
    cz = frozen(z, zc, delta)
    impl.m8(c["iw"], c["ow"], c["f"], z, zc, delta)
    unchanged((z, zc, delta), cz, ("z", "z_ctx", "delta"))


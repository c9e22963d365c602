"""Build tiny random HF reference fixtures (true float64) for more architecture families.

Run with the reference venv (torch 2.13.0+cpu, transformers 5.23.0, numpy 2.4.6):

    /work/venv-ref/bin/python tools/make_fixtures.py [--out tests/fixtures] [family ...]

For each family it writes tests/fixtures/<name>/{config.json, model.safetensors, reference.npz, meta.json}.
The procedure is the one of tests/fixtures/HF_FIXTURES.md (perturbation rule, input ids, kept-only runs,
true float64, dtype census); true float64 now comes from minipatch.hf_reference (float32 requests raised)
rather than the source patches the committed fixtures record in meta.json ("patches_applied"); see tests/fixtures/MORE_FAMILIES.md for the results.
The build is deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's minipatch
from minipatch.hf_reference import float64_islands, load_hf_model  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

V, D, T = 128, 64, 24
KEPT = np.array([0, *range(16, 24)], dtype=np.int64)
CONTEXT = np.arange(1, 16, dtype=np.int64)
IDS_SEED = 1234
COMMON = dict(vocab_size=V, hidden_size=D, max_position_embeddings=256)

# --------------------------------------------------------------------------- families
# name -> (config kwargs, perturbation seed, extra from_pretrained kwargs)
FAMILIES = {
    "mistral": (dict(model_type="mistral", num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=32, sliding_window=4,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     tie_word_embeddings=False), 201, {}),
    "qwen2": (dict(model_type="qwen2", num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=32, rms_norm_eps=1e-6,
                   use_sliding_window=False, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0), 202, {}),
    "qwen3": (dict(model_type="qwen3", num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, intermediate_size=32, rms_norm_eps=1e-6,
                   use_sliding_window=False, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0), 203, {}),
    "olmo2": (dict(model_type="olmo2", num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=32, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
              204, {}),
    "gemma2": (dict(model_type="gemma2", num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=32,
                    query_pre_attn_scalar=32, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"],
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2), 205, {}),
    "gptj": (dict(model_type="gptj", n_layer=2, n_head=4, n_inner=32, rotary_dim=8,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, n_positions=256,
                  tie_word_embeddings=False, bos_token_id=127, eos_token_id=127), 206, {}),
    "gpt_neox": (dict(model_type="gpt_neox", num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=32, hidden_act="gelu", layer_norm_eps=1e-5,
                      use_parallel_residual=True, attention_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.25},
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0), 207, {}),
    "mixtral": (dict(model_type="mixtral", num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=8,
                     num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                     sliding_window=None, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0), 208,
                {"experts_implementation": "eager"}),
    "qwen2_moe": (dict(model_type="qwen2_moe", num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=8,
                       shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                       norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                       rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0), 209,
                  {"experts_implementation": "eager"}),
    "phi": (dict(model_type="phi", num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=32, hidden_act="gelu_new",
                 layer_norm_eps=1e-5, qk_layernorm=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5},
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), 210, {}),
}


# --------------------------------------------------------------------------- true float64
# The float32 islands of transformers (RMSNorm, RoPE, the eager softmax, the MoE router) are raised
# to float64 by the package's own machinery, shared with `python -m minipatch reference`:
# minipatch.hf_reference.float64_islands (every float32 request made float64 while the model is
# built and run, each recorded with its module class). The census below checks the result.


# --------------------------------------------------------------------------- dtype census
class DtypeCensus(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.bad_in, self.bad_out, self.seen = 0, Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = func.overloadpacket.__name__
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen[str(t.dtype)] += 1
                if t.dtype != torch.float64:
                    self.bad_in[f"{name}<-{t.dtype}"] += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen[str(t.dtype)] += 1
                if t.dtype != torch.float64:
                    self.bad_out[f"{name}->{t.dtype}"] += 1
        return out

    def report(self):
        return {"aten_ops": self.ops, "aten_non_fp64_inputs": dict(self.bad_in),
                "aten_non_fp64_outputs": dict(self.bad_out), "float_dtypes_seen": dict(self.seen),
                "true_fp64": not self.bad_in and not self.bad_out}


class FunctionCensus(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls, self.bad = 0, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.bad[f"{getattr(func, '__name__', str(func))}->{t.dtype}"] += 1
        return out


def census(fn):
    fc, dc = FunctionCensus(), DtypeCensus()
    with fc, dc:
        out = fn()
    rep = {"torch_function_calls": fc.calls, "torch_function_non_fp64_outputs": dict(fc.bad)}
    rep.update(dc.report())
    rep["true_fp64"] = rep["true_fp64"] and not fc.bad
    return out, rep


# --------------------------------------------------------------------------- perturbation
NORM_GAIN_MINUS_1 = ("Gemma2RMSNorm",)


def perturb(model, seed, tied):
    """Overwrite every parameter with fresh N(0,1) draws (tests/fixtures/HF_FIXTURES.md rule)."""
    g = torch.Generator().manual_seed(seed)
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = mod
    rules = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            mod = owners[name]
            cls = type(mod).__name__
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, nn.Embedding) or name in ("lm_head.weight", "embed_out.weight"):
                rule, val = "embedding", 0.25 * z
            elif leaf == "bias":
                rule, val = "bias", 0.2 * z
            elif isinstance(mod, nn.LayerNorm) or "RMSNorm" in cls:
                gain = torch.exp(0.5 * z)
                if cls in NORM_GAIN_MINUS_1:
                    rule, val = "norm_gain_minus_1", gain - 1.0
                else:
                    rule, val = "norm_gain", gain
            elif p.ndim >= 2:
                rule, val = "matrix", z / math.sqrt(p.shape[-1])
            else:
                raise RuntimeError(f"no perturbation rule for {name} {tuple(p.shape)} ({cls})")
            p.copy_(val.to(p.dtype))
            rules[name] = rule
    return rules


# --------------------------------------------------------------------------- model parts
def parts(model, family):
    if family == "gptj":
        base = model.transformer
        return base.wte, base.h, base.ln_f
    if family == "gpt_neox":
        base = model.gpt_neox
        return base.embed_in, base.layers, base.final_layer_norm
    base = model.model
    final = base.final_layernorm if family == "phi" else base.norm
    return base.embed_tokens, base.layers, final


def additive_mask(pos, window=None):
    """[1,1,T,T] float64 additive mask: 0 where p_j <= p_i (and p_i - W < p_j), else finfo.min."""
    p = torch.as_tensor(pos)
    ok = p[None, :] <= p[:, None]
    if window is not None:
        ok &= p[None, :] > p[:, None] - window
    m = torch.zeros(ok.shape, dtype=torch.float64)
    m[~ok] = torch.finfo(torch.float64).min
    return m[None, None]


def poswindow_mask(family, cfg, pos):
    if family == "mistral":
        return additive_mask(pos, cfg.sliding_window)
    if family == "gemma2":
        return {"full_attention": additive_mask(pos),
                "sliding_attention": additive_mask(pos, cfg.sliding_window)}
    return None


# --------------------------------------------------------------------------- one family
def build(name, out_root):
    t0 = time.time()
    kwargs, seed, load_kwargs = FAMILIES[name]
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type")
    full_kwargs = {**COMMON, **kwargs}
    if model_type == "gptj":  # GPT-J names
        full_kwargs = {"vocab_size": V, "n_embd": D, **kwargs}
    cfg = AutoConfig.for_model(model_type, **full_kwargs)
    cfg_kwargs_record = {"model_type": model_type, **full_kwargs}

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="eager",
                                             **load_kwargs)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rules = perturb(model, seed, tied)
    model.eval()

    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    written = sorted(os.listdir(folder))
    removed = []
    if (folder / "generation_config.json").exists():
        (folder / "generation_config.json").unlink()
        removed.append("generation_config.json")

    # Everything below runs on the reloaded checkpoint, as a user would load it.
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager",
                                             **load_kwargs).eval()
    sd0, sd1 = model.state_dict(), m.state_dict()
    assert set(sd0) == set(sd1)
    reload_diff = max((sd0[k] - sd1[k]).abs().max().item() for k in sd0 if sd0[k].numel())
    assert reload_diff == 0.0, reload_diff
    cfg = m.config

    ids = np.random.default_rng(IDS_SEED).integers(5, 127, size=T).astype(np.int64)
    ids[0] = cfg.bos_token_id
    x = torch.as_tensor(ids)[None]
    ones = torch.ones_like(x)
    kept_x = torch.as_tensor(ids[KEPT])[None]
    kept_pos = torch.as_tensor(KEPT)[None]
    kept_ones = torch.ones_like(kept_x)

    def fwd(**kw):
        with torch.no_grad():
            return m(use_cache=False, **kw)

    # ---- stock float64 (no patches)
    stock_buffers = {k: [str(b.dtype), b.flatten()[:8].tolist()] for k, b in m.named_buffers()
                     if b.is_floating_point()}
    stock, stock_census = census(lambda: fwd(input_ids=x, attention_mask=ones))
    logits_stock = stock.logits[0].numpy().copy()

    # ---- true float64 (the model is rebuilt inside the context, so its RoPE tables are float64)
    with float64_islands() as islands:
        m = load_hf_model(folder, model_type)
        emb, layers, final = parts(m, name)
        captured = {}
        hooks = [emb.register_forward_hook(lambda mod, i, o: captured.__setitem__("emb", o))]
        for li, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(
                lambda mod, i, o, li=li: captured.__setitem__(li, o[0] if isinstance(o, tuple) else o)))
        hooks.append(final.register_forward_hook(lambda mod, i, o: captured.__setitem__("final", o)))
        out, true_census = census(lambda: fwd(input_ids=x, attention_mask=ones,
                                              output_hidden_states=True))
        for h in hooks:
            h.remove()
        kept, kept_census = census(lambda: fwd(input_ids=kept_x, position_ids=kept_pos,
                                               attention_mask=kept_ones))
        kept_nomask = fwd(input_ids=kept_x, position_ids=kept_pos)
        pw = poswindow_mask(name, cfg, KEPT)
        extra = {}
        if pw is not None:
            kept_pw, pw_census = census(lambda: fwd(input_ids=kept_x, position_ids=kept_pos,
                                                    attention_mask=pw))
            full_pw = fwd(input_ids=x, attention_mask=poswindow_mask(name, cfg, np.arange(T)))
            extra["poswindow_mask_check_full_sequence_max_abs_diff"] = \
                (full_pw.logits - out.logits).abs().max().item()
            extra["dtype_check_true_fp64_kept_only_poswindow"] = pw_census
        # reload check of the true-fp64 forward
        m2 = load_hf_model(folder, model_type)
        with torch.no_grad():
            out2 = m2(input_ids=x, attention_mask=ones, use_cache=False)
        reload_true_diff = (out2.logits - out.logits).abs().max().item()

    logits = out.logits[0].numpy().copy()
    hs = torch.stack(out.hidden_states)[:, 0].numpy().copy()
    L = len(layers)
    layout = {
        "hs[0] == embedding module output": bool(torch.equal(out.hidden_states[0], captured["emb"])),
        "hs[1..L-1] == decoder layer outputs": all(
            torch.equal(out.hidden_states[i], captured[i - 1]) for i in range(1, L)),
        "hs[L] == final norm output": bool(torch.equal(out.hidden_states[L], captured["final"])),
    }
    assert all(layout.values()), layout
    assert hs.shape == (L + 1, T, D)
    arrays = {
        "input_ids": ids, "context_positions": CONTEXT, "kept_positions": KEPT,
        "logits": logits, "logits_stock": logits_stock, "hidden_states": hs,
        "hidden_final_prenorm": captured[L - 1][0].numpy().copy(),
        "logits_kept_only": kept.logits[0].numpy().copy(),
    }
    if pw is not None:
        arrays["logits_kept_only_poswindow"] = kept_pw.logits[0].numpy().copy()
    np.savez(folder / "reference.npz", **arrays)

    maxabs = float(np.abs(logits).max())
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "pt") as f:
        st_meta = f.metadata()
        st_tensors = {k: [list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()]
                      for k in sorted(f.keys())}
    meta = {
        "name": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "architecture": model_type,
        "model_class": type(m).__name__,
        "config_class": type(cfg).__name__,
        "config_kwargs": cfg_kwargs_record,
        "from_pretrained_kwargs": {"dtype": "torch.float64", "attn_implementation": "eager",
                                   **load_kwargs},
        "config_full": json.loads(cfg.to_json_string()),
        "save_call": "model.save_pretrained(folder, safe_serialization=True)",
        "files_written_by_save_pretrained": written,
        "files_removed": removed,
        "safetensors_metadata": st_meta,
        "safetensors_tensors": st_tensors,
        "model_safetensors_bytes": (folder / "model.safetensors").stat().st_size,
        "n_params": sum(p.numel() for p in m.parameters()),
        "tie_word_embeddings": tied,
        "perturbation": {
            "rule": "every parameter tensor is overwritten with fresh draws z ~ N(0,1) (float64, "
                    "torch.Generator, in model.named_parameters() order)",
            "embedding": "0.25 * z (token embeddings, untied output head)",
            "bias": "0.2 * z",
            "norm_gain": "g = exp(0.5 * z), stored as g (weight-style norms)",
            "norm_gain_minus_1": "w = exp(0.5 * z) - 1 (Gemma2RMSNorm computes x_hat * (1 + w))",
            "matrix": "z / sqrt(fan_in), fan_in = last dim (also for fused [E, out, in] experts)",
            "seed": seed,
            "rule_per_parameter": rules,
        },
        "input": {"ids_seed": IDS_SEED,
                  "draw": "np.random.default_rng(1234).integers(5, 127, size=24); ids[0] = BOS",
                  "position_0": f"BOS id {cfg.bos_token_id}",
                  "context_positions": CONTEXT.tolist(), "kept_positions": KEPT.tolist()},
        "forward_call": "model(input_ids=ids[None], attention_mask=ones, use_cache=False, "
                        "output_hidden_states=True), eval mode, eager attention",
        "kept_only_call": "model(input_ids=ids[kept][None], position_ids=kept[None], "
                          "attention_mask=ones(1,9), use_cache=False)",
        "float32_islands_raised": islands.names(),
        "stock_buffers": stock_buffers,
        "dtype_check_stock_fp64": stock_census,
        "dtype_check_true_fp64": {"full": true_census, "kept_only": kept_census},
        "reload_state_dict_max_abs_diff": reload_diff,
        "reload_check_max_abs_logits_diff_true_fp64": reload_true_diff,
        "hidden_states_layout_checks": layout,
        "max_abs_logits_minus_stock": float(np.abs(logits - logits_stock).max()),
        "max_rel_logits_minus_stock": float(np.abs(logits - logits_stock).max() / maxabs),
        "max_abs_logits": maxabs,
        "logits_std": float(logits.std()),
        "argmax_agree_true_vs_stock": int((logits.argmax(-1) == logits_stock.argmax(-1)).sum()),
        "mean_top1_prob": float(p.max(-1).mean()),
        "context_effect_max_rel": float(np.abs(logits[KEPT] - arrays["logits_kept_only"]).max()
                                        / maxabs),
        "kept_only_without_attention_mask_max_abs_diff":
            (kept_nomask.logits - kept.logits).abs().max().item(),
        "npz_keys": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()},
        **extra,
    }
    if pw is not None:
        meta["kept_only_poswindow_vs_indexwindow_max_abs_diff"] = float(
            np.abs(arrays["logits_kept_only_poswindow"] - arrays["logits_kept_only"]).max())
    meta["seconds"] = round(time.time() - t0, 2)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    ok = true_census["true_fp64"] and kept_census["true_fp64"]
    print(f"{name:10s} bytes={meta['model_safetensors_bytes']:7d} L={L} "
          f"stock-true={meta['max_abs_logits_minus_stock']:.2e} "
          f"true_fp64={ok} maxlogit={maxabs:.2f} top1={meta['mean_top1_prob']:.2f} "
          f"{'pw=%.2e' % extra['poswindow_mask_check_full_sequence_max_abs_diff'] if pw is not None else ''}",
          flush=True)
    if not ok:
        print("   non-fp64:", true_census["aten_non_fp64_outputs"], true_census["aten_non_fp64_inputs"],
              true_census["torch_function_non_fp64_outputs"])
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    for fam in args.families:
        try:
            build(fam, out)
        except Exception as e:  # keep going: a family transformers cannot build is skipped
            failed[fam] = f"{type(e).__name__}: {e}"
            print(f"{fam:10s} FAILED: {failed[fam]}", flush=True)
            if os.environ.get("FIXTURES_RAISE"):
                raise
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face references: transformers run on a checkpoint, every hidden state and sublayer kept.

``python -m minipatch reference CHECKPOINT --out REF.npz`` (FORMATS.md, "Reference files") calls
:func:`make_reference`. torch and transformers are the optional extra ``[hf]``; they are imported
here, lazily, never at package import (:class:`~minipatch.errors.MissingDependencyError` names
``pip install -e ".[hf]"``). Nothing from the checkpoint is executed (``trust_remote_code`` stays
off); config.json is read by minipatch's own bounded reader first.

**True float64** (the default). ``model.to(torch.float64)`` is not enough: transformers computes
*float32 islands* in a float64 model -- RMSNorm, the RoPE tables, the eager softmax, the MoE
router (FORMATS.md lists them; tests/fixtures/HF_FIXTURES.md section 3). They are raised, not rewritten: while the model is built and run, a ``TorchFunctionMode``
turns every request for float32 (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``)
into float64 and torch's default dtype is float64, so each island runs Hugging Face's own
expression in float64. Each raised request is recorded with the module class it ran in (the
reference's ``islands`` member), and a ``TorchDispatchMode`` census then checks that no aten op
of the forward consumed or produced a floating tensor other than float64 (else
:class:`~minipatch.errors.UnsupportedArchitectureError`). On every fixture the result equals the
committed true-float64 ``reference.npz`` and minipatch's forward to <= 1e-12
(tests/test_hf_reference.py). ``stock=True`` runs transformers as shipped (the islands are then
recorded, not raised), for auditing Hugging Face itself.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, ModelFileError, UnsupportedArchitectureError

HF_HINT = 'pip install -e ".[hf]"  (torch 2.13.0 CPU and transformers)'

_LLAMA = dict(attn_norm=("input_layernorm", "out"), attn_out=("self_attn", "out"),
              mlp_in=("post_attention_layernorm", "in"), mlp_norm=("post_attention_layernorm", "out"),
              mlp_hidden=("mlp.down_proj", "in"), mlp_out=("mlp", "out"), out=("", "out"))
_MOE = {k: v for k, v in _LLAMA.items() if k != "mlp_hidden"}
_GEMMA = dict(attn_norm=("input_layernorm", "out"), attn_out=("self_attn", "out"),
              attn_post_norm=("post_attention_layernorm", "out"), mlp_in=("pre_feedforward_layernorm", "in"),
              mlp_norm=("pre_feedforward_layernorm", "out"), mlp_hidden=("mlp.down_proj", "in"),
              mlp_out=("mlp", "out"), mlp_post_norm=("post_feedforward_layernorm", "out"), out=("", "out"))

SUBLAYER_HOOKS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "mixtral": _MOE, "qwen2_moe": _MOE,
    "gemma3_text": _GEMMA, "gemma2": _GEMMA,
    "olmo2": dict(attn_out=("self_attn", "out"), attn_post_norm=("post_attention_layernorm", "out"),
                  mlp_in=("mlp", "in"), mlp_hidden=("mlp.down_proj", "in"), mlp_out=("mlp", "out"),
                  mlp_post_norm=("post_feedforward_layernorm", "out"), out=("", "out")),
    "gpt2": dict(attn_norm=("ln_1", "out"), attn_out=("attn", "out"), mlp_in=("ln_2", "in"),
                 mlp_norm=("ln_2", "out"), mlp_hidden=("mlp.c_proj", "in"), mlp_out=("mlp", "out"),
                 out=("", "out")),
    "gptj": dict(attn_norm=("ln_1", "out"), attn_out=("attn", "out"), mlp_in=("", "in"), mlp_norm=("mlp", "in"),
                 mlp_hidden=("mlp.fc_out", "in"), mlp_out=("mlp", "out"), out=("", "out")),
    "phi": dict(attn_norm=("input_layernorm", "out"), attn_out=("self_attn", "out"), mlp_in=("", "in"),
                mlp_norm=("mlp", "in"), mlp_hidden=("mlp.fc2", "in"), mlp_out=("mlp", "out"), out=("", "out")),
    "gpt_neox": dict(attn_norm=("input_layernorm", "out"), attn_out=("attention", "out"), mlp_in=("", "in"),
                     mlp_norm=("post_attention_layernorm", "out"), mlp_hidden=("mlp.dense_4h_to_h", "in"),
                     mlp_out=("mlp", "out"), out=("", "out")),
}
"""model_type -> sublayer (minipatch.audit.sublayers.SUBLAYERS) -> (module path inside the decoder
layer, 'in' or 'out'); '' is the decoder layer itself."""

LAYERS = {"gpt2": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers"}
"""model_type -> the decoder layers' ModuleList (default ``model.layers``)."""

MOE = ("mixtral", "qwen2_moe")


def _import():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingDependencyError(f"making a Hugging Face reference needs torch and transformers ({e}): "
                                     f"{HF_HINT}") from None
    return torch, transformers


def read_model_type(folder):
    """(config dict, model_type) of a checkpoint folder, read by minipatch's bounded reader."""
    from .io.files import MAX_CONFIG_BYTES, read_regular

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: a reference is made from a Hugging Face checkpoint folder "
                             "(config.json + *.safetensors)")
    try:
        config = json.loads(read_regular(folder / "config.json", "config.json", MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ModelFileError(f"{folder}: no config.json") from None
    except ValueError as e:
        raise ModelFileError(f"{folder / 'config.json'}: not JSON ({e})") from None
    mt = config.get("model_type") if isinstance(config, dict) else None
    if mt not in SUBLAYER_HOOKS:
        raise UnsupportedArchitectureError(f"{folder}: model_type {mt!r} has no reference hooks; supported: "
                                           f"{sorted(SUBLAYER_HOOKS)}")
    return config, mt


class _Islands:
    """The float32 requests seen while building or running a model ({'Class: op': count}), raised
    to float64 when ``raise_`` (see the module docstring). ``stack`` holds the running modules."""

    def __init__(self, torch, raise_):
        from torch.overrides import TorchFunctionMode

        f32, f64 = torch.float32, torch.float64
        owner = self
        self.seen, self.stack = Counter(), []

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                asks = func is torch.Tensor.float or kwargs.get("dtype") is f32 or any(a is f32 for a in args[1:])
                if asks:
                    where = owner.stack[-1] if owner.stack else "model build"
                    owner.seen[f"{where}: {getattr(func, '__name__', func)}"] += 1
                    if raise_:
                        if func is torch.Tensor.float:
                            return args[0].to(f64)
                        kwargs = {k: (f64 if v is f32 else v) for k, v in kwargs.items()}
                        args = tuple(f64 if a is f32 else a for a in args)
                return func(*args, **kwargs)

        self.mode = Mode()

    def names(self):
        return sorted(f"{k} (x{n})" for k, n in self.seen.items())


def _census(torch):
    """A TorchDispatchMode counting aten ops that touch a floating tensor other than float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Census(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    self.bad[f"{func} ({t.dtype})"] += 1
            return out

    return Census()


@contextlib.contextmanager
def float64_islands(stock=False):
    """Context in which transformers builds and runs models with every float32 island raised to
    float64 (``stock=True``: recorded only). Yields the :class:`_Islands` record."""
    torch, _ = _import()
    isl = _Islands(torch, raise_=not stock)
    old = torch.get_default_dtype()
    if not stock:
        torch.set_default_dtype(torch.float64)
    try:
        with isl.mode:
            yield isl
    finally:
        torch.set_default_dtype(old)


def load_hf_model(folder, model_type, dtype="float64"):
    """``AutoModelForCausalLM.from_pretrained`` with eager attention (and eager experts for MoE),
    in eval mode, without remote code. Call inside :func:`float64_islands` for true float64."""
    torch, transformers = _import()
    extra = {"experts_implementation": "eager"} if model_type in MOE else {}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="eager", trust_remote_code=False, **extra)
    except Exception as e:       # any failure of transformers on these files (SafetensorError, ...)
        raise ModelFileError(f"{folder}: transformers cannot load it ({type(e).__name__}: {e})") from None
    return model.eval()


def _module(root, path):
    return root.get_submodule(path) if path else root


def _hooks(layers, table, store):
    """Forward hooks that copy each sublayer into store[name][layer] and keep islands.stack."""
    handles = []

    def grab(x):
        x = x[0] if isinstance(x, tuple) else x
        return x.detach()[0].clone()

    for l, layer in enumerate(layers):
        for name, (path, side) in table.items():
            mod = _module(layer, path)
            if side == "in":
                def pre(m, args, kwargs, name=name, l=l):
                    x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                    store[name][l] = grab(x)
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(m, args, out, name=name, l=l):
                    store[name][l] = grab(out)
                handles.append(mod.register_forward_hook(post))
    return handles


def _stack_hooks(root, islands):
    """Keep islands.stack = the classes of the modules running (attribution of float32 requests)."""
    def enter(m, args):
        islands.stack.append(type(m).__name__)

    def leave(m, args, out):          # a hook's return value would replace the output: None
        islands.stack.pop()

    handles = []
    for mod in root.modules():
        handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    return handles


def make_reference(checkpoint, tokens, context=None, dtype="float64", stock=False, progress=False):
    """Run Hugging Face transformers on ``checkpoint`` and return the reference arrays (FORMATS.md).

    Args:
      checkpoint: a Hugging Face checkpoint folder of a supported ``model_type``.
      tokens: int [T] input ids (one sequence). context: optional positions to absorb (stored as
        ``context_positions`` for the audit's theorem check).
      dtype: 'float64' (default: true float64 unless ``stock``) or 'float32' (stock float32).
      stock: keep transformers as shipped (float32 islands in a float64 model).
      progress: show a progress bar over the decoder layers (tqdm).
    Returns:
      {member: numpy array}: input_ids [T], logits [T, V], hidden_states [L+1, T, D],
      sublayers.<name> [L, T, W], context_positions [C] (if given), reference_kind, islands,
      transformers_version.
    Raises:
      MissingDependencyError (no torch/transformers), ModelFileError / UnsupportedArchitectureError
      (the checkpoint), InputError (tokens, context, dtype).
    """
    from .validate import check_float_dtype, check_tokens, split_context

    dtype = check_float_dtype(dtype).name
    config, model_type = read_model_type(checkpoint)
    torch, transformers = _import()
    vocab = config.get("vocab_size")
    ids = check_tokens(tokens, vocab if isinstance(vocab, int) and vocab > 0 else 1 << 62)
    ctx = None if context is None else split_context(context, ids.size)[0]
    true64 = dtype == "float64" and not stock
    kind = "true-float64" if true64 else f"stock-{dtype}"
    with float64_islands(stock=not true64) as isl:
        model = load_hf_model(checkpoint, model_type, dtype)
        layers = _module(model, LAYERS.get(model_type, "model.layers"))
        table = SUBLAYER_HOOKS[model_type]
        store = {name: [None] * len(layers) for name in table}
        handles = _hooks(layers, table, store) + _stack_hooks(model, isl)
        bar = _progress(layers, progress, handles)
        census = _census(torch)
        x = torch.as_tensor(ids)[None]
        try:
            with torch.no_grad(), (census if true64 else contextlib.nullcontext()):
                out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False,
                            output_hidden_states=True)
        except Exception as e:     # transformers' own failure on this input (e.g. too long for its positions)
            raise ModelFileError(f"{checkpoint}: the transformers forward failed ({type(e).__name__}: {e})") from None
        finally:
            for h in handles:
                h.remove()
            if bar is not None:
                bar.close()
    if true64 and census.bad:
        raise UnsupportedArchitectureError(
            f"{checkpoint}: transformers {transformers.__version__} still computes parts of {model_type} in "
            f"another dtype after raising every float32 request: {dict(census.bad)}; use --stock")
    host = lambda t: t.detach().numpy().astype(np.float64 if dtype == "float64" else np.float32)
    arrays = {"input_ids": ids.astype(np.int64), "logits": host(out.logits[0]),
              "hidden_states": np.stack([host(h[0]) for h in out.hidden_states])}
    for name in table:
        arrays[f"sublayers.{name}"] = np.stack([host(t) for t in store[name]])
    if ctx is not None:
        arrays["context_positions"] = ctx
    islands = isl.names() if dtype == "float64" else []
    arrays["reference_kind"] = np.array(kind)
    arrays["islands"] = np.array(islands, dtype=str) if islands else np.zeros(0, dtype="<U1")
    arrays["transformers_version"] = np.array(f"transformers {transformers.__version__}, torch {torch.__version__}")
    return arrays


def _progress(layers, progress, handles):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(total=len(layers), desc="Hugging Face forward", unit="layer")
    def step(m, args, out):
        bar.update(1)

    handles += [layer.register_forward_hook(step) for layer in layers]
    return bar

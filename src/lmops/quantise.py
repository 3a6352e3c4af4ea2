"""int8 post-training quantisation for CPU inference: PyTorch and ONNX Runtime variants.

**PyTorch int8** (:func:`quantise`, :class:`Int8Transformer`): every ``nn.Linear`` of the
blocks becomes a dynamically quantised linear (``torch.ao.nn.quantized.dynamic.Linear``:
int8 weights, activations quantised on the fly, fbgemm/x86 kernels). The embedding, tied
to the output head, would stay fp32 under ``quantize_dynamic`` and keep most of a small
model's bytes, so it is quantised on its own: one int8 matrix with a scale per row
(symmetric, ``scale = max|row| / 127``) serves both the lookup (rows dequantised on
lookup) and the output projection (a dynamic int8 linear whose per-output-channel scales
are those per-row scales). Norm weights stay fp32.

On disk it is a model directory like any other (safetensors + ``config.json`` + sha256
``manifest.json``, see :mod:`lmops.checkpoint`) holding plain int8 and fp32 tensors:
``<linear>.qweight`` / ``<linear>.scale``, ``tok_emb.qweight`` / ``tok_emb.scale`` and the
fp32 norm weights. :func:`load_quantised` rebuilds the modules from them; nothing is
unpickled and no training object is needed.

**ONNX** (:func:`export_onnx`, :class:`OrtTransformer`): one decoding step (tokens,
positions, attention mask and the past keys/values in; logits and the new keys/values out)
exported with the TorchScript-based exporter (``dynamo=False``: the dynamo exporter needs
``onnxscript``), then quantised by ``onnxruntime.quantization.quantize_dynamic`` (int8
MatMul weights per channel, int8 Gather for the embedding). :class:`OrtTransformer` runs
the session behind the :class:`lmops.model.Transformer` decoding methods, so greedy and
beam search, perplexity and :func:`lmops.evaluate.evaluate_model` are the same code for
every variant.

:func:`decode_speed` times greedy decoding of the same sentences at several batch sizes,
variants interleaved round by round.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmops import checkpoint
from lmops.checkpoint import CheckpointError
from lmops.config import ModelConfig, Params
from lmops.errors import LmopsError
from lmops.hardware import facts
from lmops.io import atomic_output, read_json
from lmops.model import KVCache, Transformer, _rotate

log = logging.getLogger(__name__)

TORCH_INT8 = "torch-int8"
ONNX_INT8 = "onnx-int8"
ONNX_FP32 = "onnx-fp32"
WEIGHTS = checkpoint.WEIGHTS
ONNX_FILE = "model.onnx"
OPSET = 17
QMAX = 127


class QuantiseError(LmopsError):
    """A quantised model cannot be written, read or run."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao quantised tensors warn that they are deprecated (pytorch#184982); they are
    # still the fastest int8 CPU path in this torch (torchao's eager int8 measured slower)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


# ------------------------------------------------------------- int8 tensors


def quantise_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: ``weight ~= qweight * scale[:, None]``; (int8, fp32 scale)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _linear_names(model: Transformer) -> list[str]:
    return [name for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def int8_tensors(model: Transformer) -> dict[str, Tensor]:
    """The tensors of the int8 model: quantised linears and embedding, fp32 norms."""
    out: dict[str, Tensor] = {}
    for name in _linear_names(model):
        q, s = quantise_rows(model.blocks.get_submodule(name).weight)
        out[f"blocks.{name}.qweight"], out[f"blocks.{name}.scale"] = q, s
    out["tok_emb.qweight"], out["tok_emb.scale"] = quantise_rows(model.tok_emb.weight)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            out[name] = p.detach().float().contiguous()
    return out


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table with one fp32 scale per row."""

    def __init__(self, qweight: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, idx: Tensor) -> Tensor:
        return self.weight[idx].float() * self.scale[idx].unsqueeze(-1)


def _int8_linear(qweight: Tensor, scale: Tensor) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_features, in_features = qweight.shape
    with _quiet():
        packed = torch._make_per_channel_quantized_tensor(
            qweight, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
        linear = DynamicLinear(in_features, out_features, bias_=False, dtype=torch.qint8)
        linear.set_weight_bias(packed, None)
    return linear


class Int8Transformer(Transformer):
    """A :class:`Transformer` whose matrices are int8 (see the module doc); CPU only.

    Built from :func:`int8_tensors` output; decoding, perplexity and evaluation are the
    parent's code. ``num_params`` counts the weights of the fp32 model it came from.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, tensors: dict[str, Tensor]):
        super().__init__(cfg, vocab_size)
        with torch.no_grad():
            for name in _linear_names(self):
                parent_name, _, attr = f"blocks.{name}".rpartition(".")
                setattr(self.get_submodule(parent_name), attr,
                        _int8_linear(tensors[f"blocks.{name}.qweight"],
                                     tensors[f"blocks.{name}.scale"]))
            qweight, scale = tensors["tok_emb.qweight"], tensors["tok_emb.scale"]
            self.tok_emb = Int8Embedding(qweight, scale)
            self.lm_head = _int8_linear(qweight, scale)
            for name, p in self.named_parameters():
                p.copy_(tensors[name])
        self._fp32_params = (sum(t.numel() for k, t in tensors.items() if not
                                 k.endswith(".scale")))
        self.eval()

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = self._fp32_params
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def train(self, mode: bool = True) -> Int8Transformer:
        if mode:
            raise QuantiseError("an int8 model is for inference only")
        return super().train(False)

    def to(self, *args: Any, **kwargs: Any) -> Int8Transformer:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, str | torch.device) and torch.device(arg).type != "cpu":
                raise QuantiseError(f"int8 models run on the cpu, not {arg}")
        return self


def quantise(model: Transformer) -> Int8Transformer:
    """The int8 version of ``model`` (which is left unchanged)."""
    model = model.cpu()
    return Int8Transformer(model.cfg, model.vocab_size, int8_tensors(model))


# ----------------------------------------------------------------- on disk


def _write_dir(path: str | Path, files: dict[str, Any], config: dict[str, Any]) -> Path:
    """A model dir at ``path`` (atomically): ``files`` (name -> writer(tmp path)) + config
    + a sha256 manifest, so :func:`lmops.checkpoint.verify` checks it before any read."""
    path = Path(path)
    with atomic_output(path, is_dir=True) as tmp:
        for name, write in files.items():
            write(tmp / name)
        (tmp / checkpoint.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        names = sorted(p.name for p in tmp.iterdir())
        manifest = {"sha256": {name: checkpoint.sha256(tmp / name) for name in names}}
        (tmp / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _base_config(cfg: ModelConfig, vocab_size: int, fmt: str, num_params: int,
                 meta: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": fmt, "model": cfg.model_dump(), "vocab_size": vocab_size,
            "num_params": num_params, **(meta or {})}


def save_int8(model: Transformer, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Quantise ``model`` and write it as an int8 model directory."""
    tensors = int8_tensors(model.cpu())
    config = _base_config(model.cfg, model.vocab_size, TORCH_INT8, model.num_params(), meta)
    config["quantisation"] = {"weights": "int8 symmetric per output row",
                              "activations": "dynamic (per tensor, at run time)",
                              "embedding": "int8 per row, shared with the output head"}
    return _write_dir(path, {WEIGHTS: lambda p: save_file(tensors, str(p))}, config)


def read_config(path: str | Path) -> dict[str, Any]:
    """A quantised model dir's config, every file checked against the manifest first."""
    path = Path(path)
    if not (path / checkpoint.CONFIG).is_file():
        raise CheckpointError(f"{path}: no quantised model here ({checkpoint.CONFIG} missing); "
                              "run the quantise stage")
    config = checkpoint.read_config(path)
    if config.get("format") not in (TORCH_INT8, ONNX_INT8, ONNX_FP32):
        raise CheckpointError(f"{path / checkpoint.CONFIG}: not a quantised model "
                              f"(format {config.get('format')!r})")
    return config


def load_quantised(path: str | Path, num_threads: int = 0) -> Transformer:
    """Rebuild a quantised model dir (torch int8 or ONNX) for decoding and evaluation."""
    path = Path(path)
    config = read_config(path)
    try:
        cfg, vocab = ModelConfig(**config["model"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / checkpoint.CONFIG}: not a model config ({err})") from None
    if config["format"] == TORCH_INT8:
        file = path / WEIGHTS
        checkpoint.check_safetensors(file)
        try:
            tensors = load_file(file)
            return Int8Transformer(cfg, vocab, tensors)
        except (SafetensorError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{file}: not an int8 model of this config ({err})") from None
    return OrtTransformer(path / ONNX_FILE, cfg, vocab, int(config["num_params"]), num_threads)


def file_bytes(path: str | Path) -> int:
    """Bytes of the weights file(s) of a model dir (safetensors or ONNX)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir()
               if f.suffix in (".safetensors", ".onnx", ".data"))


# -------------------------------------------------------------------- ONNX


def _rms(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    # written out: the TorchScript exporter has no symbolic for aten::rms_norm
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


class _OnnxStep(nn.Module):
    """One decoding step of a Transformer with explicit past keys/values, for export.

    Inputs: ``idx`` [B, T], ``positions`` [B, T], ``mask`` [B, 1, T, P + T] (True = attend),
    then ``past_k_0, past_v_0, ...`` [B, H, P, D]. Outputs: logits [B, T, V] and every
    layer's keys/values so far, past and new, [B, H, P + T, D], which the caller feeds back
    as the next step's past without copying them. Same maths as :meth:`Transformer.forward`.
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.m = model

    def forward(self, idx: Tensor, positions: Tensor, mask: Tensor, *past: Tensor):
        m = self.m
        angles = (positions.unsqueeze(-1).float() * m.inv_freq).unsqueeze(1)
        cos, sin = angles.cos(), angles.sin()
        x = m.tok_emb(idx)
        present = []
        for layer, block in enumerate(m.blocks):
            attn = block.attn
            h = _rms(x, block.attn_norm)
            b, t, c = h.shape
            q, k, v = attn.qkv(h).view(b, t, 3, attn.n_head, -1).permute(2, 0, 3, 1, 4)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k = torch.cat([past[2 * layer], k], dim=2)
            v = torch.cat([past[2 * layer + 1], v], dim=2)
            present += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + attn.proj(y.transpose(1, 2).reshape(b, t, c))
            x = x + block.mlp(_rms(x, block.mlp_norm))
        return (m.lm_head(_rms(x, m.norm)), *present)


def _io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(n_layer) for kv in ("k", "v")]
    new = [f"present_{kv}_{i}" for i in range(n_layer) for kv in ("k", "v")]
    return ["idx", "positions", "mask", *past], ["logits", *new]


def export_onnx(model: Transformer, path: str | Path, int8: bool = True,
                meta: dict[str, Any] | None = None) -> Path:
    """Export ``model`` as an ONNX model dir (int8-quantised by onnxruntime by default)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = model.cpu().eval()
    cfg = model.cfg
    head = cfg.n_embd // cfg.n_head
    inputs, outputs = _io_names(cfg.n_layer)
    b, t, p = 2, 3, 2
    example = (torch.zeros(b, t, dtype=torch.long), torch.arange(t).repeat(b, 1),
               torch.ones(b, 1, t, p + t, dtype=torch.bool),
               *[torch.zeros(b, cfg.n_head, p, head) for _ in range(2 * cfg.n_layer)])
    axes: dict[str, dict[int, str]] = {"idx": {0: "batch", 1: "seq"},
                                       "positions": {0: "batch", 1: "seq"},
                                       "mask": {0: "batch", 2: "seq", 3: "total"},
                                       "logits": {0: "batch", 1: "seq"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total"}

    def write(target: Path) -> None:
        fp32 = target.with_name("fp32.onnx") if int8 else target
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_OnnxStep(model), example, str(fp32), input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(fp32))
        if int8:
            with _quiet_logging():
                quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8,
                                 per_channel=True, op_types_to_quantize=["MatMul"])
            _share_embedding(target, cfg.n_embd, model.vocab_size)
            fp32.unlink()

    config = _base_config(cfg, model.vocab_size, ONNX_INT8 if int8 else ONNX_FP32,
                          model.num_params(), meta)
    config["onnx"] = {"opset": OPSET, "inputs": inputs, "outputs": outputs}
    if int8:
        config["quantisation"] = {"tool": "onnxruntime.quantization.quantize_dynamic",
                                  "weights": "int8 per output channel (MatMulInteger)",
                                  "embedding": "the output head's int8 matrix, gathered "
                                               "by column and scaled per token"}
    return _write_dir(path, {ONNX_FILE: write}, config)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # quantize_dynamic logs a "consider pre-processing" warning on the root logger
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _share_embedding(path: Path, n_embd: int, vocab_size: int) -> None:
    """Let the embedding lookup read the output head's int8 matrix instead of an fp32 copy.

    onnxruntime quantises the head's MatMul weight [E, V] to int8 with one scale per
    column (= per token, zero points 0), but would keep the tied embedding table [V, E]
    as a second, fp32 copy, most of a small model's bytes. The lookup becomes
    ``Gather(W_q, ids, axis=1)`` transposed to [B, T, E], cast, times the token's scale:
    exactly the table the head multiplies with, stored once.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    heads = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits
             and list(inits[n.input[1]].dims) == [n_embd, vocab_size]]
    lookups = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and list(inits[n.input[0]].dims) == [vocab_size, n_embd]]
    if len(heads) != 1 or len(lookups) != 1:
        raise QuantiseError(f"{path}: expected one int8 output head and one embedding lookup, "
                            f"found {len(heads)} and {len(lookups)}")
    head, lookup = heads[0], lookups[0]
    weight, zero = head.input[1], head.input[3]
    scale = weight.removesuffix("_quantized") + "_scale"
    if scale not in inits or numpy_helper.to_array(inits[zero]).any():
        raise QuantiseError(f"{path}: the output head is not symmetric per-channel int8")
    ids, out = lookup.input[1], lookup.output[0]
    axes = helper.make_tensor("lmops_emb_axes", TensorProto.INT64, [1], [-1])
    nodes = [
        helper.make_node("Gather", [weight, ids], ["lmops_emb_q"], axis=1),
        helper.make_node("Transpose", ["lmops_emb_q"], ["lmops_emb_qt"], perm=[1, 2, 0]),
        helper.make_node("Cast", ["lmops_emb_qt"], ["lmops_emb_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [scale, ids], ["lmops_emb_s"], axis=0),
        helper.make_node("Unsqueeze", ["lmops_emb_s", axes.name], ["lmops_emb_s1"]),
        helper.make_node("Mul", ["lmops_emb_f", "lmops_emb_s1"], [out]),
    ]
    at = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    for i, node in enumerate(nodes):
        graph.node.insert(at + i, node)
    graph.initializer.remove(inits[lookup.input[0]])
    graph.initializer.append(axes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _on_one_torch_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with torch limited to one thread while it runs (restored after)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


class OrtTransformer(nn.Module):
    """An exported model run by onnxruntime behind the :class:`Transformer` interface.

    ``forward(idx, cache, positions)`` behaves like the torch model's, so the decoding
    methods are the torch model's own. The :class:`lmops.model.KVCache` holds the session's
    ``present`` outputs as they are (each layer's buffer is exactly ``length`` slots long,
    so the next step feeds it back without a copy); its ``reorder`` works on them as on
    its own buffers.
    """

    _eval_mode = Transformer._eval_mode
    _left_pad = Transformer._left_pad
    new_cache = Transformer.new_cache
    _span_start = Transformer._span_start
    # the decoding loop's own torch ops (argmax, masks, cache bookkeeping) are tiny: on one
    # torch thread, so idle torch worker threads do not spin on the cores onnxruntime needs
    generate_greedy = _on_one_torch_thread(Transformer.generate_greedy)
    generate_beam = _on_one_torch_thread(Transformer.generate_beam)

    def __init__(self, onnx_path: str | Path, cfg: ModelConfig, vocab_size: int,
                 num_params: int, num_threads: int = 0):
        import onnxruntime as ort

        super().__init__()
        self.cfg, self.vocab_size, self._num_params = cfg, vocab_size, num_params
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = num_threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own unexported exception types
            raise QuantiseError(f"{onnx_path}: onnxruntime cannot load it ({err})") from None
        self.inputs, _ = _io_names(cfg.n_layer)
        self._head = cfg.n_embd // cfg.n_head

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_params(self, exclude_embedding: bool = False) -> int:
        return self._num_params - (self.cfg.n_embd * self.vocab_size if exclude_embedding
                                   else 0)

    def forward(self, idx: Tensor, cache: KVCache | None = None,
                positions: Tensor | None = None) -> Tensor:
        b, t = idx.shape
        start = self._span_start(t, cache)
        if positions is None:
            positions = torch.arange(start, start + t)
        positions = positions.expand(b, t) if positions.dim() == 1 else positions
        end = start + t
        dist = torch.arange(start, end).unsqueeze(1) - torch.arange(end)
        causal = (dist >= 0) & (dist < self.cfg.block_size)
        if cache is not None:
            mask = (causal & cache.valid[:, None, :end]) | (dist == 0)
        else:
            mask = causal.expand(b, t, end)
        feeds = {"idx": idx.numpy(), "positions": positions.contiguous().numpy(),
                 "mask": np.ascontiguousarray(mask.unsqueeze(1).numpy())}
        empty = np.zeros((b, self.cfg.n_head, 0, self._head), dtype=np.float32)
        for layer in range(self.cfg.n_layer):
            for j, store in enumerate(("keys", "values")):
                past = getattr(cache, store)[layer] if cache is not None else None
                # a no-op view unless reorder() left spare slots
                feeds[self.inputs[3 + 2 * layer + j]] = (
                    empty if past is None else np.ascontiguousarray(past[:, :, :start].numpy()))
        logits, *present = self.session.run(None, feeds)
        if cache is not None:
            for layer in range(self.cfg.n_layer):
                cache.keys[layer] = torch.from_numpy(present[2 * layer])
                cache.values[layer] = torch.from_numpy(present[2 * layer + 1])
            cache.length += t
        return torch.from_numpy(logits)


# ------------------------------------------------------------------- speed


def decode_speed(variants: dict[str, nn.Module], prompts: Sequence[Sequence[int]],
                 batch_sizes: Sequence[int], max_new_tokens: int, eos_id: int, pad_id: int,
                 rounds: int = 1) -> dict[str, dict[str, float]]:
    """Greedy decoding speed of each variant over the same prompts, fp32 activations.

    Rounds interleave the variants (A, B, C, A, B, C ...) so load from elsewhere hits all
    alike; each figure is the median over rounds. Per variant and batch size ``n``:
    ``ms_per_sentence_b<n>`` (wall time / sentences), ``tokens_per_sec_b<n>`` (generated
    tokens / wall time) and ``ms_per_token_b<n>``.
    """
    prompts = [list(p) for p in prompts]
    times: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for round_ in range(rounds):
        names = list(variants)
        names = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in names:
            model = variants[name]
            for n in batch_sizes:
                tokens = 0
                started = time.perf_counter()
                with torch.inference_mode():
                    for lo in range(0, len(prompts), n):
                        out = model.generate_greedy(prompts[lo : lo + n], max_new_tokens,
                                                    eos_id, pad_id)
                        tokens += sum(len(o) + 1 for o in out)  # + the eos (or last) step
                times.setdefault((name, n), []).append((time.perf_counter() - started,
                                                        tokens))
    result: dict[str, dict[str, float]] = {}
    for (name, n), runs in times.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = statistics.median(k for _, k in runs)
        result.setdefault(name, {}).update({
            f"ms_per_sentence_b{n}": 1000 * seconds / len(prompts),
            f"tokens_per_sec_b{n}": tokens / seconds,
            f"ms_per_token_b{n}": 1000 * seconds / tokens,
        })
    return result


# --------------------------------------------------------------- the stage

TABLE_COLUMNS = ["variant", "format", "bleu", "chrf", "ppl_en", "ppl_fr", "num_params",
                 "file_mb"]


def comparison_table(rows: dict[str, dict[str, Any]], baseline: str) -> pd.DataFrame:
    """One row per variant; ``speedup_b<n>`` and ``bleu_delta`` against ``baseline``."""
    table = pd.DataFrame([{"variant": name, **row} for name, row in rows.items()])
    base = rows[baseline]
    for col in [c for c in table.columns if c.startswith("tokens_per_sec_b")]:
        table[f"speedup_{col.rsplit('_', 1)[1]}"] = table[col] / base[col]
    table["bleu_delta"] = table["bleu"] - base["bleu"]
    table["size_ratio"] = table["file_mb"] / base["file_mb"]
    first = [c for c in TABLE_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def plot_comparison(table: pd.DataFrame, png_path: str | Path) -> Path:
    """Bar charts of BLEU, file size and decoding speed, one bar per variant."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    speed = sorted(c for c in table.columns if c.startswith("tokens_per_sec_b"))
    panels = [("bleu", "BLEU"), ("file_mb", "file size (MB)")] + [
        (c, f"greedy tokens/s, batch {c.rsplit('_b', 1)[1]}") for c in speed]
    fig = Figure(figsize=(4 * len(panels), 4), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (col, title) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.barh(table["variant"], table[col], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp)
    return Path(png_path)


def _scores(path: str | Path, what: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise QuantiseError(f"{path}: the {what}'s metrics are missing (dvc repro distil)")
    return read_json(path)


def _load_fp32(path: str | Path, what: str) -> Transformer:
    from lmops.translation import load_model

    path = Path(path)
    if not path.is_dir():
        raise QuantiseError(f"{path}: {what} model not found (dvc repro distil)")
    return load_model(path)[0]


COMPARISON_CSV = "comparison.csv"
COMPARISON_PNG = "comparison.png"
QUALITY_KEYS = ("bleu", "chrf", "ppl_en", "ppl_fr", "test_pairs", "num_params")


def quantise_stage(student_dir: str | Path, teacher_dir: str | Path, vocab_dir: str | Path,
                   clean_dir: str | Path, tokens_dir: str | Path,
                   student_metrics: str | Path, teacher_translations: str | Path,
                   work_dir: str | Path, out_model: str | Path,
                   params: Params) -> tuple[dict[str, Any], pd.DataFrame]:
    """Quantise, score and time every variant; ship the fastest int8 student.

    The fp32 student's scores come from its metrics (distil stage), the fp32 teacher's
    BLEU and chrF from its test translations (evaluate stage) and its perplexity is
    measured here. Writes every variant's model dir and test translations under
    ``work_dir``, the shipped model dir at ``out_model``; returns the metrics and the
    comparison table.
    """
    from lmops.data import read_split
    from lmops.evaluate import (
        MONO_TEST,
        PAIRS_TEST,
        evaluate_model,
        perplexity,
        score_translations,
    )
    from lmops.translation import check_vocab, prompt, read_pairs
    from lmops.vocab import Tokenizer

    cfg, ev = params.quantise, params.evaluate
    tgt_lang = params.clean.target_lang
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    student = _load_fp32(student_dir, "student")
    teacher = _load_fp32(teacher_dir, "teacher")
    tok = Tokenizer.load(vocab_dir)
    check_vocab(student, tok, student_dir)
    teacher_scores = {**score_translations(teacher_translations),
                      **perplexity(teacher, tok, read_split(clean_dir, MONO_TEST), ev)}
    fp32_scores = {"student fp32": _scores(student_metrics, "student"),
                   "teacher fp32": {**teacher_scores, "num_params": teacher.num_params()}}
    pairs = read_pairs(Path(tokens_dir) / PAIRS_TEST)
    prompts = [prompt(tok, s, tgt_lang, student.cfg.block_size)
               for s in pairs["src_ids"].iloc[: cfg.speed_sentences]]
    # quantised kernels and onnxruntime run on the cpu, in fp32 activations
    int8_eval = ev.model_copy(update={"precision": "fp32", "device": "cpu", "n_samples": 0})
    work_dir = Path(work_dir)
    with atomic_output(work_dir, is_dir=True) as tmp:
        dirs = {"student int8": save_int8(student, tmp / "student_int8", {"of": "student"})}
        if cfg.onnx:
            dirs["student onnx int8"] = export_onnx(student, tmp / "student_onnx_int8",
                                                    meta={"of": "student"})
        if cfg.teacher:
            dirs["teacher int8"] = save_int8(teacher, tmp / "teacher_int8", {"of": "teacher"})
        # score what was written: each variant is rebuilt from its files
        models = {name: load_quantised(path, cfg.num_threads) for name, path in dirs.items()}
        scores = dict(fp32_scores)
        for name, model in models.items():
            scores[name], _ = evaluate_model(model, tok, clean_dir, tokens_dir, int8_eval,
                                             tgt_lang, tmp / "eval" / name.replace(" ", "_"))
        pairs_scored = {name: s.get("test_pairs") for name, s in scores.items()}
        if len(set(pairs_scored.values())) != 1:
            raise QuantiseError(f"variants were scored on different test pairs: {pairs_scored}")
        timed: dict[str, nn.Module] = {"teacher fp32": teacher.cpu().eval(),
                                       "student fp32": student.cpu().eval(), **models}
        if not cfg.teacher:
            del timed["teacher fp32"]
        speed = decode_speed(timed, prompts, cfg.speed_batch_sizes,
                             ev.decode.max_new_tokens, tok.eos_id, tok.pad_id, cfg.speed_rounds)
        sizes = {"teacher fp32": file_bytes(teacher_dir), "student fp32": file_bytes(student_dir),
                 **{name: file_bytes(path) for name, path in dirs.items()}}
        formats = {"teacher fp32": "torch-fp32", "student fp32": "torch-fp32",
                   **{name: read_config(path)["format"] for name, path in dirs.items()}}
        rows = {name: {"format": formats[name], **{k: scores[name].get(k) for k in QUALITY_KEYS},
                       "file_mb": sizes[name] / 2**20, **speed.get(name, {})}
                for name in timed}
        table = comparison_table(rows, baseline="student fp32")
        candidates = table[table["variant"].str.startswith("student") & (
            table["format"] != "torch-fp32")]
        speed_cols = [c for c in table.columns if c.startswith("speedup_b")]
        best = candidates.assign(score=candidates[speed_cols].min(axis=1)).sort_values(
            "score", ascending=False).iloc[0]
        shipped = str(best["variant"])
        table["shipped"] = table["variant"] == shipped
        table.to_csv(tmp / COMPARISON_CSV, index=False)
        plot_comparison(table, tmp / COMPARISON_PNG)
    _copy_dir(work_dir / dirs[shipped].name, out_model)
    metrics = _metrics(table, shipped, speed_cols)
    # every variant is timed on the cpu in fp32 activations (see decode_speed)
    metrics["hardware"] = facts(torch.device("cpu"), None, compiled=False)
    return metrics, table


def _copy_dir(src: Path, dst: str | Path) -> None:
    import shutil

    with atomic_output(dst, is_dir=True) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)


def _metrics(table: pd.DataFrame, shipped: str, speed_cols: list[str]) -> dict[str, Any]:
    """Per-variant figures under their names, and the shipped variant's goal figures."""
    out: dict[str, Any] = {"shipped": shipped}
    for row in table.to_dict("records"):
        key = str(row.pop("variant")).replace(" ", "_")
        out[key] = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                    if v is not None and not (isinstance(v, float) and np.isnan(v))}
    ship = out[shipped.replace(" ", "_")]
    out["shipped_size_ratio"] = ship["size_ratio"]
    out["shipped_bleu_delta"] = ship["bleu_delta"]
    for col in speed_cols:
        out[f"shipped_{col}"] = ship[col]
    return out

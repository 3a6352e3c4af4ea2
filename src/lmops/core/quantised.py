"""int8 post-training quantisation for CPU inference, with ONNX Runtime: export, load, time.

**ONNX** (:func:`export_onnx`, :class:`OrtTransformer`): one decoding step (tokens,
positions, attention mask and the past keys/values in; logits and the new keys/values out)
exported with the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``), then quantised by
``onnxruntime.quantization.quantize_dynamic`` (int8 MatMul weights per output channel,
activations quantised at run time). The embedding, tied to the output head, would stay an
fp32 copy and keep most of a small model's bytes, so the lookup is rewritten to gather
from the head's int8 matrix (:func:`_share_embedding`). :class:`OrtTransformer` runs the
session behind the :class:`lmops.core.model.Transformer` decoding methods, so greedy and beam
search, perplexity and :func:`lmops.pipeline.evaluate.evaluate_model` are the same code for every
variant.

On disk it is a model directory like any other (``model.onnx`` + ``config.json`` + sha256
``manifest.json``, see :mod:`lmops.core.checkpoint`); :func:`load_quantised` checks every file
against the manifest before onnxruntime reads it.

There is no PyTorch int8 variant: ``torch.ao`` quantised tensors are deprecated in torch
2.13, torchao's eager int8 (0.18) decoded 3-9x slower than fp32 on a 2-core AVX2 CPU, and
the ONNX int8 student decoded about 3x as fast as the ``torch.ao`` one at batch 1 and
1.3-1.6x at batch 16, at the same file size.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmops.config import ModelConfig
from lmops.core import checkpoint
from lmops.core.checkpoint import CheckpointError
from lmops.core.model import KVCache, Transformer, rotate
from lmops.errors import LmopsError
from lmops.io import atomic_output

log = logging.getLogger(__name__)

ONNX_INT8 = "onnx-int8"
ONNX_FP32 = "onnx-fp32"
ONNX_FILE = "model.onnx"
OPSET = 20  # the default of torch 2.13's exporter: no version conversion after export


class QuantiseError(LmopsError):
    """A quantised model cannot be written, read or run."""


# ----------------------------------------------------------------- on disk


def _write_dir(path: str | Path, files: dict[str, Any], config: dict[str, Any]) -> Path:
    """A model dir at ``path`` (atomically): ``files`` (name -> writer(tmp path)) + config
    + a sha256 manifest, so :func:`lmops.core.checkpoint.verify` checks it before any read."""
    path = Path(path)
    with atomic_output(path, is_dir=True) as tmp:
        for name, write in files.items():
            write(tmp / name)
        (tmp / checkpoint.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        names = sorted(p.name for p in tmp.iterdir())
        manifest = {"sha256": {name: checkpoint.sha256(tmp / name) for name in names}}
        (tmp / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """A quantised model dir's config, every file checked against the manifest first."""
    path = Path(path)
    if not (path / checkpoint.CONFIG).is_file():
        raise CheckpointError(
            f"{path}: no quantised model here ({checkpoint.CONFIG} missing); run the quantise stage"
        )
    config = checkpoint.read_config(path)
    if config.get("format") not in (ONNX_INT8, ONNX_FP32):
        raise CheckpointError(
            f"{path / checkpoint.CONFIG}: not a quantised model "
            f"(format {config.get('format')!r}); run the quantise stage"
        )
    return config


def load_quantised(path: str | Path, num_threads: int = 0) -> OrtTransformer:
    """Rebuild a quantised (ONNX) model dir for decoding and evaluation."""
    path = Path(path)
    config = read_config(path)
    try:
        cfg, vocab = ModelConfig(**config["model"]), int(config["vocab_size"])
        num_params = int(config["num_params"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / checkpoint.CONFIG}: not a model config ({err})") from None
    return OrtTransformer(path / ONNX_FILE, cfg, vocab, num_params, num_threads)


def file_bytes(path: str | Path) -> int:
    """Bytes of the weights file(s) of a model dir (safetensors or ONNX)."""
    path = Path(path)
    return sum(
        f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".onnx", ".data")
    )


# -------------------------------------------------------------------- ONNX


class _OnnxStep(nn.Module):
    """One decoding step of a Transformer with explicit past keys/values, for export.

    Inputs: ``idx`` [B, T], ``positions`` [B, T], ``mask`` [B, 1, T, P + T] (True = attend),
    then ``past_k_0, past_v_0, ...`` [B, H, P, D]. Outputs: logits [B, T, V] and every
    layer's keys/values so far, past and new, [B, H, P + T, D], which the caller feeds back
    as the next step's past without copying them. Same maths as :meth:`Transformer.forward`
    (the tests hold the two to 1e-4).

    It holds copies of the model's tensors, not the model: every matrix transposed to the
    [in, out] operand of its MatMul, so each MatMul reads an initializer (what
    ``quantize_dynamic`` quantises) whatever the exporter's constant folding leaves
    unfolded (it skips large transposes such as the output head's).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        cfg = model.cfg
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.register_buffer("inv_freq", model.get_buffer("inv_freq").detach().clone())
        self.register_buffer("tok_emb", model.tok_emb.weight.detach().clone())
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self.register_buffer(self._key(name), module.weight.detach().t().contiguous())
            elif isinstance(module, nn.RMSNorm):
                self.register_buffer(self._key(name), module.weight.detach().clone())
        self.eps = model.norm.eps

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return F.rms_norm(x, (self.n_embd,), self.get_buffer(self._key(name)), self.eps)

    def _matmul(self, x: Tensor, name: str) -> Tensor:
        return x @ self.get_buffer(self._key(name))

    def forward(self, idx: Tensor, positions: Tensor, mask: Tensor, *past: Tensor):
        angles = (positions.unsqueeze(-1).float() * self.get_buffer("inv_freq")).unsqueeze(1)
        cos, sin = angles.cos(), angles.sin()
        x = F.embedding(idx, self.get_buffer("tok_emb"))
        b, t, c = x.shape
        present = []
        for layer in range(self.n_layer):
            at = f"blocks.{layer}."
            h = self._norm(x, at + "attn_norm")
            qkv = self._matmul(h, at + "attn.qkv").view(b, t, 3, self.n_head, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k = torch.cat([past[2 * layer], k], dim=2)
            v = torch.cat([past[2 * layer + 1], v], dim=2)
            present += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self._matmul(y.transpose(1, 2).reshape(b, t, c), at + "attn.proj")
            h = self._norm(x, at + "mlp_norm")
            gate, up = self._matmul(h, at + "mlp.gate_up").chunk(2, dim=-1)
            x = x + self._matmul(F.silu(gate) * up, at + "mlp.down")
        return (self._matmul(self._norm(x, "norm"), "lm_head"), *present)


def _io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(n_layer) for kv in ("k", "v")]
    new = [f"present_{kv}_{i}" for i in range(n_layer) for kv in ("k", "v")]
    return ["idx", "positions", "mask", *past], ["logits", *new]


def export_onnx(
    model: Transformer, path: str | Path, int8: bool = True, meta: dict[str, Any] | None = None
) -> Path:
    """Export ``model`` as an ONNX model dir (int8-quantised by onnxruntime by default)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from torch.export import Dim

    model = model.cpu().eval()
    cfg = model.cfg
    head = cfg.n_embd // cfg.n_head
    inputs, outputs = _io_names(cfg.n_layer)
    # sizes of 2 or more: torch.export specialises dimensions of size 0 or 1
    b, t, p = 2, 3, 2
    example = (
        torch.zeros(b, t, dtype=torch.long),
        torch.arange(t).repeat(b, 1),
        torch.ones(b, 1, t, p + t, dtype=torch.bool),
        *[torch.zeros(b, cfg.n_head, p, head) for _ in range(2 * cfg.n_layer)],
    )
    # batch, new tokens, past length and their sum vary; the past may be empty at run time
    dyn = Dim.DYNAMIC
    shapes = (
        {0: dyn, 1: dyn},
        {0: dyn, 1: dyn},
        {0: dyn, 2: dyn, 3: dyn},
        tuple({0: dyn, 2: dyn} for _ in range(2 * cfg.n_layer)),
    )

    def write(target: Path) -> None:
        fp32 = target.with_name("fp32.onnx") if int8 else target
        with torch.no_grad():
            program = torch.onnx.export(
                _OnnxStep(model).eval(),
                example,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        assert program is not None  # returned whenever no file is given
        proto = program.model_proto
        # the exporter's per-node provenance (fx names, stack traces with this checkout's
        # paths): 5% of a small int8 file, read by nothing, different on every machine
        for node in proto.graph.node:
            del node.metadata_props[:]
        del proto.graph.metadata_props[:]
        onnx.checker.check_model(proto)
        onnx.save(proto, str(fp32))
        if int8:
            with _quiet_logging():
                quantize_dynamic(
                    str(fp32),
                    str(target),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul"],
                )
            _share_embedding(target, cfg.n_embd, model.vocab_size)
            fp32.unlink()

    config = {
        "format": ONNX_INT8 if int8 else ONNX_FP32,
        "model": cfg.model_dump(),
        "vocab_size": model.vocab_size,
        "num_params": model.num_params(),
        **(meta or {}),
        "onnx": {
            "opset": OPSET,
            "inputs": inputs,
            "outputs": outputs,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        },
    }
    if int8:
        config["quantisation"] = {
            "tool": "onnxruntime.quantization.quantize_dynamic",
            "weights": "int8 per output channel (MatMulInteger)",
            "activations": "dynamic (per tensor, at run time)",
            "embedding": "the output head's int8 matrix, gathered by column and scaled per token",
        }
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
    heads = [
        n
        for n in graph.node
        if n.op_type == "MatMulInteger"
        and n.input[1] in inits
        and list(inits[n.input[1]].dims) == [n_embd, vocab_size]
    ]
    lookups = [
        n
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in inits
        and list(inits[n.input[0]].dims) == [vocab_size, n_embd]
    ]
    if len(heads) != 1 or len(lookups) != 1:
        raise QuantiseError(
            f"{path}: expected one int8 output head and one embedding lookup, "
            f"found {len(heads)} and {len(lookups)}"
        )
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
    methods are the torch model's own. The :class:`lmops.core.model.KVCache` holds the
    session's ``present`` outputs as they are (each layer's buffer is exactly ``length``
    slots long, so the next step feeds it back without a copy); its ``reorder`` works on
    them as on its own buffers.
    """

    _eval_mode = Transformer._eval_mode
    _left_pad = Transformer._left_pad
    new_cache = Transformer.new_cache
    _span_start = Transformer._span_start
    # the decoding loop's own torch ops (argmax, masks, cache bookkeeping) are tiny: on one
    # torch thread, so idle torch worker threads do not spin on the cores onnxruntime needs
    generate_greedy = _on_one_torch_thread(Transformer.generate_greedy)
    generate_beam = _on_one_torch_thread(Transformer.generate_beam)

    def __init__(
        self,
        onnx_path: str | Path,
        cfg: ModelConfig,
        vocab_size: int,
        num_params: int,
        num_threads: int = 0,
    ):
        import onnxruntime as ort

        super().__init__()
        self.cfg, self.vocab_size, self._num_params = cfg, vocab_size, num_params
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = num_threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own unexported exception types
            raise QuantiseError(f"{onnx_path}: onnxruntime cannot load it ({err})") from None
        self.inputs, _ = _io_names(cfg.n_layer)
        self._head = cfg.n_embd // cfg.n_head

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_params(self, exclude_embedding: bool = False) -> int:
        return self._num_params - (self.cfg.n_embd * self.vocab_size if exclude_embedding else 0)

    def forward(
        self, idx: Tensor, cache: KVCache | None = None, positions: Tensor | None = None
    ) -> Tensor:
        b, t = idx.shape
        start = Transformer._span_start(cast(Transformer, self), t, cache)
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
        feeds = {
            "idx": idx.numpy(),
            "positions": positions.contiguous().numpy(),
            "mask": np.ascontiguousarray(mask.unsqueeze(1).numpy()),
        }
        empty = np.zeros((b, self.cfg.n_head, 0, self._head), dtype=np.float32)
        for layer in range(self.cfg.n_layer):
            for j, store in enumerate(("keys", "values")):
                past = getattr(cache, store)[layer] if cache is not None else None
                # a no-op view unless reorder() left spare slots
                feeds[self.inputs[3 + 2 * layer + j]] = (
                    empty if past is None else np.ascontiguousarray(past[:, :, :start].numpy())
                )
        logits, *present = self.session.run(None, feeds)
        if cache is not None:
            for layer in range(self.cfg.n_layer):
                cache.keys[layer] = torch.from_numpy(present[2 * layer])
                cache.values[layer] = torch.from_numpy(present[2 * layer + 1])
            cache.length += t
        return torch.from_numpy(logits)


# ------------------------------------------------------ small batches, fp32


class SmallBatchOnnx:
    """A :class:`Transformer` and its fp32 ONNX export behind the decoding interface.

    Each call decodes on onnxruntime when it has at most ``max_rows`` rows (prompts times
    beams), where its far smaller per-step overhead decides the speed, and on torch above,
    where the matrix multiplies do. Both compute the same fp32 network (the tests hold
    their logits to 1e-4 and their translations equal), and each call is decoded whole by
    one of them, so the choice changes the speed, not the method.
    """

    def __init__(self, model: Transformer, onnx: OrtTransformer, max_rows: int):
        self.model, self.onnx, self.max_rows = model, onnx, max_rows

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def num_params(self, exclude_embedding: bool = False) -> int:
        return self.model.num_params(exclude_embedding)

    def engine(self, rows: int) -> Transformer | OrtTransformer:
        """The model that decodes a call of ``rows`` rows."""
        return self.onnx if rows <= self.max_rows else self.model

    def generate_greedy(
        self, prompts: list[list[int]], *args: Any, **kwargs: Any
    ) -> list[list[int]]:
        """:meth:`Transformer.generate_greedy` on the engine for ``len(prompts)`` rows."""
        return self.engine(len(prompts)).generate_greedy(prompts, *args, **kwargs)

    def generate_beam(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        beam_size: int = 4,
        **kwargs: Any,
    ) -> list[list[int]]:
        """:meth:`Transformer.generate_beam` on the engine for ``len(prompts) * beam_size`` rows."""
        model = self.engine(len(prompts) * beam_size)
        return model.generate_beam(
            prompts, max_new_tokens, eos_id, pad_id, beam_size=beam_size, **kwargs
        )


# ------------------------------------------------------------------- speed


def decode_speed(
    variants: dict[str, nn.Module],
    prompts: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    rounds: int = 1,
) -> dict[str, dict[str, float]]:
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
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            model: Any = variants[name]  # a Transformer, or a class borrowing its decoding
            for n in batch_sizes:
                tokens = 0
                started = time.perf_counter()
                with torch.inference_mode():
                    for lo in range(0, len(prompts), n):
                        out = model.generate_greedy(
                            prompts[lo : lo + n], max_new_tokens, eos_id, pad_id
                        )
                        tokens += sum(len(o) + 1 for o in out)  # + the eos (or last) step
                times.setdefault((name, n), []).append((time.perf_counter() - started, tokens))
    result: dict[str, dict[str, float]] = {}
    for (name, n), runs in times.items():
        seconds = statistics.median(s for s, _ in runs)
        new_tokens = statistics.median(k for _, k in runs)
        result.setdefault(name, {}).update(
            {
                f"ms_per_sentence_b{n}": 1000 * seconds / len(prompts),
                f"tokens_per_sec_b{n}": new_tokens / seconds,
                f"ms_per_token_b{n}": 1000 * seconds / new_tokens,
            }
        )
    return result

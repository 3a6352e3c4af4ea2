"""Typed schema for ``params.yaml``: the single source of truth for every knob.

Every section is a pydantic model that forbids unknown keys, so a typo in
``params.yaml`` stops a stage with an error naming the key instead of being
silently ignored. Defaults live here and nowhere else; ``params.yaml`` only
overrides them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmops.errors import LmopsError

DEFAULT_PARAMS = "params.yaml"


class ConfigError(LmopsError):
    """``params.yaml`` is missing, unparsable, or fails the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------- data


class SourceConfig(_Section):
    """One raw corpus. Every kind goes through ``datasets``, the same code path."""

    name: str = Field(description="Short id used in stats and logs.")
    type: Literal["embedded", "text", "json", "csv", "parquet", "hub"] = Field(
        description="embedded: a corpus shipped by an installed package; text/json/csv/"
        "parquet: local files; hub: a Hugging Face hub dataset (needs network)."
    )
    role: Literal["monolingual", "parallel"] = Field(description="Plain text or aligned pairs.")
    dataset: str | None = Field(
        default=None,
        description="embedded: wiki_en | wiki_fr | bible_en_fr; hub: the dataset id.",
    )
    hub_config: str | None = Field(default=None, description="hub: dataset config name.")
    hub_split: str = Field(default="train", description="hub: split to load.")
    path: str | list[str] | None = Field(
        default=None, description="Local file(s) or glob(s) for text/json/csv/parquet."
    )
    src_path: str | None = Field(
        default=None, description="parallel text: source-side file, one sentence a line."
    )
    tgt_path: str | None = Field(
        default=None, description="parallel text: target-side file aligned line by line."
    )
    lang: str | None = Field(default=None, description="monolingual: language code of the text.")
    text_column: str = Field(default="text", description="monolingual: column holding the text.")
    src_column: str | None = Field(
        default=None, description="parallel: source column (default: clean.source_lang)."
    )
    tgt_column: str | None = Field(
        default=None, description="parallel: target column (default: clean.target_lang)."
    )
    group_column: str | None = Field(
        default=None,
        description="parallel: column whose values are held out whole (e.g. Bible book).",
    )
    max_rows: int | None = Field(
        default=None, gt=0, description="Keep only the first N rows (quick runs, tests)."
    )
    split: Literal["train", "valid", "test"] | None = Field(
        default=None,
        description="The split every row of this source goes to: a corpus's own train, "
        "dev or test files (None: as clean.split says).",
    )
    split_column: str | None = Field(
        default=None,
        description="json/csv/parquet/hub: a column naming each row's split: train, valid "
        "(or validation, dev) or test.",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        where = f"clean.sources[{self.name}]"
        if self.split and self.split_column:
            raise ValueError(f"{where}: give 'split' or 'split_column', not both")
        if (self.split or self.split_column) and self.group_column:
            raise ValueError(
                f"{where}: 'group_column' holds groups out by clean.split; with "
                "'split' or 'split_column' the source names its splits itself: drop one"
            )
        if self.split_column and self.type in ("embedded", "text"):
            raise ValueError(
                f"{where}: 'split_column' needs a source with columns, not {self.type}"
            )
        if self.type in ("embedded", "hub") and not self.dataset:
            raise ValueError(f"{where}: type '{self.type}' needs 'dataset'")
        if self.type in ("json", "csv", "parquet") and not self.path:
            raise ValueError(f"{where}: type '{self.type}' needs 'path'")
        if self.type == "text":
            two_files = self.src_path is not None or self.tgt_path is not None
            if self.role == "parallel":
                if not (self.src_path and self.tgt_path):
                    raise ValueError(f"{where}: parallel text needs 'src_path' and 'tgt_path'")
            elif two_files or not self.path:
                raise ValueError(f"{where}: monolingual text needs 'path'")
        if self.role == "monolingual" and self.type != "embedded" and not self.lang:
            raise ValueError(f"{where}: monolingual source needs 'lang'")
        return self


class SplitConfig(_Section):
    """How cleaned data is split into train / valid / test."""

    valid_fraction: float = Field(
        default=0.02, ge=0, lt=0.5, description="Monolingual text held out for validation."
    )
    test_fraction: float = Field(
        default=0.02, ge=0, lt=0.5, description="Monolingual text held out for perplexity."
    )
    valid_groups: list[str] = Field(
        default_factory=lambda: ["Ruth", "Jonah"],
        description="Parallel groups (values of group_column) held out whole for validation.",
    )
    test_groups: list[str] = Field(
        default_factory=lambda: ["Mark"],
        description="Parallel groups held out whole for the test set.",
    )
    parallel_valid_fraction: float = Field(
        default=0.02,
        ge=0,
        lt=0.5,
        description="Parallel sources without group_column: random share for validation.",
    )
    parallel_test_fraction: float = Field(
        default=0.03,
        ge=0,
        lt=0.5,
        description="Parallel sources without group_column: random share for test.",
    )
    max_held_out_rows: int | None = Field(
        default=5000,
        ge=1,
        description="Random splits: the most rows a source's valid share, and its test "
        "share, hold (the fraction gives fewer on small corpora). Keeps held-out sets, "
        "evaluation and the leak check's memory bounded on big corpora; null: no cap.",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> SplitConfig:
        both = set(self.valid_groups) & set(self.test_groups)
        if both:
            raise ValueError(f"clean.split: groups in both valid and test: {sorted(both)}")
        return self


class CleanConfig(_Section):
    source_lang: str = Field(default="en", description="Language translated from.")
    target_lang: str = Field(default="fr", description="Language translated into.")
    sources: list[SourceConfig] = Field(description="Raw corpora to load.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    min_chars: int = Field(default=3, ge=1, description="Drop texts shorter than this.")
    max_chars: int = Field(default=2000, ge=1, description="Drop texts longer than this.")
    max_line_bytes: int = Field(
        default=1 << 20,
        ge=1,
        description="text sources: a line longer than this (bytes) stops the stage, naming "
        "the line; a file without line breaks is not one text a line. Longer than max_chars "
        "but within this, a text is dropped and counted as too_long.",
    )
    max_length_ratio: float = Field(
        default=3.0, gt=1, description="Drop pairs whose char-length ratio exceeds this."
    )
    dedup: bool = Field(default=True, description="Remove exact duplicates.")
    format: Literal["parquet", "jsonl"] = Field(
        default="parquet", description="Shard format: parquet, or jsonl for small data."
    )
    batch_rows: int = Field(
        default=10_000,
        ge=1,
        description="Rows cleaned, de-duplicated, split and leak-checked at a time: the "
        "stage's memory is bounded by this (times max_chars), not by the corpus.",
    )
    shard_rows: int = Field(
        default=100_000, ge=1, description="Rows per output shard of a split (the last shorter)."
    )
    num_proc: int = Field(
        default=2, ge=1, description="Processes that clean text, threads that leak-check it."
    )

    @model_validator(mode="after")
    def _check(self) -> CleanConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError("clean.min_chars must be below clean.max_chars")
        if self.max_line_bytes < 4 * self.max_chars:  # UTF-8: up to 4 bytes a character
            raise ValueError(
                f"clean.max_line_bytes ({self.max_line_bytes}) must be at least "
                f"4 x clean.max_chars ({4 * self.max_chars})"
            )
        if self.source_lang == self.target_lang:
            raise ValueError("clean.source_lang and clean.target_lang must differ")
        if not self.sources:
            raise ValueError("clean.sources: at least one source is needed")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"clean.sources: duplicate names in {names}")
        return self

    @property
    def languages(self) -> list[str]:
        return [self.source_lang, self.target_lang]


class ValidateConfig(_Section):
    """Great Expectations thresholds for the cleaned data."""

    min_rows: int = Field(default=10, ge=1, description="Each split must have this many rows.")
    min_chars: int = Field(default=1, ge=1, description="Shortest allowed text.")
    max_chars: int = Field(default=5000, ge=1, description="Longest allowed text.")
    max_duplicate_rate: float = Field(
        default=0.01, ge=0, le=1, description="Largest share of duplicate texts in a split."
    )
    min_script_fraction: float = Field(
        default=0.98,
        ge=0,
        le=1,
        description="Share of rows that must use only the language's expected script.",
    )
    max_length_ratio: float = Field(
        default=3.0, gt=1, description="Pair char-length ratio bound (either direction)."
    )
    min_length_ratio_fraction: float = Field(
        default=0.98, ge=0, le=1, description="Share of pairs that must be within the ratio."
    )
    sample_rows: int = Field(
        default=100_000,
        ge=1,
        description="The checks that need a whole split (row count, duplicate rate) run on a "
        "seeded sample of this many rows (all rows of a smaller split); the others run on "
        "every row, shard by shard.",
    )
    sample_seed: int = Field(default=0, description="Seed of that sample.")

    @model_validator(mode="after")
    def _check(self) -> ValidateConfig:
        if self.sample_rows < self.min_rows:  # else the row count would fail on the sample
            raise ValueError(
                f"validate.sample_rows ({self.sample_rows}) must be at least "
                f"validate.min_rows ({self.min_rows})"
            )
        return self


class VocabConfig(_Section):
    model_type: Literal["unigram", "bpe"] = Field(default="unigram", description="Algorithm.")
    vocab_size: int = Field(default=8000, ge=64, le=1_000_000, description="Pieces in total.")
    character_coverage: float = Field(default=0.9995, gt=0, le=1, description="Chars covered.")
    input_sentence_size: int = Field(
        # SentencePiece needs about 6 KB a sentence of 260 characters: 1.9 GB at this cap,
        # whatever the corpus (the default mono_train has 78,683 rows, all of them taken)
        default=300_000,
        ge=1,
        description="Sentences sampled for training (caps memory).",
    )
    byte_fallback: bool = Field(default=True, description="Unknown chars become byte pieces.")
    num_threads: int = Field(default=2, ge=1, description="Trainer threads.")


class TokeniseConfig(_Section):
    num_proc: int = Field(default=2, ge=1, description="datasets.map worker processes.")
    batch_size: int = Field(default=1000, ge=1, description="Rows per map batch.")


# ---------------------------------------------------------------- modelling


class ModelConfig(_Section):
    """Decoder-only transformer size. The vocabulary size comes from the vocab stage."""

    n_layer: int = Field(default=4, ge=1, description="Transformer blocks.")
    n_embd: int = Field(default=256, ge=8, description="Residual width.")
    n_head: int = Field(default=4, ge=1, description="Attention heads.")
    block_size: int = Field(default=128, ge=8, description="Context length in tokens.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout in attention/MLP.")
    mlp_ratio: float = Field(default=8 / 3, gt=0, description="SwiGLU hidden width / n_embd.")
    rope_theta: float = Field(default=10000.0, gt=0, description="Rotary base frequency.")

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("model.n_embd / model.n_head must be even (rotary embeddings)")
        return self


Precision = Literal["auto", "fp32", "bf16"]
PRECISION_HELP = (
    "auto: bf16 autocast where the hardware has bf16 arithmetic (CUDA that "
    "reports it, CPUs with AVX-512 BF16 or AMX, Arm BF16), else fp32; a forced "
    "bf16 on a CPU without it is emulated, about 80x slower than fp32."
)


class TrainConfig(_Section):
    """One training run; shared by pretrain, finetune and distil."""

    max_steps: int = Field(default=1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(default=16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimiser step.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(default=1e-4, ge=0, description="Learning rate at the end of decay.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    beta1: float = Field(default=0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip grad norm (0 = off).")
    eval_interval: int = Field(default=200, ge=1, description="Steps between evaluations.")
    eval_batches: int = Field(default=20, ge=1, description="Batches per evaluation.")
    checkpoint_interval: int = Field(default=200, ge=1, description="Steps between checkpoints.")
    log_interval: int = Field(default=10, ge=1, description="Steps between metric logs.")
    precision: Precision = Field(default="auto", description=PRECISION_HELP)
    compile: bool | Literal["auto"] = Field(
        default=False,
        description="torch.compile the model. auto: where it pays (CUDA, and "
        "CPUs training in bf16); on a CPU in fp32 it was slower than eager.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="Device.")
    nproc: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Data-parallel processes; the stage relaunches itself under "
        "torchrun for more than 1. auto: one per visible CUDA device when the device is "
        "cuda, else 1. The result is that of one process (the global batch stays "
        "batch_size x grad_accum).",
    )
    max_loss: float = Field(
        default=20.0, gt=0, description="Stop as diverged when the loss exceeds this."
    )
    num_threads: int = Field(default=0, ge=0, description="torch CPU threads (0 = default).")

    @model_validator(mode="after")
    def _lr(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        if self.warmup_steps > self.max_steps:
            raise ValueError("warmup_steps must not exceed max_steps")
        return self


class FinetuneConfig(TrainConfig):
    """Fine-tuning; each evaluation (every eval_interval steps) also scores validation BLEU."""

    bleu_samples: int = Field(
        default=64,
        ge=1,
        description="Validation pairs translated (greedy, evaluate.decode's guards) for BLEU.",
    )
    lm_mix: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of each batch that is pretraining text (language-model replay), "
        "so the translator keeps its perplexity on plain text.",
    )
    lm_mix_text: Literal["monolingual", "all"] = Field(
        default="monolingual",
        description="Text the lm_mix rows are drawn from. monolingual: the pretraining "
        "text of the monolingual sources, without the training pairs' own sentences, which "
        "the pairs already teach (a corpus of pairs alone: those sentences); all: the "
        "whole pretraining text.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of each target's probability spread over the vocabulary in the "
        "training loss (validation loss and perplexity stay plain cross-entropy).",
    )
    freeze_unused_embeddings: bool = Field(
        default=True,
        description="Keep the embedding rows of tokens that occur in no training pair as "
        "pretrained, so the translator keeps modelling the plain text those tokens come from.",
    )


class DecodeConfig(_Section):
    beam_size: int = Field(default=4, ge=1, description="Beam width (1 = greedy).")
    length_penalty: float = Field(default=1.0, ge=0, description="GNMT-style length penalty.")
    max_new_tokens: int = Field(default=96, ge=1, description="Longest translation.")
    min_new_tokens: int = Field(
        default=0,
        ge=0,
        description="Shortest translation: end-of-sentence is barred before this many tokens.",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> DecodeConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                f"({self.max_new_tokens})"
            )
        return self

    batch_size: int = Field(default=32, ge=1, description="Sentences decoded together.")
    no_repeat_ngram_size: int = Field(
        default=0,
        ge=0,
        description="No n-gram of this size twice in one output (0 = off); only the "
        "generated tokens count, not the source.",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0,
        description="Logits of tokens already generated are divided by this where "
        "positive, multiplied where negative (1 = off; as Hugging Face generate).",
    )


def _evaluate_decode() -> DecodeConfig:
    # no 4-gram twice: the best validation BLEU of bench/decode_guards.py, and no test
    # translation left running to max_new_tokens or looping (3.0% without it)
    return DecodeConfig(no_repeat_ngram_size=4)


class EvaluateConfig(_Section):
    decode: DecodeConfig = Field(
        default_factory=_evaluate_decode,
        description="How test sentences are translated, and the served model's defaults.",
    )

    @field_validator("decode", mode="before")
    @classmethod
    def _decode_defaults(cls, value: Any) -> Any:
        """Keys a params file leaves out take evaluate's defaults, not DecodeConfig's."""
        if isinstance(value, dict):
            return {**_evaluate_decode().model_dump(), **value}
        return value

    max_test_pairs: int | None = Field(
        default=None, gt=0, description="Score only the first N test pairs (None = all)."
    )
    n_samples: int = Field(default=20, ge=0, description="Sample translations to show.")
    ppl_batch_size: int = Field(default=16, ge=1, description="Sequences per perplexity batch.")
    precision: Precision = Field(default="auto", description=PRECISION_HELP)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="Device.")


def _student_model() -> ModelConfig:
    # 3 x 128: 31% of the default 4 x 256 teacher's parameters (vocab 8000, tied embedding)
    return ModelConfig(n_layer=3, n_embd=128, n_head=2)


class DistilConfig(TrainConfig):
    """Knowledge distillation of the fine-tuned teacher into a smaller student.

    ``word``: the loss is ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` on
    the target tokens, both distributions softened by the temperature T. ``sequence``: plain
    cross-entropy on the teacher's beam-search translations of the training sources.
    Each evaluation scores validation BLEU (greedy, with evaluate.decode's guards); the
    best-BLEU weights are kept.
    """

    model: ModelConfig = Field(
        default_factory=_student_model,
        description="Student size (like `model`); block_size must equal the teacher's.",
    )
    method: Literal["word", "sequence"] = Field(
        default="word",
        description="word: KL to the teacher's soft targets mixed with CE; "
        "sequence: CE on the teacher's beam-search translations.",
    )
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="word: weight of the KL term; 1 - alpha weighs the cross-entropy.",
    )
    temperature: float = Field(
        default=2.0,
        gt=0,
        description="word: softmax temperature of teacher and student.",
    )
    init: Literal["scratch", "pruned"] = Field(
        default="pruned",
        description="scratch: random weights; pruned: a copy of the "
        "teacher cut to the student's shape: the layers keep_layers and, in them, the "
        "residual channels, heads and MLP neurons the teacher uses most (needs the "
        "teacher's head width, no dimension larger than the teacher's).",
    )
    keep_layers: list[int] | None = Field(
        default=None,
        description="pruned: teacher block indices to keep, in order "
        "(None: model.n_layer evenly spaced ones, first and last included).",
    )
    sequence_decode: DecodeConfig = Field(
        default_factory=DecodeConfig,
        description="sequence: how the teacher translates the training sources.",
    )
    sequence_max_pairs: int | None = Field(
        default=2000,
        gt=0,
        description="sequence: training pairs the teacher translates (None = all of them).",
    )
    bleu_samples: int = Field(
        default=64,
        ge=1,
        description="Validation pairs translated (greedy, evaluate.decode's guards) for BLEU.",
    )

    @model_validator(mode="after")
    def _layers(self) -> DistilConfig:
        if self.keep_layers is not None:
            if len(self.keep_layers) != self.model.n_layer:
                raise ValueError(
                    f"distil.keep_layers has {len(self.keep_layers)} entries, "
                    f"distil.model.n_layer is {self.model.n_layer}"
                )
            if len(set(self.keep_layers)) != len(self.keep_layers) or min(self.keep_layers) < 0:
                raise ValueError("distil.keep_layers must be distinct non-negative indices")
        return self


class QuantiseConfig(_Section):
    """int8 post-training quantisation for CPU inference (ONNX export, onnxruntime
    ``quantize_dynamic``), and the speed measurements."""

    teacher: bool = Field(
        default=True,
        description="Quantise and score the teacher too, for comparison.",
    )
    max_bleu_drop: float = Field(
        default=0.5,
        ge=0,
        description="An int8 variant ships only if its test BLEU is at most this far below "
        "the fp32 student's; of those, the smallest file ships. None within it: the stage "
        "fails.",
    )
    speed_sentences: int = Field(
        default=64,
        ge=1,
        description="Test sources decoded (greedy) to time each variant.",
    )
    speed_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 16],
        description="Batch sizes timed.",
    )
    speed_rounds: int = Field(
        default=1,
        ge=1,
        description="Timing rounds, variants interleaved; the median counts.",
    )
    num_threads: int = Field(
        default=0,
        ge=0,
        description="torch and onnxruntime CPU threads (0 = default).",
    )

    @model_validator(mode="after")
    def _batches(self) -> QuantiseConfig:
        if not self.speed_batch_sizes or min(self.speed_batch_sizes) < 1:
            raise ValueError("quantise.speed_batch_sizes: one or more positive batch sizes")
        return self


class RetrainConfig(_Section):
    """Scheduled retraining (flows/retrain.py): when a challenger replaces the champion."""

    model_name: str = Field(
        default="lmops-translator",
        description="The registered model in MLflow.",
    )
    min_bleu_gain: float = Field(
        default=0.5,
        description="Test BLEU the challenger must gain over the champion to replace it.",
    )
    max_ppl_increase: float = Field(
        default=0.05,
        ge=0.0,
        description="The most the challenger's held-out perplexity may rise over the "
        "champion's in any language, relative (0.05 = 5%); per byte, so vocabularies compare.",
    )


class ServeConfig(_Section):
    """Bounds on one translation request, checked before any work: the served model (they
    travel with it when it is registered) and ``lmops translate``."""

    max_rows: int = Field(default=256, ge=1, description="Sentences in one request.")
    max_source_chars: int = Field(
        default=2000, ge=1, description="Characters in one source sentence."
    )
    max_beam_size: int = Field(default=8, ge=1, description="Largest beam_size a request may ask.")
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Largest max_new_tokens a request may ask (None = the model's block_size, "
        "the longest output it was trained to attend to).",
    )
    deadline_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request may decode; past it the work stops and the request "
        "fails (keep it under MLflow's 60 s request timeout).",
    )
    # on the default model size, fp32, with torch's prepacked weights: onnxruntime decodes
    # one sentence 1.8x as fast as torch greedy, 1.2x at beam 4 (4 rows), 4 greedy rows
    # 1.3x; from 8 rows on torch is as fast or faster (bench/results/decode.md)
    onnx_max_rows: int = Field(
        default=4,
        ge=0,
        description="The served model decodes up to this many rows at a time (sentences x "
        "beams) on its fp32 ONNX export with onnxruntime, faster there, and larger batches "
        "on torch; 0 = torch only, and no export is logged.",
    )


# ----------------------------------------------------------------- the file


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = Field(default=1337, description="Seed for every random choice.")
    clean: CleanConfig
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    tokenise: TokeniseConfig = Field(default_factory=TokeniseConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    distil: DistilConfig = Field(default_factory=DistilConfig)
    quantise: QuantiseConfig = Field(default_factory=QuantiseConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if loc else f"  {msg}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = DEFAULT_PARAMS) -> Params:
    """Validate an already-loaded mapping; errors name the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data or {}


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``."""
    return parse_params(_read_yaml(Path(path)), str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_profile(profile: str | Path, base: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """``params.yaml`` with a profile's overrides (e.g. ``params.tiny.yaml``) merged in.

    Returns the merged mapping after validating it, ready to be written as a params file.
    """
    merged = deep_merge(_read_yaml(Path(base)), _read_yaml(Path(profile)))
    parse_params(merged, f"{base} + {profile}")
    return merged


def dvc_set_args(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run`` from a profile's overrides."""
    args: list[str] = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            args += dvc_set_args(value, f"{name}.")
        else:
            args += [
                "-S",
                f"{name}={yaml.safe_dump(value, default_flow_style=True).strip()}".removesuffix(
                    "\n..."
                ),
            ]
    return args


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a section to ``{"a.b": value}`` for logging to MLflow."""
    data = params.model_dump(by_alias=True) if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out

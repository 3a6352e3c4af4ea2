"""Token streams: the tokenise stage's flat id files that pretraining reads.

pretrain_{train,valid}.bin    one flat token stream: for each mono row
                              ``<2lang> ids </s>``, concatenated; raw numpy
                              array (uint16 when every id fits, else uint32)
pretrain_{train,valid}.json   sidecar: dtype, length (tokens), documents,
                              bytes (utf-8 bytes of the text), vocab_size,
                              monolingual_tokens (the leading tokens that are
                              monolingual text; the rest are the sides of the
                              training pairs, which the clean stage puts last)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from lmops.errors import LmopsError
from lmops.io import write_json

TRAIN_STREAM = "pretrain_train"
VALID_STREAM = "pretrain_valid"
STREAM_SPLITS = {"mono_train": "pretrain_train", "mono_valid": "pretrain_valid"}
ID_TYPE = datasets.Value("int32")
STREAM_FEATURES = datasets.Features({"ids": datasets.List(ID_TYPE)})


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,536 pieces (half the disk and page cache of uint32), else uint32."""
    return np.dtype(np.uint16 if vocab_size < 1 << 16 else np.uint32)


def write_stream(
    encoded: datasets.Dataset,
    path: Path,
    vocab_size: int,
    text_bytes: int,
    monolingual_rows: int | None = None,
    chunk_rows: int = 10_000,
) -> dict[str, Any]:
    """Append the ``ids`` of ``encoded`` to ``path`` (.bin) chunk by chunk; write the sidecar.
    ``monolingual_rows``: how many leading rows are monolingual text (default: all)."""
    dtype = stream_dtype(vocab_size)
    length = 0
    rows_left = len(encoded) if monolingual_rows is None else monolingual_rows
    monolingual = 0
    arrow = encoded.with_format("arrow")
    with (
        open(path, "wb") as fh,
        tqdm(total=len(encoded), desc=f"write {path.name}", unit=" docs") as bar,
    ):
        for table in arrow.iter(batch_size=chunk_rows):
            ids = pc.list_flatten(table.column("ids")).to_numpy()
            # An id past the dtype would wrap around silently and corrupt the stream.
            if ids.size and int(ids.max()) >= vocab_size:
                raise LmopsError(f"{path}: token id {int(ids.max())} >= vocab_size {vocab_size}")
            # fh.write, not ndarray.tofile: a short write (disk full) raises with its errno
            fh.write(ids.astype(dtype).tobytes())
            if rows_left > 0:
                lengths = pc.list_value_length(table.column("ids")).to_numpy()
                monolingual += int(lengths[:rows_left].sum())
                rows_left -= len(lengths)
            length += int(ids.size)
            bar.update(table.num_rows)
    sidecar = {
        "dtype": dtype.name,
        "length": length,
        "documents": len(encoded),
        "bytes": text_bytes,
        "vocab_size": vocab_size,
        "monolingual_tokens": monolingual,
    }
    write_json(path.with_suffix(".json"), sidecar)
    return sidecar


def monolingual_part(stream: np.ndarray, path: str | Path) -> np.ndarray:
    """The leading monolingual text of ``stream`` (read from ``path``, see the module's
    docstring); a stream whose sidecar doesn't say is refused, as the tokenise stage
    wrote it before the field existed."""
    side_path = _paths(path)[1]
    side = json.loads(side_path.read_text(encoding="utf-8"))
    if "monolingual_tokens" not in side:
        raise LmopsError(f"{side_path}: no 'monolingual_tokens'; rerun the tokenise stage")
    return stream[: int(side["monolingual_tokens"])]


def _paths(path: str | Path) -> tuple[Path, Path]:
    """A token stream's .bin and .json; ``path`` may name the .bin or leave the extension off."""
    path = Path(path)
    bin_path = path if path.suffix == ".bin" else path.with_name(path.name + ".bin")
    return bin_path, bin_path.with_suffix(".json")


def load_stream(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a token stream; ``path`` may name the .bin or leave the extension off.

    Given ``vocab_size`` (the vocabulary it will be read with), a stream made with another
    vocabulary is refused: its ids would mean other pieces, or index past the embedding.
    """
    bin_path, side_path = _paths(path)
    if not side_path.is_file():
        raise LmopsError(f"{side_path}: token stream sidecar not found (run the tokenise stage)")
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
        dtype = np.dtype(side["dtype"])
        expected = int(side["length"]) * dtype.itemsize
    except (ValueError, TypeError, KeyError) as err:
        raise LmopsError(f"{side_path}: not a token stream sidecar ({err!r})") from None
    if vocab_size is not None and side.get("vocab_size") != vocab_size:
        raise LmopsError(
            f"{side_path}: tokens made with a vocabulary of {side.get('vocab_size')} pieces, "
            f"but this vocabulary has {vocab_size}; rerun the tokenise stage"
        )
    if not bin_path.is_file():
        raise LmopsError(f"{bin_path}: token stream not found (run the tokenise stage)")
    actual = bin_path.stat().st_size
    if actual != expected:
        raise LmopsError(
            f"{bin_path}: expected {side['length']} {dtype.name} tokens ({expected} bytes, "
            f"per {side_path.name}) but the file has {actual} bytes; rerun the tokenise stage"
        )
    if expected == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(side["length"]),))

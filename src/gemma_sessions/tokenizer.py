"""Exact Gemma tokenization (SentencePiece BPE with byte fallback, no dummy prefix), in pure Python.

Contract:

* Ids are identical to llama.cpp's ``llm_tokenizer_spm`` (``llama-vocab.cpp``) called with
  ``parse_special=False``; the parity tests check this against llama-cpp-python and transformers.
* Pure Python: sentencepiece, tokenizers and transformers are never imported at run time (the tests use
  them as references only). GGUF metadata and the SentencePiece ``ModelProto`` are parsed by hand.
* User text is plain text. Control tokens (``<start_of_turn>``, ``<bos>`` ...) are never produced from
  text: typed out, they are tokenized as ordinary characters (no prompt injection). User-defined tokens
  (whitespace runs, html tags such as ``<table>``) are matched in the raw text before BPE, exactly like
  llama.cpp's ``tokenizer_st_partition``: longest token (in UTF-8 bytes) first, each one taking its
  leftmost non-overlapping occurrences in the text that earlier tokens left over.
* Each remaining fragment has " " replaced by "▁" (no dummy prefix), is split into characters, and the
  adjacent pair whose concatenation is a vocabulary piece with the highest score is merged repeatedly
  (ties: leftmost first). A final symbol that is no piece becomes ``<0xNN>`` byte tokens.
* ``decode`` maps byte tokens back to bytes and decodes UTF-8 with ``errors="replace"``; control, unknown
  and unused tokens are dropped when ``skip_special`` (else rendered as their text). A
  :class:`StreamDecoder` yields the same text incrementally and never emits half a UTF-8 character.
* Text containing lone surrogates (not valid Unicode scalar values) has them replaced by U+FFFD.
* Bad tokenizer files raise :class:`~gemma_sessions.errors.TokenizerError`.
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import json
import os
import re
import struct
from array import array
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import TokenizerError

__all__ = ["StreamDecoder", "Tokenizer"]

# Token types, numbered as in GGUF (and SentencePiece's ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_DROPPED_WHEN_SKIPPING = frozenset({UNKNOWN, CONTROL, UNUSED})
_KNOWN_TYPES = frozenset({NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINE_RUNS = re.compile(r"[^\n]+|\n+")


def _gguf_metadata(source: Any) -> dict[str, Any]:
    """GGUF key/values from a path, a parsed GGUFFile, or a ``gguf.GGUFReader`` (its memory-mapped bytes)."""
    from .errors import ModelError
    from .models.gguf_file import GGUFFile

    if hasattr(source, "metadata") and isinstance(source.metadata, dict):
        return source.metadata
    if not isinstance(source, (str, os.PathLike)):
        source = getattr(source, "data", None)
        if source is None:
            raise TokenizerError("expected a path, a GGUFFile or a gguf.GGUFReader")
    try:
        return GGUFFile(source).metadata
    except ModelError as exc:
        raise TokenizerError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model (protobuf wire format, hand-parsed)
# --------------------------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TokenizerError("malformed protobuf varint")


def _proto_fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(field_number, value)``: an int for varints and fixed ints, ``(start, end)`` for length-delimited."""
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise TokenizerError("truncated protobuf message")
        yield field, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_piece(buf: bytes, start: int, end: int) -> tuple[str, float, int]:
    piece, score, ptype = "", 0.0, NORMAL
    for field, value in _proto_fields(buf, start, end):
        if field == 1:
            piece = buf[value[0] : value[1]].decode("utf-8")
        elif field == 2:
            score = struct.unpack("<f", value)[0]
        elif field == 3:
            ptype = value
    return piece, score, ptype


# TrainerSpec fields and their proto2 defaults; NormalizerSpec fields likewise.
_TRAINER_FIELDS = {3: ("model_type", 1), 40: ("unk_id", 0), 41: ("bos_id", 1), 42: ("eos_id", 2), 43: ("pad_id", -1)}
_NORMALIZER_FIELDS = {3: ("add_dummy_prefix", 1), 4: ("remove_extra_whitespaces", 1)}
_BPE_MODEL = 2


def _parse_submessage(buf: bytes, span: tuple[int, int], fields: dict[int, tuple[str, int]]) -> dict[str, Any]:
    out = {name: default for name, default in fields.values()}
    for field, value in _proto_fields(buf, span[0], span[1]):
        if field in fields:
            out[fields[field][0]] = _int32(value)
        elif field == 1 and fields is _NORMALIZER_FIELDS:
            out["name"] = buf[value[0] : value[1]].decode("utf-8")
    return out


def _parse_model_proto(buf: bytes) -> tuple[list[str], list[float], list[int], dict[str, Any]]:
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer = _parse_submessage(buf, (0, 0), _TRAINER_FIELDS)
    normalizer = _parse_submessage(buf, (0, 0), _NORMALIZER_FIELDS)
    for field, value in _proto_fields(buf, 0, len(buf)):
        if field == 1:
            piece, score, ptype = _parse_piece(buf, *value)
            pieces.append(piece)
            scores.append(score)
            types.append(ptype)
        elif field == 2:
            trainer = _parse_submessage(buf, value, _TRAINER_FIELDS)
        elif field == 3:
            normalizer = _parse_submessage(buf, value, _NORMALIZER_FIELDS)
    _check_spm_model(trainer, normalizer)
    return pieces, scores, types, trainer


def _check_spm_model(trainer: dict[str, Any], normalizer: dict[str, Any]) -> None:
    if trainer["model_type"] != _BPE_MODEL:
        raise TokenizerError(f"tokenizer.model is not a BPE model (model_type={trainer['model_type']})")
    if normalizer["add_dummy_prefix"] or normalizer["remove_extra_whitespaces"]:
        raise TokenizerError("tokenizer.model normalizes text (dummy prefix / whitespace folding): not Gemma")
    if normalizer.get("name", "identity") not in ("identity", ""):
        raise TokenizerError(f"tokenizer.model uses normalizer {normalizer['name']!r}; only identity is supported")


# --------------------------------------------------------------------------------------------------------------
# Hugging Face directory helpers
# --------------------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_special_names(directory: Path) -> dict[str, str]:
    """bos/eos/pad/unk token texts from special_tokens_map.json, overridden by tokenizer_config.json."""
    names: dict[str, str] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / filename
        if path.is_file():
            config = _load_json(path)
            for key in ("bos", "eos", "pad", "unk"):
                content = _token_content(config.get(f"{key}_token"))
                if content is not None:
                    names[key] = content
    return names


def _looks_special(text: str) -> bool:
    """llama.cpp's convert_hf_to_gguf ``does_token_look_special`` (the parts that concern sentencepiece models)."""
    if text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    if text.startswith("<|") and text.endswith("|>"):
        return True
    return text.startswith("<unused") and text.endswith(">")


def _apply_added_tokens(pieces: list[str], scores: list[float], types: list[int], added: Iterable[dict]) -> None:
    """Mark added tokens CONTROL (special) or USER_DEFINED, as llama.cpp's GGUF converter does."""
    for entry in added:
        token_id, content = int(entry["id"]), entry.get("content")
        if not isinstance(content, str) or not 0 <= token_id < len(pieces):
            continue
        if entry.get("special") or _looks_special(content):
            types[token_id] = CONTROL
        else:
            types[token_id] = USER_DEFINED
            content = content.replace(SPACE_MARK, " ")
        pieces[token_id] = content
        scores[token_id] = -1000.0


def _added_tokens_decoder(directory: Path) -> list[dict]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return []
    decoder = _load_json(path).get("added_tokens_decoder") or {}
    return [dict(data, id=int(token_id)) for token_id, data in decoder.items()]


def _chat_template(directory: Path) -> str | None:
    """The directory's chat template: ``chat_template.jinja`` (how transformers saves it since 4.5x; Gemma 4's
    checkpoints ship it so), else tokenizer_config.json's ``chat_template`` (a string, or a list of named templates:
    the one named "default")."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read {path}: {exc}") from exc
    path = directory / "tokenizer_config.json"
    template = _load_json(path).get("chat_template") if path.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def _merge_rank_table(merges: list[str]) -> dict[tuple[str, str], int]:
    """``"left right"`` merges -> {(left, right): rank}; the first occurrence of a pair wins (llama.cpp's
    ``bpe_ranks.emplace``). Split at the first space after the first character, as llama.cpp does."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        pos = merge.find(" ", 1)
        pair = (merge[:pos], merge[pos + 1:]) if pos != -1 else ("", "")
        ranks.setdefault(pair, rank)
    return ranks


def _merge_rank_scores(vocab: dict[str, int], merges: list[Any]) -> list[float]:
    """Scores for a BPE tokenizer.json: a piece scores minus the rank of the best merge that makes it."""
    scores = [0.0] * (max(vocab.values(), default=-1) + 1)
    made: set[int] = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in made:
            made.add(token_id)
            scores[token_id] = -float(rank)
    floor = -float(len(merges) + 1)
    for piece, token_id in vocab.items():
        if len(piece) > 1 and token_id not in made:
            scores[token_id] = floor  # reachable only by a merge HF would never make: merge it last
    return scores


def _tokenizer_json_vocab(data: dict) -> tuple[list[str], list[float], list[int], str | None]:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"tokenizer.json model is {model.get('type')!r}; only BPE is supported")
    vocab: dict[str, int] = dict(model["vocab"])
    for entry in data.get("added_tokens") or []:
        vocab.setdefault(entry["content"], int(entry["id"]))
    size = max(vocab.values(), default=-1) + 1
    pieces = [""] * size
    for piece, token_id in vocab.items():
        pieces[token_id] = piece
    if any(not p for p in pieces):
        raise TokenizerError("tokenizer.json vocabulary has holes")
    scores = _merge_rank_scores(vocab, model.get("merges") or [])
    types = [NORMAL] * size
    if model.get("byte_fallback"):
        for token_id, piece in enumerate(pieces):
            if _BYTE_PIECE.fullmatch(piece):
                types[token_id] = BYTE
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        types[vocab[unk]] = UNKNOWN
    _apply_added_tokens(pieces, scores, types, data.get("added_tokens") or [])
    return pieces, scores, types, unk


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Gemma's SentencePiece-BPE tokenizer; see the module docstring for the exact contract."""

    def __init__(
        self,
        pieces: list[str],
        scores: list[float],
        types: list[int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        unk_id: int | None,
        merges: list[str] | None = None,
        chat_template: str | None = None,
    ) -> None:
        if not len(pieces) == len(scores) == len(types):
            raise TokenizerError(f"vocab arrays differ in length: {len(pieces)}, {len(scores)}, {len(types)}")
        self._pieces = list(pieces)
        self._scores = [float(s) for s in scores]
        self._types = [int(t) for t in types]
        self.vocab_size = len(self._pieces)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self._check_id(name, value)
            for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id))
        )
        # Later duplicates win, as in llama.cpp's token_to_id map.
        self._piece_to_id = {piece: token_id for token_id, piece in enumerate(self._pieces)}
        self._byte_ids = self._byte_table()
        self._byte_values = self._byte_values_of_byte_tokens()
        self._specials_by_first_char = self._user_defined_index()
        self._token_bytes_cache: list[bytes | None] = [None] * self.vocab_size
        self.start_of_turn_id = self.token_id("<start_of_turn>")
        self.end_of_turn_id = self.token_id("<end_of_turn>")
        # Gemma 4's control tokens (its turn markers replace <start_of_turn>/<end_of_turn>; ids 105/106 in the real
        # vocabulary): <|turn>role\n ... <turn|>, the thinking switch <|think|>, the thought channel
        # <|channel> ... <channel|>
        self.turn_open_id = self.token_id("<|turn>")
        self.turn_close_id = self.token_id("<turn|>")
        self.think_id = self.token_id("<|think|>")
        self.channel_open_id = self.token_id("<|channel>")
        self.channel_close_id = self.token_id("<channel|>")
        # the model's own chat template (chat_template.jinja, tokenizer_config.json or the GGUF's
        # tokenizer.chat_template), read for what it says about the turn format (sessions/chat_format.py); never run
        self.chat_template = chat_template if isinstance(chat_template, str) else None
        # Gemma 4 GGUFs (tokenizer model "gemma4"): merges ranked by position, applied per newline / non-newline run
        self._merge_ranks = None if merges is None else _merge_rank_table(merges)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any) -> Tokenizer:
        """Build from a GGUF file path, or from an already-open ``gguf.GGUFReader``."""
        return cls.from_gguf_metadata(_gguf_metadata(path_or_reader))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from GGUF key/values already read (``tokenizer.ggml.*``)."""
        model = meta.get("tokenizer.ggml.model")
        if model not in ("llama", "gemma4"):
            raise TokenizerError(f"GGUF tokenizer model is {model!r}; only SentencePiece ('llama') and Gemma 4's "
                                 "('gemma4') are supported")
        # NOTE: llama.cpp (src/llama-vocab.cpp, load: tokenizer_model == "gemma4") reads "gemma4" as BPE with
        # ranked merges (tokenizer.ggml.merges, no scores) and pre-tokenizer "gemma4": spaces escaped to "▁", the
        # text split into runs of newlines and of everything else ("[^\n]+|[\n]+"), no GPT-2 byte mapping (raw UTF-8
        # characters, byte fallback to <0xNN>). Gemma 3's kind but for how a pair is chosen: merge rank, not score.
        merges = None
        if model == "gemma4":
            merges = meta.get("tokenizer.ggml.merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise TokenizerError("GGUF tokenizer model 'gemma4' needs tokenizer.ggml.merges (a list of strings)")
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise TokenizerError("GGUF tokenizer adds a space prefix; Gemma tokenization has none")
        pieces = meta.get("tokenizer.ggml.tokens")
        if not isinstance(pieces, list) or not pieces:
            raise TokenizerError("GGUF file has no tokenizer.ggml.tokens")
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(pieces)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(pieces)
        return cls(
            pieces,
            scores,
            types,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            merges=merges,
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face model directory: ``tokenizer.model`` if present, else ``tokenizer.json``."""
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"{directory} is not a directory")
        try:
            if (directory / "tokenizer.model").is_file():
                return cls._from_sentencepiece_model(directory)
            if (directory / "tokenizer.json").is_file():
                return cls._from_tokenizer_json(directory)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # malformed JSON structure
            if isinstance(exc, TokenizerError):
                raise
            raise TokenizerError(f"malformed tokenizer files in {directory}: {exc!r}") from exc
        raise TokenizerError(f"{directory} has neither tokenizer.model nor tokenizer.json")

    @classmethod
    def _from_sentencepiece_model(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.model"
        try:
            buf = path.read_bytes()
            pieces, scores, types, trainer = _parse_model_proto(buf)
        except OSError as exc:
            raise TokenizerError(f"cannot read {path}: {exc}") from exc
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            raise TokenizerError(f"corrupt {path}: {exc}") from exc
        if not pieces:
            raise TokenizerError(f"{path} has no pieces")
        # SentencePiece matches user-defined pieces on escaped text ("▁▁" for two spaces); we match them on raw
        # text like llama.cpp, whose GGUF converter stores them with real spaces.
        for token_id, ttype in enumerate(types):
            if ttype == USER_DEFINED:
                pieces[token_id] = pieces[token_id].replace(SPACE_MARK, " ")
        _apply_added_tokens(pieces, scores, types, _added_tokens_decoder(directory))
        ids = {key: trainer[f"{key}_id"] for key in ("bos", "eos", "pad", "unk")}
        return cls._with_config_ids(pieces, scores, types, ids, directory)

    @classmethod
    def _from_tokenizer_json(cls, directory: Path) -> Tokenizer:
        data = _load_json(directory / "tokenizer.json")
        if not isinstance(data, dict):
            raise TokenizerError(f"{directory / 'tokenizer.json'} is not a JSON object")
        pieces, scores, types, unk = _tokenizer_json_vocab(data)
        defaults = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": unk or "<unk>"}
        lookup = {piece: token_id for token_id, piece in enumerate(pieces)}
        ids = {key: lookup.get(text) for key, text in defaults.items()}
        return cls._with_config_ids(pieces, scores, types, ids, directory)

    @classmethod
    def _with_config_ids(
        cls, pieces: list[str], scores: list[float], types: list[int], ids: dict[str, int | None], directory: Path
    ) -> Tokenizer:
        lookup: dict[str, int] | None = None
        for key, text in _config_special_names(directory).items():
            lookup = lookup or {piece: token_id for token_id, piece in enumerate(pieces)}
            if text in lookup:
                ids[key] = lookup[text]
        ids = {key: (value if value is not None and value >= 0 else None) for key, value in ids.items()}
        return cls(pieces, scores, types, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], unk_id=ids["unk"],
                   chat_template=_chat_template(directory))

    def _check_id(self, name: str, value: int | None) -> int | None:
        if value is None:
            return None
        if not 0 <= int(value) < self.vocab_size:
            raise TokenizerError(f"{name} id {value} is outside the vocabulary (size {self.vocab_size})")
        return int(value)

    def _byte_table(self) -> list[int | None]:
        """llama.cpp's byte_to_token: ``<0xNN>`` or else the byte itself as a one-character piece."""
        table: list[int | None] = []
        for byte in range(256):
            token_id = self._piece_to_id.get(f"<0x{byte:02X}>")
            if token_id is None and byte < 0x80:
                token_id = self._piece_to_id.get(chr(byte))
            table.append(token_id)
        return table

    def _byte_values_of_byte_tokens(self) -> dict[int, int]:
        values: dict[int, int] = {}
        for token_id, ttype in enumerate(self._types):
            if ttype == BYTE:
                match = _BYTE_PIECE.fullmatch(self._pieces[token_id])
                if match is None:
                    raise TokenizerError(f"byte token {token_id} has piece {self._pieces[token_id]!r}")
                values[token_id] = int(match.group(1), 16)
        return values

    def _user_defined_index(self) -> dict[str, list[tuple[int, str, int]]]:
        """User-defined tokens grouped by first character, each group in llama.cpp's matching order.

        Entries are ``(rank, text, token_id)``; rank orders all of them longest-first by UTF-8 length (ties by
        id: llama.cpp's std::sort leaves ties unordered, which only matters for equal-length overlapping tokens).
        """
        specials = [(t_id, p) for t_id, p in enumerate(self._pieces) if self._types[t_id] == USER_DEFINED and p]
        specials.sort(key=lambda item: (-len(item[1].encode("utf-8")), item[0]))
        index: dict[str, list[tuple[int, str, int]]] = {}
        for rank, (token_id, text) in enumerate(specials):
            index.setdefault(text[0], []).append((rank, text, token_id))
        return index

    # -- properties ----------------------------------------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over pieces, scores, types and special ids; identical for identical vocabularies."""
        h = hashlib.sha256(b"gemma-sessions/tokenizer/v1\0")
        encoded = [p.encode("utf-8", "surrogatepass") for p in self._pieces]
        h.update(_le_array("Q", [len(self._pieces)] + [len(e) for e in encoded]))
        h.update(b"".join(encoded))
        h.update(_le_array("f", self._scores))
        h.update(_le_array("i", self._types))
        specials = [self.bos_id, self.eos_id, self.pad_id, self.unk_id]
        h.update(json.dumps(specials).encode())
        if self._merge_ranks is not None:  # ranked merges decide the ids too (absent before: fingerprints unchanged)
            h.update(json.dumps(sorted((r, a, b) for (a, b), r in self._merge_ranks.items())).encode())
        return h.hexdigest()

    def vocab(self) -> tuple[list[str], list[float], list[int]]:
        """(pieces, scores, types) - copies, e.g. to write the vocabulary into a GGUF file."""
        return list(self._pieces), list(self._scores), list(self._types)

    def piece(self, token_id: int) -> str:
        return self._pieces[self._valid(token_id)]

    def token_id(self, piece: str) -> int | None:
        return self._piece_to_id.get(piece)

    def score(self, token_id: int) -> float:
        return self._scores[self._valid(token_id)]

    def token_type(self, token_id: int) -> int:
        """GGUF numbering: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte."""
        return self._types[self._valid(token_id)]

    def is_control(self, token_id: int) -> bool:
        return self._types[self._valid(token_id)] == CONTROL

    def _valid(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (plain text: control tokens are never produced), optionally after BOS."""
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("this vocabulary has no BOS token")
            ids.append(self.bos_id)
        text = _valid_unicode(text)
        for start, end, token_id in self._partition(text):
            if token_id is not None:
                ids.append(token_id)
            elif self._merge_ranks is None:
                self._bpe(text[start:end].replace(" ", SPACE_MARK), ids)
            else:  # Gemma 4 (llama.cpp's pre-tokenizer "gemma4"): each run of newlines / of other text on its own
                for run in _NEWLINE_RUNS.findall(text, start, end):
                    self._bpe(run.replace(" ", SPACE_MARK), ids)
        return ids

    def _partition(self, text: str) -> list[tuple[int, int, int | None]]:
        """Split ``text`` into user-defined-token matches and raw fragments, as tokenizer_st_partition does."""
        matches = self._special_matches(text)
        out: list[tuple[int, int, int | None]] = []
        pos = 0
        for start, end, token_id in matches:
            if start > pos:
                out.append((pos, start, None))
            out.append((start, end, token_id))
            pos = end
        if pos < len(text):
            out.append((pos, len(text), None))
        return out

    def _special_candidates(self, text: str) -> list[tuple[int, str, int]]:
        index = self._specials_by_first_char
        groups = [index[c] for c in set(text) if c in index]
        found = [entry for group in groups for entry in group if entry[1] in text]
        found.sort()
        return found

    def _special_matches(self, text: str) -> list[tuple[int, int, int]]:
        candidates = self._special_candidates(text)
        if not candidates:
            return []
        covered = bytearray(len(text))
        matches: list[tuple[int, int, int]] = []
        for _, special, token_id in candidates:
            _take_occurrences(text, special, token_id, covered, matches)
        matches.sort()
        return matches

    def _bpe(self, text: str, out: list[int]) -> None:
        """SentencePiece BPE of one fragment (spaces already escaped), appending ids to ``out``."""
        symbols = self._merge(text)
        lookup, byte_ids = self._piece_to_id, self._byte_ids
        for symbol in symbols:
            token_id = lookup.get(symbol)
            if token_id is not None:
                out.append(token_id)
                continue
            for byte in symbol.encode("utf-8"):
                byte_id = byte_ids[byte]
                if byte_id is None:
                    raise TokenizerError(f"no byte-fallback token for byte 0x{byte:02X}")
                out.append(byte_id)

    def _merge(self, text: str) -> list[str]:
        """Merge adjacent symbols, best-scoring vocabulary piece first (ties: leftmost), as llama.cpp does.

        Symbols form a linked list (``nxt``/``prv``); merged-away symbols become "". A queued pair is stale when
        either side is gone or its right side grew since (lengths no longer add up), exactly llama.cpp's check.
        """
        n = len(text)
        if n < 2:
            return [text] if n else []
        if self._merge_ranks is not None:
            return self._merge_ranked(text)
        syms = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = self._initial_pairs(syms)
        lookup, scores, push, pop = self._piece_to_id, self._scores, heapq.heappush, heapq.heappop
        while heap:
            _, left, right, pair = pop(heap)
            sym_l, sym_r = syms[left], syms[right]
            if not sym_l or not sym_r or len(sym_l) + len(sym_r) != len(pair):
                continue
            syms[left], syms[right] = pair, ""
            after = nxt[left] = nxt[right]
            if after != -1:
                prv[after] = left
                token_id = lookup.get(cand := pair + syms[after])
                if token_id is not None:
                    push(heap, (-scores[token_id], left, after, cand))
            if (before := prv[left]) != -1:
                token_id = lookup.get(cand := syms[before] + pair)
                if token_id is not None:
                    push(heap, (-scores[token_id], before, left, cand))
        return _walk(syms, nxt)

    def _merge_ranked(self, text: str) -> list[str]:
        """``_merge`` with llama.cpp's BPE rule (``llm_tokenizer_bpe_session``): the adjacent pair with the lowest
        merge rank goes first (ties: leftmost), whether or not other pairs make the same piece."""
        ranks, push, pop = self._merge_ranks, heapq.heappush, heapq.heappop
        n = len(text)
        syms = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(r, i, i + 1, syms[i] + syms[i + 1]) for i in range(n - 1)
                if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, left, right, pair = pop(heap)
            sym_l, sym_r = syms[left], syms[right]
            if not sym_l or not sym_r or len(sym_l) + len(sym_r) != len(pair):
                continue
            syms[left], syms[right] = pair, ""
            after = nxt[left] = nxt[right]
            if after != -1:
                prv[after] = left
                if (r := ranks.get((pair, syms[after]))) is not None:
                    push(heap, (r, left, after, pair + syms[after]))
            if (before := prv[left]) != -1 and (r := ranks.get((syms[before], pair))) is not None:
                push(heap, (r, before, left, syms[before] + pair))
        return _walk(syms, nxt)

    def _initial_pairs(self, syms: list[str]) -> list[tuple[float, int, int, str]]:
        lookup, scores = self._piece_to_id, self._scores
        heap = []
        for i in range(len(syms) - 1):
            pair = syms[i] + syms[i + 1]
            token_id = lookup.get(pair)
            if token_id is not None:
                heap.append((-scores[token_id], i, i + 1, pair))
        heapq.heapify(heap)
        return heap

    # -- decoding ------------------------------------------------------------------------------------------------

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The bytes one token contributes to decoded text."""
        if self._types[self._valid(token_id)] in _DROPPED_WHEN_SKIPPING:
            return b"" if skip_special else self._pieces[token_id].encode("utf-8")
        cached = self._token_bytes_cache[token_id]
        if cached is None:
            cached = self._token_bytes_cache[token_id] = self._render(token_id)
        return cached

    def _render(self, token_id: int) -> bytes:
        ttype = self._types[token_id]
        if ttype == BYTE:
            return bytes((self._byte_values[token_id],))
        if ttype == USER_DEFINED:
            return self._pieces[token_id].encode("utf-8")
        if ttype == NORMAL:
            return self._pieces[token_id].replace(SPACE_MARK, " ").encode("utf-8")
        return b""  # undefined token types render as nothing, like llama.cpp

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; byte tokens are joined into bytes and decoded as UTF-8 with ``errors="replace"``."""
        data = b"".join(self.token_bytes(int(token_id), skip_special) for token_id in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Incremental :meth:`Tokenizer.decode`: the texts of all ``feed`` calls plus ``flush`` equal ``decode``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """New complete text; bytes of a character not yet complete stay buffered."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        """Whatever is buffered (an incomplete sequence becomes U+FFFD); the decoder is then empty."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _take_occurrences(
    text: str, special: str, token_id: int, covered: bytearray, matches: list[tuple[int, int, int]]
) -> None:
    """Claim ``special``'s leftmost non-overlapping occurrences in the parts of ``text`` not yet covered.

    Equivalent to llama.cpp scanning every remaining raw fragment with ``find``: an occurrence that overlaps a
    covered span lies in no fragment, so the scan resumes where that covered span ends.
    """
    length, n, pos = len(special), len(text), 0
    while (start := text.find(special, pos)) != -1:
        end = start + length
        hit = covered.find(1, start, end)
        if hit != -1:
            resume = covered.find(0, hit)
            pos = n if resume == -1 else resume
            continue
        covered[start:end] = b"\x01" * length
        matches.append((start, end, token_id))
        pos = end


def _walk(syms: list[str], nxt: list[int]) -> list[str]:
    out: list[str] = []
    i = 0
    while i != -1:
        out.append(syms[i])
        i = nxt[i]
    return out


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _le_array(typecode: str, values: list[Any]) -> bytes:
    arr = array(typecode, values)
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        arr.byteswap()
    return arr.tobytes()

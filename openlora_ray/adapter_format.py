"""What a servable LoRA adapter looks like on disk, checked without torch.

PEFT's ``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` whose
tensors are named ``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight``
with ``lora_A`` of shape ``(r, in_features)`` and ``lora_B`` of shape ``(out_features, r)``.
Both the adapter store (before a download is accepted) and the model core (before weights reach a
device) use these checks, so a bad adapter is refused with the same message wherever it is seen.
Only the safetensors *header* is read here; the tensors themselves are never loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open

from openlora_ray.errors import InvalidAdapterError
from openlora_ray.model.family import adapter_projections

if TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Phi-3's checkpoints fuse q/k/v and gate/up into one module each, and PEFT adapts those modules.
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj")
KNOWN_PROJECTIONS = PROJECTIONS + FUSED_PROJECTIONS

ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16"})

# Mixture-of-experts layers (model/moe.py) run the base router and experts: LoRA on them (per-expert
# LoRA) is not served yet, whether PEFT saved it per expert module (transformers 4:
# ``mlp.experts.<e>.gate_proj``, Mixtral's ``block_sparse_moe.experts.<e>.w1``), on the stacked
# parameters (``target_parameters``: ``mlp.experts.gate_up_proj``) or on the router (``mlp.gate``).
PER_EXPERT_REFUSAL = (
    "LoRA on mixture-of-experts experts or routers (per-expert LoRA) is not supported yet; "
    "train the adapter on the attention projections (q_proj, k_proj, v_proj, o_proj) and, where the base "
    "model has dense MLP layers, their gate_proj/up_proj/down_proj"
)
_MOE_KEY = re.compile(r"\.(?:experts|block_sparse_moe|shared_expert_gate)\.|\.mlp\.gate\.lora_")
# Mixtral's expert projections as transformers 4 named them (PEFT adapters trained then list them).
_EXPERT_MODULES = frozenset({"w1", "w2", "w3"})

_WEIGHT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<proj>[a-z_]+)\.lora_(?P<ab>[AB])\.weight$"
)


class PeftLoraConfig(BaseModel):
    """The fields of PEFT's ``adapter_config.json`` that decide whether we can serve it.

    PEFT writes many more fields (task type, init options, revision...); they are accepted and
    ignored, because they do not change what the saved tensors mean at inference time.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: str
    r: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    target_parameters: list[str] | None = None  # PEFT's LoRA on nn.Parameters: MoE experts' stacked weights
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        """The factor PEFT multiplies ``B @ A`` by: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class BaseModelDims:
    """The shapes of a Llama-family base model that adapter tensors must agree with."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sparse_mlp_layers: tuple[int, ...] = ()  # layers whose MLP is a mixture of experts (no LoRA there)
    projections: tuple[str, ...] = PROJECTIONS  # the modules its adapters may target (its family's names)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "BaseModelDims":
        """Read a Hugging Face ``config.json`` dict (the families of ``model/family.py`` share these keys)."""
        heads = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            sparse_mlp_layers=_sparse_mlp_layers(cfg),
            projections=adapter_projections(cfg.get("model_type", "llama")),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "BaseModelDims":
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))

    def in_out(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection of this model."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv),
            "gate_up_proj": (h, 2 * i),
        }[proj]


def _sparse_mlp_layers(cfg: dict[str, Any]) -> tuple[int, ...]:
    """Qwen3-MoE's sparse layers: every ``decoder_sparse_step``-th outside ``mlp_only_layers``
    (transformers' ``Qwen3MoeDecoderLayer``); Mixtral's are all of them."""
    n = cfg["num_hidden_layers"]
    if cfg.get("model_type") == "mixtral":
        return tuple(range(n))
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # transformers 5 saves the latter
    if cfg.get("model_type") != "qwen3_moe" or not experts:
        return ()
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    return tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter: its config and which (layer, projection) pairs it changes."""

    adapter_id: str
    config: PeftLoraConfig
    targets: frozenset[tuple[int, str]]

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def projections(self) -> frozenset[str]:
        return frozenset(p for _, p in self.targets)


_MLP_NAMES = frozenset({*MLP_PROJECTIONS, "gate_up_proj"})


def parse_weight_key(key: str) -> tuple[int, str, str] | None:
    """``(layer, projection, "A"|"B")`` for a LoRA tensor name, ``None`` for anything else."""
    m = _WEIGHT_KEY.match(key)
    if m is None or m["proj"] not in KNOWN_PROJECTIONS:
        return None
    return int(m["layer"]), m["proj"], m["ab"]


def read_config(adapter_id: str, adapter_dir: Path) -> PeftLoraConfig:
    """Parse and check ``adapter_config.json``; refuse features we cannot serve exactly."""
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapterError(adapter_id, f"missing {CONFIG_FILE}")
    try:
        cfg = PeftLoraConfig.model_validate_json(path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidAdapterError(adapter_id, f"{CONFIG_FILE}: {where}: {first['msg']}") from e
    problems = []
    if cfg.peft_type.upper() != "LORA":
        problems.append(f"peft_type is {cfg.peft_type!r}, only LORA is supported")
    if cfg.use_dora:
        problems.append("DoRA (use_dora=true) is not supported")
    if cfg.modules_to_save:
        problems.append(f"modules_to_save {cfg.modules_to_save} is not supported (full weights)")
    if cfg.bias != "none" or cfg.lora_bias:
        problems.append("trained biases are not supported (bias must be 'none')")
    if cfg.rank_pattern or cfg.alpha_pattern:
        problems.append("per-module rank_pattern/alpha_pattern is not supported")
    if cfg.target_parameters:
        problems.append(f"target_parameters {cfg.target_parameters}: {PER_EXPERT_REFUSAL}")
    if isinstance(cfg.target_modules, list):
        unknown = sorted(set(cfg.target_modules) - set(KNOWN_PROJECTIONS))
        experts = [m for m in unknown if m in _EXPERT_MODULES]
        if experts:
            problems.append(f"target_modules {experts} are Mixtral's expert projections: {PER_EXPERT_REFUSAL}")
            unknown = [m for m in unknown if m not in _EXPERT_MODULES]
        if unknown:
            problems.append(f"target_modules {unknown} are not among the projections {list(KNOWN_PROJECTIONS)}")
    if problems:
        raise InvalidAdapterError(adapter_id, "; ".join(problems))
    return cfg


def validate_adapter_dir(
    adapter_id: str,
    adapter_dir: str | Path,
    dims: BaseModelDims | None = None,
    max_rank: int | None = None,
) -> AdapterSpec:
    """Check an adapter folder without loading its tensors.

    Refuses pickle-only adapters, configs with unsupported features, safetensors files that are
    truncated or hold unexpected tensors, dtypes other than float32/float16/bfloat16, ranks above
    ``max_rank``, and (when ``dims`` is given) shapes or layers the base model does not have.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        if any((adapter_dir / p).exists() for p in PICKLE_FILES):
            raise InvalidAdapterError(
                adapter_id, "only pickled .bin weights found; re-save with safe_serialization=True"
            )
        raise InvalidAdapterError(adapter_id, f"missing {WEIGHTS_FILE}")
    cfg = read_config(adapter_id, adapter_dir)
    if max_rank is not None and cfg.r > max_rank:
        raise InvalidAdapterError(adapter_id, f"rank {cfg.r} exceeds the server's max_rank {max_rank}")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
        raise InvalidAdapterError(adapter_id, f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    return AdapterSpec(adapter_id, cfg, _check_header(adapter_id, header, cfg, dims))


def _check_header(
    adapter_id: str,
    header: dict[str, tuple[str, tuple[int, ...]]],
    cfg: PeftLoraConfig,
    dims: BaseModelDims | None,
) -> frozenset[tuple[int, str]]:
    if not header:
        raise InvalidAdapterError(adapter_id, f"{WEIGHTS_FILE} holds no tensors")
    seen: dict[tuple[int, str], set[str]] = {}
    widths: dict[tuple[str, str], dict[int, str]] = {}  # (proj, A|B) -> width -> first tensor with it
    for key, (dtype, shape) in header.items():
        parsed = parse_weight_key(key)
        if parsed is None:
            raise InvalidAdapterError(adapter_id, f"unsupported tensor {key!r}: {_explain_key(key)}")
        layer, proj, ab = parsed
        if dtype not in ALLOWED_DTYPES:
            raise InvalidAdapterError(adapter_id, f"tensor {key!r} has dtype {dtype}, expected F32/F16/BF16")
        if len(shape) != 2:
            raise InvalidAdapterError(adapter_id, f"tensor {key!r} has shape {list(shape)}, expected 2-D")
        if dims is not None:
            if proj in _MLP_NAMES and layer in dims.sparse_mlp_layers:
                raise InvalidAdapterError(
                    adapter_id, f"tensor {key!r} adapts the MLP of layer {layer}, a mixture-of-experts layer in "
                    f"the base model: {PER_EXPERT_REFUSAL}",
                )
            if proj not in dims.projections:
                raise InvalidAdapterError(
                    adapter_id, f"tensor {key!r} targets {proj}, which the base model does not have; "
                    f"its adaptable projections are {list(dims.projections)}",
                )
            if layer >= dims.num_layers:
                raise InvalidAdapterError(
                    adapter_id, f"tensor {key!r} targets layer {layer}, base model has {dims.num_layers}"
                )
            fan_in, fan_out = dims.in_out(proj)
            expected = (cfg.r, fan_in) if ab == "A" else (fan_out, cfg.r)
        else:
            expected = (cfg.r, shape[1]) if ab == "A" else (shape[0], cfg.r)
        if shape != expected:
            raise InvalidAdapterError(
                adapter_id,
                f"tensor {key!r} has shape {list(shape)}, expected {list(expected)} (r={cfg.r})",
            )
        seen.setdefault((layer, proj), set()).add(ab)
        widths.setdefault((proj, ab), {}).setdefault(shape[1] if ab == "A" else shape[0], key)
    unpaired = sorted(k for k, v in seen.items() if v != {"A", "B"})
    if unpaired:
        layer, proj = unpaired[0]
        raise InvalidAdapterError(adapter_id, f"layer {layer} {proj} has lora_A or lora_B but not both")
    _check_consistent_widths(adapter_id, widths, cfg)
    _check_targets_declared(adapter_id, cfg, frozenset(p for _, p in seen))
    return frozenset(seen)


# Which (projection, A|B) widths are the same model dimension: lora_A's input width and lora_B's
# output width. A Llama-family model has four such dimensions, so an adapter must agree with
# itself on each even when no base model is known to compare it with.
_SHARED_WIDTHS = {
    "hidden size": (("q_proj", "A"), ("k_proj", "A"), ("v_proj", "A"), ("gate_proj", "A"), ("up_proj", "A"),
                    ("qkv_proj", "A"), ("gate_up_proj", "A"), ("o_proj", "B"), ("down_proj", "B")),
    "intermediate size": (("gate_proj", "B"), ("up_proj", "B"), ("down_proj", "A")),
    "attention width": (("q_proj", "B"), ("o_proj", "A")),
    "key/value width": (("k_proj", "B"), ("v_proj", "B")),
}


def _check_consistent_widths(
    adapter_id: str, widths: dict[tuple[str, str], dict[int, str]], cfg: PeftLoraConfig
) -> None:
    """Refuse an adapter whose matrices disagree among themselves about the model's widths.

    One projection must have the same input (lora_A) and output (lora_B) width in every layer,
    projections that read or write the same model dimension must agree on it, and the rank must
    not exceed the width of the matrices it adapts (such a "low-rank" update is larger than the
    full matrix and is a mistake, e.g. a rank meant for another model).
    """
    for (proj, ab), found in widths.items():
        if len(found) > 1:
            (w1, k1), (w2, k2) = sorted(found.items())[:2]
            side = "input width (lora_A)" if ab == "A" else "output width (lora_B)"
            raise InvalidAdapterError(
                adapter_id, f"{proj} {side} differs across layers: {w1} in {k1!r}, {w2} in {k2!r}"
            )
    for dimension, members in _SHARED_WIDTHS.items():
        present = {m: next(iter(widths[m].items())) for m in members if m in widths}
        if len({w for w, _ in present.values()}) > 1:
            (w1, k1), (w2, k2) = sorted(set(present.values()))[:2]
            raise InvalidAdapterError(
                adapter_id, f"tensors disagree on the model's {dimension}: {w1} in {k1!r}, {w2} in {k2!r}"
            )
    narrowest = min(w for found in widths.values() for w in found)
    if cfg.r > narrowest:
        raise InvalidAdapterError(
            adapter_id, f"rank {cfg.r} is above the width of the matrices it adapts ({narrowest}): "
            "the adapter was made for another model or its rank is wrong",
        )


def _check_targets_declared(adapter_id: str, cfg: PeftLoraConfig, projections: frozenset[str]) -> None:
    """Tensors for a projection the config's ``target_modules`` list leaves out mean a mixed-up folder."""
    if not isinstance(cfg.target_modules, list):
        return  # a regex string or None: PEFT matched modules by pattern, the tensors are the truth
    undeclared = sorted(projections - set(cfg.target_modules))
    if undeclared:
        raise InvalidAdapterError(
            adapter_id, f"tensors adapt {undeclared}, which {CONFIG_FILE}'s target_modules does not list"
        )


def _explain_key(key: str) -> str:
    if _MOE_KEY.search(key):
        return PER_EXPERT_REFUSAL
    if "lora_magnitude_vector" in key:
        return "DoRA is not supported"
    if "modules_to_save" in key or not ("lora_A" in key or "lora_B" in key):
        return "only LoRA A/B matrices are supported (no full weights, biases or modules_to_save)"
    if "embed" in key or "lm_head" in key:
        return "LoRA on embeddings or lm_head is not supported"
    return f"only the projections {list(KNOWN_PROJECTIONS)} of decoder layers can be adapted"


# Bit masks of the exponent field per dtype: a value is NaN or +-Inf exactly when all its exponent
# bits are set. Checking bits works for bfloat16 too, which numpy cannot represent as a float.
_EXPONENT_MASKS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def count_nonfinite(raw: np.ndarray, dtype: str) -> int:
    """NaN and Inf values in ``raw``, the bytes (uint8) of a tensor of safetensors ``dtype``."""
    word, mask = _EXPONENT_MASKS[dtype]
    words = raw.view(word)
    return int(((words & mask) == mask).sum())


def check_finite(adapter_id: str, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose weights hold NaN or Inf, without torch and without a float copy.

    Call after :func:`validate_adapter_dir` (which vouches for the header). The tensors are
    memory-mapped and tested on their raw bits, so this costs one pass over the file.
    """
    import numpy as np  # imported here: only callers that scan weights pay for numpy

    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except (OSError, ValueError) as e:
        raise InvalidAdapterError(adapter_id, f"{WEIGHTS_FILE} cannot be read: {e}") from e
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _EXPONENT_MASKS:
            continue
        start, end = info["data_offsets"]
        bad = count_nonfinite(data[start:end], info["dtype"])
        if bad:
            raise InvalidAdapterError(adapter_id, f"tensor {name!r} holds {bad} NaN/Inf values")

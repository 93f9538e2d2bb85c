"""``openlora-ray demo adapters``: train demo LoRA adapters on a real base model and push them to a store.

The base is SmolLM2-135M-Instruct (four adapters) or, with ``--model gemma3-270m``, Gemma 3 270M
(one adapter); :mod:`.models` holds what differs. Adapters already in the store are skipped
(unless ``--force``), so ``make run`` trains only once.
torch and transformers are imported only when something has to be trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from openlora_ray.demo.behaviours import BEHAVIOURS
from openlora_ray.demo.models import DEMO_MODELS, DemoModel
from openlora_ray.model.prepare import DEMO_MODEL_NAME, default_store_uri

if TYPE_CHECKING:
    from openlora_ray.store.store import AdapterStore

log = logging.getLogger(__name__)

NUM_QUESTIONS = 64
"""Questions asked of the base model; about 50 of its answers make usable training examples."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="demo adapters for the real base models")
    group = demo.add_subparsers(dest="command", required=True)
    names = ", ".join(f"{b.name} ({b.description})" for b in BEHAVIOURS.values())
    defaults = "; ".join(f"{m.name}: {', '.join(m.adapters)}" for m in DEMO_MODELS.values())
    adapters = group.add_parser(
        "adapters",
        help="train the demo LoRA adapters on CPU (a few minutes) and push them to a store",
        description=f"Train small LoRA adapters with a visible behaviour each and push them to a store: {names}. "
        f"Trained by default: {defaults}.",
    )
    adapters.add_argument("--model", choices=list(DEMO_MODELS), default=DEMO_MODEL_NAME,
                          help="base model, prepared on first use (default: %(default)s)")
    adapters.add_argument(
        "--store",
        help="store root: a folder or s3://bucket/prefix (endpoint and credentials from the standard AWS "
        "variables, e.g. AWS_ENDPOINT_URL_S3 for MinIO) (default: the model's embedded store, "
        f"{default_store_uri()} for {DEMO_MODEL_NAME}, store-<model> beside it for another)",
    )
    adapters.add_argument("--only", action="append", choices=list(BEHAVIOURS), metavar="NAME",
                          help=f"train only this adapter (repeatable); one of: {', '.join(BEHAVIOURS)}")
    adapters.add_argument("--steps", type=_positive_int, help="optimizer steps per adapter (default: tuned per adapter); fewer for a quick test")
    adapters.add_argument("--force", action="store_true", help="train and push a new version even if the store has the adapter")
    adapters.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: %(default)s)")
    adapters.set_defaults(func=_adapters)


def _adapters(args: argparse.Namespace) -> int:
    from openlora_ray.adapter_format import BaseModelDims
    from openlora_ray.model.prepare import prepare_model
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    demo = DEMO_MODELS[args.model]
    model_dir = prepare_model(demo.name)
    uri = args.store or default_store_uri(demo.name)
    if "://" not in uri:  # a local folder store: the embedded default must work on first use
        Path(uri).expanduser().mkdir(parents=True, exist_ok=True)
    store = AdapterStore(StoreSettings(uri=uri), dims=BaseModelDims.from_model_dir(model_dir))
    wanted = args.only or list(demo.adapters)
    todo = [name for name in wanted if args.force or not store.list(name)]
    for name in wanted:
        if name not in todo:
            print(f"{name}: already in {uri} (use --force to train a new version)")
    if todo:
        _train_and_push(demo, model_dir, store, todo, steps=args.steps, seed=args.seed)
    return 0


def _train_and_push(
    demo: DemoModel, model_dir: Path, store: AdapterStore, names: list[str], *, steps: int | None, seed: int
) -> None:
    """Ask the base model for the training contents once, then train, try and push each adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openlora_ray.demo.data import HELD_OUT_QUESTIONS, make_examples, make_questions
    from openlora_ray.demo.generate import greedy_answers
    from openlora_ray.demo.train import ADAPTER_CONFIGS, train_adapter

    def load_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = make_questions(NUM_QUESTIONS, seed)
    started = time.monotonic()
    base_answers = greedy_answers(
        load_base(), tokenizer, questions, max_new_tokens=40, completion_prompt=demo.content_prompt
    )
    log.info("base model answered %d training questions in %.1f s", len(questions), time.monotonic() - started)
    sample_question = HELD_OUT_QUESTIONS[0]
    for name in names:
        config = dataclasses.replace(ADAPTER_CONFIGS[name], seed=seed, **({"steps": steps} if steps else {}))
        examples = make_examples(name, questions, base_answers)
        with tempfile.TemporaryDirectory(prefix=f"openlora-demo-{name}-") as tmp:
            started = time.monotonic()
            model = train_adapter(
                load_base(), tokenizer, examples, Path(tmp), config, base_model_name=demo.base_model_name, desc=name
            )
            seconds = time.monotonic() - started
            manifest = store.push(tmp, name)
        (answer,) = greedy_answers(model, tokenizer, [sample_question])
        shown = "shows" if BEHAVIOURS[name].check(answer) else "does NOT show yet (try more --steps)"
        print(f"{name}: trained on {len(examples)} examples, {config.steps} steps in {seconds:.0f} s; "
              f"pushed {manifest.name}@{manifest.version} to {store.settings.uri}")
        print(f"  {sample_question!r} -> {answer!r}  [behaviour {shown}]")

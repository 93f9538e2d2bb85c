"""The base models ``demo adapters --model`` trains on, and what differs between them.

The data, training and checking code is the same for every model; only three things differ: the
name recorded in the adapters, which adapters are trained by default, and how the base model is
asked for the *content* of the training answers. SmolLM2-135M-Instruct answers chat turns, so it
is asked in chat. Gemma 3 270M is a pretrained base model: asked in Gemma's turns it rambles
(``"What is the capital of France? mendatang"``), but it completes a question-and-answer text
sensibly, so it is asked with a plain completion prompt and its adapter is still trained, and
served, in chat turns: the adapter teaches it to answer a turn, in the adapter's style.
"""

from __future__ import annotations

from dataclasses import dataclass

from openlora_ray.demo.behaviours import BEHAVIOURS
from openlora_ray.model.prepare import DEMO_MODEL_NAME

# Two worked answers show a base model the form wanted (one short, complete sentence); their
# topics appear in no question template, so they lend the answers no content.
_FEW_SHOT_QA = (
    "Question: What is a violin?\nAnswer: A violin is a wooden string instrument played with a bow.\n\n"
    "Question: How do I clean glasses?\nAnswer: Rinse them in warm water and dry them with a soft cloth.\n\n"
    "Question: {question}\nAnswer:"
)


@dataclass(frozen=True)
class DemoModel:
    """A model of ``model prepare`` the demo adapters can be trained on."""

    name: str  # the name of ``model prepare`` (and the served name of the base model)
    base_model_name: str  # recorded as the adapters' base model instead of this machine's cache path
    adapters: tuple[str, ...]  # behaviours trained when ``--only`` is not given
    content_prompt: str | None = None  # completion prompt with ``{question}``; None: ask in chat


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel(DEMO_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct", adapters=tuple(BEHAVIOURS)),
        # One adapter: a 270M model's training step costs several times SmolLM2's on 2 cores.
        DemoModel("gemma3-270m", "google/gemma-3-270m", adapters=("json-answer",), content_prompt=_FEW_SHOT_QA),
    )
}

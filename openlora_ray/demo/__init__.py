"""Demo LoRA adapters for SmolLM2, each with a behaviour a person sees in one answer.

``openlora-ray demo adapters`` generates its own chat data (:mod:`.data`), trains each adapter with
PEFT on CPU (:mod:`.train`) and pushes it to the adapter store; :mod:`.behaviours` holds the pure
checkers that tell whether an answer shows a behaviour.
"""

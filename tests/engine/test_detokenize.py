"""Streamed text equals a whole decode; stop strings match like ``str.find``; both in linear time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from openlora_ray.engine.detokenize import IncrementalText, StopMatcher
from openlora_ray.engine.request import MAX_STOP_CHARS, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def stream(tokenizer, ids, stop=(), **options) -> tuple[str, bool]:
    text = IncrementalText(tokenizer, tuple(stop), **options)
    out = ""
    for t in ids:
        delta, stopped = text.add(t)
        out += delta
        if stopped:
            return out, True
    return out + text.flush(), False


def test_streamed_text_equals_decoding_all_ids(tokenizer):
    sample = "Héllo wörld — naïve café 🙂🚀 日本語のテキスト, then plain ASCII and numbers 12345.\n  indented"
    ids = tokenizer(sample).input_ids
    assert stream(tokenizer, ids) == (tokenizer.decode(ids, skip_special_tokens=True), False)


@pytest.mark.parametrize("stop", ["wörld", "🙂", "ASCII and", "\n  ind", "not there"])
def test_text_stops_before_the_first_stop_string(tokenizer, stop):
    sample = "Héllo wörld — naïve café 🙂🚀 plain ASCII and numbers.\n  indented"
    full = tokenizer.decode(tokenizer(sample).input_ids, skip_special_tokens=True)
    at = full.find(stop)
    want = (full, False) if at == -1 else (full[:at], True)
    assert stream(tokenizer, tokenizer(sample).input_ids, stop=[stop, "zzz-never"]) == want


@pytest.mark.parametrize("stop", ["wörld", "🙂", "\n  ind"])
def test_include_stop_ends_the_text_with_the_stop_string(tokenizer, stop):
    sample = "Héllo wörld — naïve café 🙂🚀 plain ASCII and numbers.\n  indented"
    full = tokenizer.decode(tokenizer(sample).input_ids, skip_special_tokens=True)
    want = full[: full.find(stop) + len(stop)]
    assert stream(tokenizer, tokenizer(sample).input_ids, stop=[stop], include_stop=True) == (want, True)


def test_special_tokens_stay_in_the_text_unless_skipped(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids
    assert stream(tokenizer, ids, skip_special_tokens=False) == ("<|im_start|>user\nhi<|im_end|>", False)
    assert stream(tokenizer, ids) == ("user\nhi", False)
    assert stream(tokenizer, ids, stop=["<|im_end|>"], skip_special_tokens=False) == ("<|im_start|>user\nhi", True)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab", max_size=40), st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=3))
def test_kmp_finds_the_first_match_of_any_stop_string(text, stops):
    matchers = [StopMatcher(s) for s in stops]
    found = None
    for i, ch in enumerate(text):
        if any(m.feed(ch) for m in matchers):
            found = i + 1
            break
    ends = [text.find(s) + len(s) for s in stops if s in text]
    assert found == (min(ends) if ends else None)


class CountingList(list):
    reads = 0

    def __getitem__(self, i):
        CountingList.reads += 1
        return super().__getitem__(i)


def test_a_very_long_stop_string_is_matched_with_linear_work():
    """The hold-back used to compare every suffix with every prefix: quadratic in the stop string."""
    m = StopMatcher("a" * 2_000 + "b")
    m._fail = CountingList(m._fail)
    text = ("a" * 3_000 + "c") * 5
    assert not any(m.feed(c) for c in text)
    assert CountingList.reads <= 2 * len(text)  # amortised: every fallback undoes an earlier advance
    assert m.state == 0


def test_stop_strings_are_capped():
    SamplingParams(stop=["x" * MAX_STOP_CHARS])
    with pytest.raises(ValidationError, match=f"at most {MAX_STOP_CHARS} characters"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])

"""Running the choices of one OpenAI request side by side, and answering with all of them.

Each choice (``n`` per prompt, one prompt per entry of a completions prompt list) is an engine
request of its own, streamed from a replica. They start together; the HTTP status is decided only
once every choice has produced its first increment, so an adapter that cannot load or a full
queue is a proper 4xx/5xx rather than an error event inside a 200 stream. After that, a failing
choice ends the stream with an error event and the others are cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openlora_ray.serve.openai_api import Choice
from openlora_ray.serve.openai_responses import DONE, ChoiceResult, ChunkWriter, logprobs_body, sse, total_usage


class ReplicaStream(Protocol):
    """What Serve's streaming handle call returns (``DeploymentResponseGenerator``)."""

    def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


@dataclass
class RunningChoices:
    """Every choice of a request, each past its first increment."""

    choices: Sequence[Choice]
    streams: Sequence[ReplicaStream]
    firsts: Sequence[dict[str, Any]]

    @property
    def replica(self) -> str:
        return self.firsts[0]["replica"]

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    async def collect(self) -> list[dict[str, Any]]:
        """Each choice's last increment, its ``text`` the whole text (non-streaming answers)."""
        try:
            return list(await asyncio.gather(*(self._drain(i) for i in range(len(self.choices)))))
        except BaseException:
            self.cancel()
            raise

    async def _drain(self, i: int) -> dict[str, Any]:
        item = self.firsts[i]
        text, logprobs, prompt_logprobs = item["text"], item.get("logprobs"), item.get("prompt_logprobs")
        while not item["finish_reason"]:
            item = await self.streams[i].__anext__()
            text += item["text"]
            if logprobs is not None:
                logprobs = logprobs + (item.get("logprobs") or [])
            prompt_logprobs = prompt_logprobs or item.get("prompt_logprobs")  # sent once
        return {**item, "text": text, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}

    async def events(
        self,
        writer: ChunkWriter,
        include_usage: bool,
        on_done: Callable[[list[dict[str, Any]]], None],
        on_error: Callable[[BaseException], dict[str, Any]],
        shape: Sequence[Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """Server-sent events of all choices, interleaved as their increments arrive; ``shape[i]``
        rewrites choice ``i``'s increments first (its text parsed into tool calls)."""
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None, BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            item = self.firsts[i]
            try:
                while True:
                    queue.put_nowait((i, item, None))
                    if item["finish_reason"]:
                        return
                    item = await self.streams[i].__anext__()
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which ends the stream with it
                queue.put_nowait((i, None, e))

        pumps = [asyncio.create_task(pump(i)) for i in range(len(self.choices))]
        lasts: dict[int, dict[str, Any]] = {}
        offsets = [0] * len(self.choices)  # completions' text_offset, per choice
        try:
            if writer.chat:
                for c in self.choices:
                    yield sse(writer.role(c.index))
            while len(lasts) < len(self.choices):
                i, item, error = await queue.get()
                if error is not None:
                    yield sse({"error": on_error(error)})
                    yield DONE
                    return
                assert item is not None
                if shape is not None:
                    item = shape[i](item)
                entries = item.get("logprobs")
                if item["text"] or item["finish_reason"] or entries or item.get("tool_calls"):
                    logprobs = logprobs_body(entries, writer.chat, offsets[i])
                    offsets[i] += sum(len(e["token"]) for e in entries or ())
                    yield sse(
                        writer.text(
                            self.choices[i].index, item["text"], item["finish_reason"], logprobs, item.get("tool_calls")
                        )
                    )
                if item["finish_reason"]:
                    lasts[i] = item
            ordered = [lasts[i] for i in range(len(self.choices))]
            on_done(ordered)
            if include_usage:
                yield sse(writer.usage(total_usage(results(self.choices, ordered))))
            yield DONE
        finally:
            for task in pumps:
                task.cancel()
            if len(lasts) < len(self.choices):
                self.cancel()


async def start_choices(choices: Sequence[Choice], start: Callable[[Choice], ReplicaStream]) -> RunningChoices:
    """Start every choice and wait for each one's first increment (or the first failure)."""
    streams = [start(c) for c in choices]
    try:
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    except BaseException:  # the caller went away meanwhile (cancelled): Serve does not cascade it
        for s in streams:
            s.cancel()
        raise
    failed = [f for f in firsts if isinstance(f, BaseException)]
    if failed:
        for s in streams:
            s.cancel()
        raise failed[0]
    return RunningChoices(choices, streams, firsts)


def results(choices: Sequence[Choice], lasts: Sequence[dict[str, Any]]) -> list[ChoiceResult]:
    return [
        ChoiceResult(
            index=c.index,
            prompt_index=c.prompt_index,
            text=last["text"],
            finish_reason=last["finish_reason"],
            prompt_tokens=last["prompt_tokens"],
            completion_tokens=last["completion_tokens"],
            logprobs=last.get("logprobs"),
            tool_calls=last.get("tool_calls"),
            prompt_logprobs=last.get("prompt_logprobs"),
        )
        for c, last in zip(choices, lasts, strict=True)
    ]


def chunk_writer(rid: str, model: str, chat: bool) -> ChunkWriter:
    return ChunkWriter(rid=rid, model=model, chat=chat, created=int(time.time()))

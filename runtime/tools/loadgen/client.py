"""One streaming request to an OpenAI-compatible endpoint and what it measured.

Two endpoint shapes: ``/v1/completions`` (a ``prompt``; chunks carry ``choices[].text``) and
``/v1/chat/completions`` (the prompt as one user message; chunks carry ``choices[].delta.content``,
the first one usually a role-only delta with no text). Chat servers apply their chat template, so
the prompt tokens they count are a few more than the target; the usage chunk says how many.

Times are ``time.perf_counter()`` seconds. Each SSE chunk that carries text is one "token" event
for TTFT and ITL, as vLLM's ``bench serve`` counts them: a server that holds text back (partial
UTF-8, a possible stop string) sends several tokens in one chunk, and the gap before it is one
ITL. The output token count comes from the usage chunk (``stream_options.include_usage``) when
the server sends one, else from the number of text chunks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from conveyor.runtime.tools.loadgen.workloads import WorkItem


@dataclass
class RequestRecord:
    index: int
    prompt_len: int  # the target; prompt_tokens is what the server counted
    output_len: int
    start_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    status: int = 0  # HTTP status; 0 when no response came (connection refused, timeout)
    error: str = ""
    text: str = ""

    @property
    def success(self) -> bool:
        return self.status == 200 and not self.error


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Delta | None = None  # chat completions

    @property
    def new_text(self) -> str:
        if self.text is not None:
            return self.text
        return (self.delta.content or "") if self.delta is not None else ""


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict | None = None  # an error event inside a 200 stream (OpenAI's shape)


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass(frozen=True)
class RequestOptions:
    url: str  # full endpoint, e.g. http://127.0.0.1:8000/v1/completions
    model: str
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict | None = None  # merged into every request body last (--extra-body)

    @property
    def chat(self) -> bool:
        """The endpoint takes chat messages (``.../chat/completions``), not a prompt."""
        return self.url.rstrip("/").endswith("/chat/completions")


def request_body(opts: RequestOptions, item: WorkItem) -> dict:
    body: dict = {"model": opts.model, "temperature": opts.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if opts.chat:
        # max_completion_tokens is OpenAI's current name for chat (vLLM's bench sends it too).
        body.update(messages=[{"role": "user", "content": item.prompt}], max_completion_tokens=item.output_len)
    else:
        body.update(prompt=item.prompt, max_tokens=item.output_len)
    if opts.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; servers that don't know it ignore it
    if opts.extra_body:
        body.update(opts.extra_body)
    return body


async def send_completion(session: aiohttp.ClientSession, opts: RequestOptions, item: WorkItem, index: int,
                          t0: float) -> RequestRecord:
    rec = RequestRecord(index=index, prompt_len=item.prompt_len, output_len=item.output_len)
    body = request_body(opts, item)
    start = time.perf_counter()
    rec.start_s = start - t0
    last = start
    chunks: list[str] = []
    try:
        async with session.post(opts.url, json=body) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = (await resp.text())[:500]
                return rec
            async for raw in resp.content:  # aiohttp yields one line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = _decode_chunk(data)
                now = time.perf_counter()
                if chunk.error is not None:
                    rec.error = str(chunk.error.get("message", chunk.error))
                    continue
                if chunk.usage is not None:
                    rec.prompt_tokens = chunk.usage.prompt_tokens
                    rec.output_tokens = chunk.usage.completion_tokens
                text = "".join(c.new_text for c in chunk.choices)
                if not text:
                    continue  # the usage chunk, role-only and empty deltas are not tokens
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.itl_s.append(now - last)
                last = now
                chunks.append(text)
        rec.e2e_s = last - start if rec.ttft_s is not None else time.perf_counter() - start
        if rec.output_tokens == 0:
            rec.output_tokens = len(chunks)
        rec.text = "".join(chunks)
        if rec.ttft_s is None and not rec.error:
            rec.error = "the stream ended without any text"
    except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def wait_ready(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> None:
    """Poll ``/v1/models`` (every OpenAI-compatible server has it) until it answers 200, for at most ``timeout_s``.

    A server still loading refuses connections (vLLM, SGLang) or answers 503 (Conveyor): both wait.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    while True:
        try:
            async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
                if resp.status == 200:
                    return
                if resp.status in (401, 403):  # waiting will not fix a wrong key
                    raise ValueError(f"{base_url}/v1/models answered {resp.status}: check --api-key")
                last = f"status {resp.status}"
        except aiohttp.ClientConnectionError as e:
            last = f"{type(e).__name__}: {e}"
        if loop.time() >= deadline:
            raise ValueError(f"the server at {base_url} was not ready after {timeout_s:g} s ({last})")
        await asyncio.sleep(0.2)


async def first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The model a server serves, from ``/v1/models``, when ``--model`` is not given."""
    async with session.get(base_url.rstrip("/") + "/v1/models") as resp:
        resp.raise_for_status()
        data = await resp.json()
    return data["data"][0]["id"]

"""The offline facade: ``LLM(...).generate([...])`` runs a batch to completion, no event loop needed."""

from __future__ import annotations

import time
from typing import Any, Sequence

from tqdm import tqdm


from runtime.config import EngineConfig
from runtime.engine_core import STALL_POLL_S, EngineCore
from runtime.input_processor import Prompt
from runtime.outputs import Completion
from scheduler import SamplingParams


class LLM:
    def __init__(self, model: str = "default", **overrides: Any) -> None:
        self.core = EngineCore(EngineConfig(model=model, **overrides))

    def close(self) -> None:
        self.core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[Completion]:
        ids = [self.core.inputs.token_ids(p) for p in prompts]
        return self._run(ids, params, use_tqdm)

    def chat(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[Completion]:
        ids = [self.core.inputs.token_ids(messages=c) for c in conversations]
        return self._run(ids, params, use_tqdm)

    def _run(self, prompt_ids: list[list[int]], params: Any, use_tqdm: bool) -> list[Completion]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"{len(params)} sampling params for {len(prompt_ids)} prompts")
        # Validate everything before anything runs, so a bad prompt cannot strand the others.
        reqs = [self.core.inputs.make_request(ids, p, request_id=str(i)) for i, (ids, p) in
                enumerate(zip(prompt_ids, params))]
        texts: dict[str, list[str]] = {r.request_id: [] for r in reqs}
        for r in reqs:
            if (out := self.core.add_request(r)) is not None:  # refused by the engine: it fails alone
                texts[r.request_id].append(out.text)
        with tqdm(total=len(reqs), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.core.has_work():
                for out in self.core.step():
                    texts[out.request_id].append(out.text)
                    bar.update(out.finished)
                if self.core.stalled:  # the policy holds requests back (a static batch filling up)
                    time.sleep(STALL_POLL_S)
        return [
            Completion(
                request_id=r.request_id,
                text="".join(texts[r.request_id]),
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason.value,
                stop_reason=r.stop_reason,
                num_prompt_tokens=r.num_prompt_tokens,
                num_cached_tokens=r.num_cached_tokens,
            )
            for r in reqs
        ]

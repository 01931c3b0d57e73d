"""Count the prompt tokens of a chat completion request exactly as llama-cpp-python would.

``Llama.create_chat_completion`` picks the model's chat handler (an explicit handler, the GGUF's own
Jinja chat template, or a named chat format), the handler formats the messages (and tools) into a
prompt and hands it to ``create_completion``, which adds BOS/EOS as the model asks and reports
``usage.prompt_tokens``. Rather than re-implement any of that, the count runs the very same
``create_chat_completion`` on a stand-in for the model that forwards everything to the real one but
stops at the ``create_completion`` call, where the prompt is final, and measures it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PromptReady(Exception):
    """Raised by the stand-in when the handler asks for the completion: carries the prompt tokens."""

    def __init__(self, tokens: list[int]):
        super().__init__(f"{len(tokens)} prompt tokens")
        self.tokens = tokens


def completion_prompt_tokens(llama: Any, prompt: str | Sequence[int], suffix: str | None = None) -> list[int]:
    """The tokens ``Llama.create_completion`` evaluates for ``prompt`` (no infill suffix).

    A token list is taken as it is; a string gets the model's BOS (or CLS) and EOS (or SEP) tokens
    around it when the model's tokenizer adds them.
    """
    if suffix is not None:
        raise ValueError("counting an infill prompt (suffix) is not supported")
    if not isinstance(prompt, str):
        return list(prompt)
    model = llama._model
    cls_id, sep_id = model.token_cls(), model.token_sep()
    bos = [cls_id if cls_id != -1 else llama.token_bos()]
    if not model.add_bos_token() or bos[0] == -1:
        bos = []
    eos = [sep_id if sep_id != -1 else llama.token_eos()]
    if not model.add_eos_token() and sep_id == -1:
        eos = []
    body = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
    return bos + body + eos


class PromptCatcher:
    """Stands in for a ``Llama`` inside ``create_chat_completion`` and stops at the completion call."""

    def __init__(self, llama: Any):
        object.__setattr__(self, "_llama", llama)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._llama, name, value)

    def create_completion(self, prompt: str | Sequence[int], suffix: str | None = None, **_: Any) -> Any:
        raise PromptReady(completion_prompt_tokens(self._llama, prompt, suffix))

    __call__ = create_completion


def chat_prompt_tokens(llama: Any, request: dict[str, Any], create_chat_completion: Any = None) -> int:
    """``usage.prompt_tokens`` of ``create_chat_completion(**request)`` on ``llama``, without generating.

    ``create_chat_completion`` defaults to ``llama_cpp.Llama.create_chat_completion``; it is called
    unbound, with the stand-in as ``self``, so handler selection is the model's own.
    """
    if create_chat_completion is None:
        import llama_cpp

        create_chat_completion = llama_cpp.Llama.create_chat_completion
    try:
        create_chat_completion(PromptCatcher(llama), **request)
    except PromptReady as ready:
        return len(ready.tokens)
    raise RuntimeError("the chat handler returned without asking for a completion; cannot count its prompt")

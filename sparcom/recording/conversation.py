"""The one conversation format shared by SFT and probing.

A record becomes ``[user: instruction (+ "\\n\\n" + input), assistant: output]`` rendered with the
tokenizer's chat template. The prompt (the user turn through the generation prompt) and the response
are tokenised separately and concatenated, so the two masks split the ids exactly. What a template
puts before the user turn on its own (SmolLM2's injects a default system prompt: 30 tokens, the same
in every conversation) is context: it is run through the model but belongs to neither mask, so no
scope counts it. For the ``"generated"`` scope the response is the model's own continuation of the
prompt (``continued``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparcom.data import Record

TOKEN_SCOPES = ("prompt", "response", "all", "generated")


@dataclass(frozen=True)
class Encoded:
    """One tokenised conversation.

    Attributes:
        input_ids: ``[L]`` token ids.
        prompt_mask: ``[L]`` bool, True on prompt tokens (the user turn through the generation prompt).
        response_mask: ``[L]`` bool, True on response tokens. Tokens in neither are the context a
            chat template injects before the user turn (a default system prompt), always first.
        generated: whether the response is the model's own continuation rather than the record's.
    """

    input_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    generated: bool = False

    def scope_mask(self, token_scope: str) -> torch.Tensor:
        """``[L]`` bool: the tokens a recording with this token scope counts."""
        if token_scope == "prompt":
            return self.prompt_mask
        if token_scope == "response":
            return self.response_mask
        if token_scope == "all":
            return self.prompt_mask | self.response_mask
        if token_scope == "generated":
            if not self.generated:
                raise ValueError(
                    "token_scope 'generated' counts the model's own continuation, and this conversation "
                    "holds the record's response; build it with sparcom.recording.conversation.continued"
                )
            return self.response_mask
        raise ValueError(f"unknown token_scope {token_scope!r}; expected one of {list(TOKEN_SCOPES)}")

    def needed_for(self, token_scope: str) -> Encoded:
        """The shortest prefix that still holds every counted token. In a causal LM no token sees
        later ones, so dropping the response leaves every prompt token's activations unchanged.
        The generated scope keeps the prompt alone too: the model writes its own response."""
        if token_scope not in ("prompt", "generated"):
            return self
        end = _prompt_end(self.prompt_mask)
        return Encoded(self.input_ids[:end], self.prompt_mask[:end], self.response_mask[:end])


def messages(record: Record) -> list[dict[str, str]]:
    """The chat messages of a HexaInst-schema record."""
    user = record["instruction"] if not record["input"] else f"{record['instruction']}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def encode(record: Record, tokenizer, max_length: int | None = None) -> Encoded:
    """Tokenise a record with the tokenizer's chat template; truncates the response past ``max_length``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
            "use an instruct/chat tokenizer or set tokenizer.chat_template"
        )
    conversation = messages(record)
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template renders the prompt differently inside the full conversation")
    context = injected_context(tokenizer, prompt)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    prompt_ids = tokenizer(prompt[len(context) :], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = context_ids + prompt_ids + response_ids
    ids = ids[:max_length] if max_length else ids
    start, end = min(len(context_ids), len(ids)), min(len(context_ids) + len(prompt_ids), len(ids))
    prompt_mask = torch.zeros(len(ids), dtype=torch.bool)
    prompt_mask[start:end] = True
    response_mask = torch.zeros(len(ids), dtype=torch.bool)
    response_mask[end:] = True
    return Encoded(torch.tensor(ids, dtype=torch.long), prompt_mask, response_mask)


def injected_context(tokenizer, prompt: str) -> str:
    """The text a chat template renders before the user turn of ``prompt`` without being given it
    (a default system prompt), or "". Found by rendering an explicit system message: what that
    renders before the user turn is the template's turn header, and whatever ``prompt`` holds before
    that header was injected. A template that takes no system message injects nothing we can tell."""
    marker = "\x00sparcom-system\x00"
    try:
        system = tokenizer.apply_chat_template([{"role": "system", "content": marker}], tokenize=False)
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": marker}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # noqa: BLE001 - templates that refuse a system role (Gemma) inject none
        return ""
    if marker not in system or not with_system.startswith(system):
        return ""
    header = with_system[len(system) : with_system.index(marker, len(system))]  # the user turn's header
    start = prompt.find(header) if header else -1
    return prompt[:start] if start > 0 else ""


def continued(prompt: Encoded, continuation: list[int]) -> Encoded:
    """The prompt followed by a continuation the model generated, which becomes the response."""
    end = _prompt_end(prompt.prompt_mask)
    ids = torch.cat([prompt.input_ids[:end], torch.tensor(continuation, dtype=torch.long)])
    prompt_mask = torch.zeros(len(ids), dtype=torch.bool)
    prompt_mask[:end] = prompt.prompt_mask[:end]
    response_mask = torch.zeros(len(ids), dtype=torch.bool)
    response_mask[end:] = True
    return Encoded(ids, prompt_mask, response_mask, generated=True)


def _prompt_end(prompt_mask: torch.Tensor) -> int:
    """Where the prompt ends: after its last token (the context before it, if any, included)."""
    found = prompt_mask.nonzero()
    return int(found[-1]) + 1 if len(found) else 0

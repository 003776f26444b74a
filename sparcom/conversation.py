"""The one conversation format shared by SFT and probing.

A record becomes ``[user: instruction (+ "\\n\\n" + input), assistant: output]`` rendered with the
tokenizer's chat template. The prompt (everything up to and including the generation prompt) and
the response are tokenised separately and concatenated, so the two masks split the ids exactly. For the
``"generated"`` scope the response is the model's own continuation of the prompt (``continued``).
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
        prompt_mask: ``[L]`` bool, True on prompt tokens (through the generation prompt).
        response_mask: ``[L]`` bool, True on response tokens; ``prompt_mask ^ response_mask`` is all True.
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
                    "holds the record's response; build it with sparcom.conversation.continued"
                )
            return self.response_mask
        raise ValueError(f"unknown token_scope {token_scope!r}; expected one of {list(TOKEN_SCOPES)}")

    def needed_for(self, token_scope: str) -> Encoded:
        """The shortest prefix that still holds every counted token. In a causal LM no token sees
        later ones, so dropping the response leaves every prompt token's activations unchanged.
        The generated scope keeps the prompt alone too: the model writes its own response."""
        if token_scope not in ("prompt", "generated"):
            return self
        end = int(self.prompt_mask.sum())
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
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length] if max_length else prompt_ids + response_ids
    prompt_mask = torch.zeros(len(ids), dtype=torch.bool)
    prompt_mask[: len(prompt_ids)] = True
    return Encoded(torch.tensor(ids, dtype=torch.long), prompt_mask, ~prompt_mask)


def continued(prompt: Encoded, continuation: list[int]) -> Encoded:
    """The prompt followed by a continuation the model generated, which becomes the response."""
    end = int(prompt.prompt_mask.sum())
    ids = torch.cat([prompt.input_ids[:end], torch.tensor(continuation, dtype=torch.long)])
    prompt_mask = torch.zeros(len(ids), dtype=torch.bool)
    prompt_mask[:end] = True
    return Encoded(ids, prompt_mask, ~prompt_mask, generated=True)

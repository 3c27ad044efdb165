"""Chat templates: how a prompt of the game's data becomes the token ids an instruct policy reads.

The game keeps every prompt as text in one canonical form, the one its data came in: an HH-RLHF dialogue prefix
("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:") or any other text (a JSONL prompt). Reward
models and logs read that text. A policy with a chat template reads the same conversation in its own format:
the dialogue's turns become user and assistant messages (other text one user message), rendered by the
template with its generation prompt, and tokenized without further special tokens, so the ids equal
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. A written response (a golden answer, a
human pair's side) is the assistant's message: its text without surrounding whitespace, then the template's
end-of-turn token, the token a sampled response stops on.

`data.chat_template` chooses: "auto" uses the policy tokenizer's own template (none if it has none), "none"
reads prompts as raw text (the builtin task, base models), anything else is a Jinja template file. Actors get
the setting as "auto", "none" or the template's text (`template_setting`), so a file need not be on their node.
"""

from __future__ import annotations

import re
from pathlib import Path

from apo_ray.config import ConfigError
from apo_ray.data import HH_ASSISTANT

AUTO, NONE = "auto", "none"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
# An assistant message no template would alter, to find where the template ends the turn.
_PROBE = "apo-ray-end-of-turn-probe"


class ChatTemplateError(ConfigError):
    """A template file that cannot be read or parsed; the message names the key and the file."""


def messages_of(prompt: str) -> list[dict[str, str]]:
    """The conversation a prompt holds: an HH dialogue prefix as its turns (the open "Assistant:" at the end
    left for the generation prompt), any other text as one user message."""
    if prompt.startswith("\n\nHuman:") and prompt.endswith(HH_ASSISTANT):
        parts = _HH_TURN.split(prompt[: -len(HH_ASSISTANT)])
        # split gives ["", role, text, role, text, ...]
        return [{"role": _ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    return [{"role": "user", "content": prompt.strip()}]


def template_setting(value: str, key: str = "data.chat_template") -> str:
    """What actors get for a `data.chat_template` value: "auto", "none", or the text of the template file the
    value names (read and parsed here, on the driver, so a bad file stops the run before Ray starts)."""
    if value in (AUTO, NONE):
        return value
    path = Path(value)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ChatTemplateError(f"{key}: {value}: cannot read the template ({exc.strerror or exc})") from None
    check_template(text, f"{key}: {value}")
    return text


def check_template(text: str, where: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{where}:{exc.lineno}: not a Jinja template ({exc.message})") from None
    if not text.strip():
        raise ChatTemplateError(f"{where}: the template is empty")


def resolve_template(setting: str | None, tokenizer) -> str | None:
    """The template text a policy renders with, or None for raw prompts: "auto" is the tokenizer's own."""
    if setting is None or setting == NONE:
        return None
    if setting == AUTO:
        return getattr(tokenizer, "chat_template", None) or None
    return setting


class ChatFormat:
    """A policy tokenizer with the template it renders prompts with (None: prompts are raw text)."""

    def __init__(self, tokenizer, template: str | None):
        self.tokenizer, self.template = tokenizer, template
        self.end_of_turn_id = self._end_of_turn_id() if template else None

    @classmethod
    def for_setting(cls, tokenizer, setting: str | None) -> ChatFormat:
        return cls(tokenizer, resolve_template(setting, tokenizer))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _end_of_turn_id(self) -> int | None:
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(turn, add_generation_prompt=False)
        after = text[text.rindex(_PROBE) + len(_PROBE) :]
        ids = self._ids(after) if after.strip() else []
        # A template that closes no turn, or closes it with whitespace alone (which answers contain too): written
        # responses end with the model's EOS instead.
        return ids[0] if ids else None

    def prompt_ids(self, prompt: str, max_tokens: int) -> tuple[list[int], bool]:
        """The ids the policy reads for `prompt`, at most `max_tokens`, and whether anything was cut.

        Raw text is cut from the left. A rendered conversation first loses whole turns from its start (the
        template's own system message stays), so what is left still reads as a conversation ending in the last
        user turn; only if that turn alone is too long are the ids cut from the left."""
        if self.template is None:
            ids = self._ids(prompt)
            return ids[-max_tokens:], len(ids) > max_tokens
        messages = messages_of(prompt)
        ids = self._ids(self.render(messages))
        cut = False
        while len(ids) > max_tokens and len(messages) > 1:
            # Drop up to (not including) the next user turn after the first message.
            nxt = next((i for i, m in enumerate(messages[1:], 1) if m["role"] == "user"), len(messages) - 1)
            messages, cut = messages[nxt:], True
            ids = self._ids(self.render(messages))
        return ids[-max_tokens:], cut or len(ids) > max_tokens

    def response_tokens(self, response: str) -> list[int]:
        """A written response's own tokens: through a template, the assistant message's text (stripped)."""
        return self._ids(response.strip() if self.template is not None else response)

    def response_ids(self, response: str, max_tokens: int, eos_token_id: int) -> list[int]:
        """A written response as the policy would end it: cut to `max_tokens`, then the template's end-of-turn
        token (with no template, or one that closes no turn, `eos_token_id`), since a written response is
        complete."""
        end = eos_token_id if self.end_of_turn_id is None else self.end_of_turn_id
        return self.response_tokens(response)[:max_tokens] + [end]

    def stop_ids(self) -> frozenset[int]:
        """Tokens that end a sampled turn besides the model's EOS ids."""
        return frozenset() if self.end_of_turn_id is None else frozenset({self.end_of_turn_id})


def reward_text(prompt: str, response: str) -> str:
    """The conversation as a reward model reads it, in the prompt's own form. An HH dialogue ends in
    "Assistant:" and its written responses start with a space; a response sampled through a chat template
    starts with none, so one is put back: the RM reads the dialogue it was trained on."""
    if prompt.endswith(HH_ASSISTANT) and response[:1] and not response[:1].isspace():
        return f"{prompt} {response}"
    return prompt + response

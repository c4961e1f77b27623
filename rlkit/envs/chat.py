"""Chat-template turn delimiters as text, so an episode grows by appending tokens.

An episode's sequence is never re-rendered or re-tokenised: the first prompt is
tokenised once, each reply is kept as the sampled token ids, and each observation is
tokenised once together with the text the template puts around a user turn. That text
is read off the template itself by rendering two short conversations with placeholder
contents and taking the difference:

    one = render([user U, assistant A])
    two = render([user U, assistant A, user O], add_generation_prompt=True)

``two`` must start with ``one`` (the template only appends; one that rewrites earlier
turns cannot be used token-in/token-out, and is refused). What follows A in ``one`` is
``after_reply`` (ChatML: ``<|im_end|>\\n``); ``two[len(one):]`` split at O gives
``before_observation`` (``<|im_start|>user\\n``) and ``after_observation``
(``<|im_end|>\\n<|im_start|>assistant\\n``). A reply the model ended with its stop token
(``<|im_end|>`` for SmolLM2) already holds the start of ``after_reply``; only the rest is
added. Caveat: a template that trims or escapes message contents applies that to the
real contents, not to the placeholders; observations are inserted verbatim.
"""

from __future__ import annotations

import dataclasses

REPLY, USER, OBSERVATION = "@@rlkit-reply@@", "@@rlkit-user@@", "@@rlkit-observation@@"

# A small template for tokenizers without one (rlkit's tiny model): Zephyr-style turns,
# closed by the tokenizer's EOS so that the sampler's EOS is the end of a turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TurnDelimiters:
    """The template's text around a user turn that follows an assistant reply."""

    after_reply: str
    before_observation: str
    after_observation: str

    def observation_text(self, observation: str, reply_stop: str | None) -> str:
        """What follows a reply up to the next reply's first token: the reply's closing
        (less the stop token the model already wrote, ``reply_stop``, when the closing
        starts with it), the observation as a user turn, and the generation prompt."""
        closing = self.after_reply
        if reply_stop and closing.startswith(reply_stop):
            closing = closing[len(reply_stop) :]
        return closing + self.before_observation + observation + self.after_observation


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def system_messages(system_prompt: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def turn_delimiters(tokenizer, system_prompt: str | None = None) -> TurnDelimiters:
    """Read :class:`TurnDelimiters` off ``tokenizer``'s chat template (see the module docstring)."""
    head = system_messages(system_prompt)
    one = render(tokenizer, [*head, {"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}])
    two = render(
        tokenizer,
        [
            *head,
            {"role": "user", "content": USER},
            {"role": "assistant", "content": REPLY},
            {"role": "user", "content": OBSERVATION},
        ],
        add_generation_prompt=True,
    )
    if not two.startswith(one) or one.count(REPLY) != 1:
        raise ValueError(
            "the chat template rewrites earlier turns when a message is added; "
            "token-in/token-out episodes need a template that only appends"
        )
    tail = two[len(one) :]
    if tail.count(OBSERVATION) != 1:
        raise ValueError("the chat template does not render a user message after an assistant message verbatim")
    before, _, after = tail.partition(OBSERVATION)
    return TurnDelimiters(one[one.index(REPLY) + len(REPLY) :], before, after)


def first_prompt(tokenizer, observation: str, system_prompt: str | None = None) -> str:
    """The opening context: the system prompt, the first observation as a user turn,
    and the generation prompt."""
    messages = [*system_messages(system_prompt), {"role": "user", "content": observation}]
    return render(tokenizer, messages, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as is: special-token strings map to their ids, nothing is added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]

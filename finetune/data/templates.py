"""Prompt templates for instruction data, and chat rendering with the assistant tokens located for the loss."""

import string

ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Used when neither `chat_template` nor the tokenizer has a template.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


def check_prompt_template(template: str, name: str, *, needs_input: bool) -> None:
    """Raises a ValueError unless ``template`` uses only ``{instruction}`` and (when ``needs_input``) ``{input}``."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # e.g. a lone "{"
        raise ValueError(f"{name}: not a valid format string ({e}); write a literal brace as {{{{ or }}}}") from e
    unknown = fields - {"instruction", "input"}
    if unknown:
        raise ValueError(
            f"{name}: unknown placeholder(s) {sorted(unknown)}; use {{instruction}} and {{input}}, and write a literal "
            "brace as {{ or }}"
        )
    if needs_input and "input" not in fields:
        raise ValueError(f"{name}: must contain {{input}} (it is used for rows that have an input)")


def tokenizer_chat_template(tokenizer) -> str | None:
    """The tokenizer's own chat template, if it has one (the default one where it has several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    """The conversation as text, through the Jinja ``template``."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def end_of_turn(tokenizer, template: str | None) -> str | None:
    """What the template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), if any."""
    if not template:
        return None
    mark = "\x00answer\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
    try:
        text = render(tokenizer, template, messages, False)
    except Exception:
        return None
    return text[text.rindex(mark) + len(mark) :].strip() or None if mark in text else None


def end_of_turn_id(tokenizer, template: str | None) -> int | None:
    """The token id that ends an assistant turn of ``template``, a stop for generation next to EOS: only when the
    end-of-turn mark is one token the tokenizer keeps whole (a special or added token, never plain text that a
    model writes mid-answer)."""
    mark = end_of_turn(tokenizer, template)
    if mark is None or mark not in tokenizer.get_added_vocab():
        return None
    ids = tokenizer(mark, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def with_end_of_turn(stop_ids: list[int], tokenizer, template: str | None) -> list[int]:
    """``stop_ids`` and the template's end-of-turn id (``end_of_turn_id``), once each."""
    eot = end_of_turn_id(tokenizer, template)
    return list(dict.fromkeys([*stop_ids, *([eot] if eot is not None else [])]))


class TemplateError(ValueError):
    """The chat template can't be used to find the assistant tokens of a conversation."""


def chat_ids_and_labels(tokenizer, template: str, messages: list[dict], train_on_prompt: bool):
    """Token ids of the rendered conversation and labels: the ids on assistant turns (content and end-of-turn),
    -100 elsewhere, unless ``train_on_prompt``.

    An assistant turn's tokens are those between the rendering of the messages before it with the generation
    prompt and the rendering of the messages up to it, which requires the template to be prefix-stable.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # templates write their own special tokens

    ids = encode(render(tokenizer, template, messages, False))
    if train_on_prompt:
        return ids, list(ids)
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = encode(render(tokenizer, template, messages[:i], True))
        end = encode(render(tokenizer, template, messages[: i + 1], False))
        if ids[: len(start)] != start or ids[: len(end)] != end or len(end) < len(start):
            raise TemplateError(
                f"the chat template is not prefix-stable at message {i} (assistant): the tokens of the conversation "
                f"up to it{' with the generation prompt' if start != ids[: len(start)] else ''} are not a prefix of "
                "the tokens of the whole conversation, so its tokens can't be located for the loss; use a template "
                "that renders earlier messages the same whatever follows (`chat_template`), or train_on_prompt=True"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return ids, labels

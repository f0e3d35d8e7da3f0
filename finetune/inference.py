"""Talking to a model: load a run folder or a Hugging Face folder as our from-scratch model with its tokenizer, and
the ``finetune generate`` / ``finetune chat`` loops over it.

A run is loaded with its adapter merged in memory (the same per-layer peft merge as ``finetune export``), so
generation runs the plain model at full speed; a run on the ``hf`` backend is converted to our model, since the
KV-cache generation, the chat session and speculative decoding are ours.
"""

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.data.collate import prompt_ids
from finetune.data.templates import CHATML, end_of_turn, tokenizer_chat_template, with_end_of_turn
from finetune.models.base import Backbone

# Files any one of which means "this folder has a tokenizer" (fast, BPE pair, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


@dataclass
class Loaded:
    """A model ready to generate: our backbone (eval mode), its tokenizer, and what ends a generation."""

    model: Backbone
    tokenizer: object
    source: str
    stop_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None  # the run's data.chat_template, which wins over the tokenizer's
    generation: dict = field(default_factory=dict)  # sampling settings of the model's generation_config.json
    document: bool = False  # a run trained on the text format: prompts start as its documents did (BOS first)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids: the tokenizer's own (a Hugging Face folder), or as the run's text documents started."""
        return prompt_ids(self.tokenizer, text, document=self.document)


def load(path: str | Path, *, ckpt: str = "best", device: str = "cpu", what: str = "MODEL", quantize=None) -> Loaded:
    """A run folder (``config.yaml``: its ``ckpt``, adapter merged), a quantized folder (``finetune quantize``) or a
    Hugging Face folder (``config.json``); ``quantize`` (a ``finetune.quant.QuantConfig``) quantizes it after."""
    folder = Path(path)
    if (folder / "config.yaml").is_file():
        loaded = _load_run(folder, ckpt)
    elif (folder / "quantization.json").is_file():
        loaded = _load_quantized(folder)
    elif (folder / "config.json").is_file():
        loaded = _load_hf(folder)
    elif folder.exists():
        raise FileNotFoundError(f"{what} {folder}: neither a run folder (config.yaml) nor a Hugging Face model folder "
                                "(config.json)")  # fmt: skip
    else:
        raise FileNotFoundError(f"{what} {folder}: no such folder")
    loaded.model.to(device)
    if quantize is not None:
        from finetune.quant import quantize_model

        quantize_model(loaded.model, quantize)
    return loaded


def _load_quantized(folder: Path) -> Loaded:
    from transformers import AutoTokenizer

    from finetune.quant import load_quantized

    model, info = load_quantized(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Loaded(model, tokenizer, str(folder), info.get("stop_ids") or _eos_ids(model, tokenizer),
                  info.get("chat_template"), document=bool(info.get("document")))  # fmt: skip


def _load_hf(folder: Path) -> Loaded:
    from transformers import AutoTokenizer

    from finetune.models import from_hf

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the model was "
            "trained with into it (tokenizer.save_pretrained), or generate from the run folder"
        )
    model = from_hf(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = _eos_ids(model, tokenizer, folder / "generation_config.json")
    stops = with_end_of_turn(stops, tokenizer, tokenizer_chat_template(tokenizer))
    return Loaded(model, tokenizer, str(folder), stops, generation=generation_defaults(folder))


def _load_run(folder: Path, ckpt: str) -> Loaded:
    from finetune.models.hub import from_state
    from finetune.runs import GENERATING, load_run, merged_state

    run = load_run(folder, ckpt, for_generation=True)  # no Lightning, and peft only for an adapter
    task = run.task
    if task.auto_class not in GENERATING:
        raise ValueError(f"{folder}: a {type(task).__name__} run does not generate text; give a causal LM or "
                         "seq2seq run")  # fmt: skip
    if not (folder / "tokenizer").is_dir():
        raise FileNotFoundError(f"{folder}: no tokenizer/ folder (written when a fit starts); not a complete run")
    config, state = merged_state(run)  # the adapter merged per layer, as in export
    return _run_loaded(run, from_state(config, state, where=str(run.ckpt)))


def _run_loaded(run, model: Backbone) -> Loaded:
    """``model`` with the run's tokenizer, chat template and stop ids."""
    import yaml

    from finetune.runs import trained_on_documents

    data = (yaml.safe_load((run.folder / "config.yaml").read_text()) or {}).get("data") or {}
    tok = run.task.tokenizer  # the run's tokenizer/: a chat run saved its template there (RunFolder)
    template = data.get("chat_template") or tokenizer_chat_template(tok)
    pretrained = run.task.hparams.pretrained
    base = Path(pretrained).expanduser() if pretrained else None  # a local base folder
    generation = generation_defaults(base) if base is not None and base.is_dir() else {}
    stops = with_end_of_turn(_eos_ids(model, tok), tok, template)
    return Loaded(model, tok, str(run.folder), stops, template, generation, trained_on_documents(run))


def load_adapter(base: Loaded, path: str | Path, *, ckpt: str = "best") -> Loaded:
    """A LoRA run trained on ``base`` (its pretrained folder), its adapter unmerged over ``base``'s weights (shared,
    not copied), with the run's tokenizer and chat template."""
    from finetune.models.hub import resolve
    from finetune.runs import GENERATING, adapter_model, load_run

    run = load_run(path, ckpt, for_generation=True)
    pretrained = run.task.hparams.pretrained
    if pretrained is None or resolve(pretrained).resolve() != Path(base.source).resolve():
        raise ValueError(f"--adapter {path}: trained on {pretrained}, not on the served model {base.source}; an "
                         "adapter is served on the base it was trained on")  # fmt: skip
    if run.task.auto_class not in GENERATING:
        raise ValueError(f"--adapter {path}: a {type(run.task).__name__} run does not generate text; serving takes "
                         "causal LM and seq2seq runs")  # fmt: skip
    return _run_loaded(run, adapter_model(run, base.model))


def _eos_ids(model: Backbone, tokenizer, generation_config: Path | None = None) -> list[int]:
    """EOS ids: the generation config's (Llama 3 lists several), the model config's and the tokenizer's."""
    ids = []
    if generation_config is not None and generation_config.is_file():
        ids.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    ids += [getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id]
    flat = [i for x in ids for i in (x if isinstance(x, list) else [x])]
    return list(dict.fromkeys(i for i in flat if i is not None))


def generation_defaults(folder: Path) -> dict:
    """The sampling settings a model ships in ``folder/generation_config.json``, as ``Sampling`` fields, read as
    ``transformers`` reads them: ``do_sample: false`` is greedy (temperature 0); ``do_sample: true`` samples with
    its temperature, top_k and top_p (transformers' defaults 1.0, 50, 1.0 where unset; top_k 0 and top_p 1.0 mean
    off); ``max_new_tokens`` when set. A file without ``do_sample`` (GPT-2's only names its special tokens) gives
    just the values it sets. No file: {}."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    out = {}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    else:
        sampling = {"temperature": 1.0, "top_k": 50, "top_p": 1.0} if config.get("do_sample") else {}
        sampling.update({k: config[k] for k in ("temperature", "top_k", "top_p") if config.get(k) is not None})
        if "top_k" in sampling:
            sampling["top_k"] = sampling["top_k"] if sampling["top_k"] > 0 else None
        if "top_p" in sampling:
            sampling["top_p"] = sampling["top_p"] if sampling["top_p"] < 1.0 else None
        out.update(sampling)
    if config.get("max_new_tokens") is not None:
        out["max_new_tokens"] = config["max_new_tokens"]
    return out


# ------------------------------------------------------------------------------------------ text out
class TextStream:
    """Turns tokens into printable text as they come: decodes the whole answer each time and prints what is new,
    holding back an incomplete UTF-8 character (a byte-level token may carry half of one)."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tok) -> None:
        self.ids.append(int(tok.reshape(-1)[0]) if isinstance(tok, torch.Tensor) else int(tok))
        self._flush(final=False)

    def end(self) -> None:
        """Prints what was held back: the answer ended inside a character (its text keeps the replacement mark)."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        self.write(text[self.printed :])
        self.printed = len(text)


def read_prompts(path: Path) -> list[dict]:
    """Rows of a JSONL file, each with a string ``prompt`` (other keys are carried to the output). All rows are
    checked before the first is generated, so a bad row costs nothing."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the prompts file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}: line {n}: expected an object with a string "prompt", got {line.strip()[:80]}')
        rows.append(row)
    if not rows:
        raise ValueError(f'{path}: no prompts (expected one JSON object per line with a "prompt")')
    return rows


def write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ generate
@dataclass
class Sampling:
    """How to sample; ``finetune generate`` and ``chat`` take each field from its flag, else the model's
    generation_config.json (``generation_defaults``), else these defaults."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = 0

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p)  # fmt: skip


def complete(
    loaded: Loaded,
    prompt: str,
    sampling: Sampling,
    *,
    draft: Loaded | None = None,
    streamer: Callable | None = None,
):
    """The continuation of ``prompt`` (decoders) or the output for it (encoder-decoders), as text; with the
    speculative-decoding stats when there is a ``draft`` model (else None)."""
    from finetune.generation import generate, speculative_generate

    model = loaded.model
    ids = torch.tensor([loaded.encode(prompt)], device=next(model.parameters()).device)  # (1, T)
    common = dict(sampling.kwargs(), seed=sampling.seed, eos_token_id=loaded.stop_ids, streamer=streamer)
    stats = None
    if draft is not None:
        out, stats = speculative_generate(model, draft.model, ids, **common)
    else:
        out = generate(model, ids, **common)
    start = 1 if model.is_encoder_decoder else ids.size(1)  # decoders return the prompt, T5 its start token
    return loaded.tokenizer.decode(out[0, start:].tolist(), skip_special_tokens=True), stats


def check_draft(target: Loaded, draft: Loaded) -> None:
    """A draft proposes token ids for the target: both must share one vocabulary."""
    if target.model.is_encoder_decoder or draft.model.is_encoder_decoder:
        raise ValueError("--draft: speculative decoding is for decoder-only models")
    t, d = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t != d:
        diff = sorted(set(t.items()) ^ set(d.items()))[:3]
        raise ValueError(f"--draft {draft.source}: its tokenizer differs from the target's ({len(d)} vs {len(t)} "
                         f"tokens; first differences {diff}); the draft must use the target's tokenizer")  # fmt: skip


# ------------------------------------------------------------------------------------------ chat
def chat_template_of(loaded: Loaded) -> str:
    """The template a chat with ``loaded`` renders through: the run's, else the tokenizer's, else ChatML."""
    return loaded.chat_template or tokenizer_chat_template(loaded.tokenizer) or CHATML


def chat_prompt(loaded: Loaded, messages: list[dict]) -> tuple[list[int], list[int], str | None]:
    """``messages`` rendered through the chat template, ready for the assistant's answer: (its ids, the ids that
    end the answer, an end-of-turn marker that is not one token, to cut from the text, or None)."""
    from finetune.data.templates import render

    tok, template = loaded.tokenizer, chat_template_of(loaded)
    ids = tok(render(tok, template, messages, True), add_special_tokens=False)["input_ids"]
    return ids, with_end_of_turn(loaded.stop_ids, tok, template), end_of_turn(tok, template)


class Chat:
    """A conversation through the model's chat template, kept in the model's KV cache between turns.

    Each turn renders the whole conversation, and only the tokens after what the cache already holds are run
    through the model. Should a template render earlier turns differently later (not prefix-stable), the cache
    is rebuilt from the full conversation (counted in ``refed``), so answers are always those of the full text.
    """

    def __init__(self, loaded: Loaded, sampling: Sampling, *, system: str | None = None) -> None:
        from finetune.generation import Session

        if loaded.model.is_encoder_decoder:
            raise ValueError(f"{loaded.source}: chat needs a decoder-only model")
        self.loaded, self.sampling, self.system = loaded, sampling, system
        tok = loaded.tokenizer
        self.template = chat_template_of(loaded)
        self.end_of_turn = end_of_turn(tok, self.template)
        self.stop_ids = with_end_of_turn(loaded.stop_ids, tok, self.template)
        self.session = Session(loaded.model)
        self.generator = None
        if sampling.seed is not None:
            device = next(loaded.model.parameters()).device
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # the ids the session holds: prompts and answers
        self.refed = 0
        self.session.reset()

    def say(self, text: str, streamer: Callable | None = None) -> str:
        """The model's answer to the user's ``text``; the conversation grows by both (not on an error)."""
        from finetune.data.templates import render

        tok = self.loaded.tokenizer
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = tok(render(tok, self.template, messages, True), add_special_tokens=False)["input_ids"]
        reuse = ids[: len(self.cached)] == self.cached
        if not reuse:
            self.session.reset()
            self.refed += len(self.cached)
            self.cached = []  # what the session holds now, also should this turn fail
        new = ids[len(self.cached) :] if reuse else ids
        s = self.sampling
        answer = self.session.generate(
            new, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            generator=self.generator, stop_ids=self.stop_ids, streamer=streamer,
        )  # fmt: skip
        self.cached = ids + answer
        reply = tok.decode(answer, skip_special_tokens=True)
        if self.end_of_turn and self.end_of_turn in reply:  # an end marker that is not one token
            reply = reply[: reply.index(self.end_of_turn)]
        self.messages = [*messages, {"role": "assistant", "content": reply.strip()}]
        return reply

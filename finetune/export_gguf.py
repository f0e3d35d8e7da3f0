"""``finetune export --format gguf``: one GGUF file (llama.cpp, Ollama, ``transformers``' ``gguf_file=``) written
directly with the ``gguf`` package's writer, and an Ollama ``Modelfile`` beside it.

What each architecture needs is data (``ARCHS``): the tensor names, the q/k row permutation llama.cpp's rotary
layout needs (it rotates adjacent pairs, HF rotates halves), and the metadata keys. q8_0/q4_0 blocks come from the
same quantizer as our int8/int4 layers (``finetune.quant.core``), packed into llama.cpp's block layouts.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.quant.core import quantize_weight

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 and q4_0 blocks


@dataclass(frozen=True)
class Arch:
    """How one of our families is written as a llama.cpp architecture."""

    name: str  # general.architecture
    tensors: tuple[tuple[str, str], ...]  # (our name pattern, GGUF name pattern); "{i}" is the block number
    permute: dict[str, str]  # GGUF tensor suffix -> config attribute with its head count (the rotary pairs)
    metadata: Callable  # config -> {key suffix under "<arch>.": value}


def _llama_meta(c) -> dict:
    if c.rope_scaling is not None and c.rope_scaling.get("rope_type") != "linear":
        raise ValueError(f"GGUF: rope scaling {c.rope_scaling.get('rope_type')!r} is not written (only linear)")
    if c.sliding_window is not None and c.sliding_window < c.max_position_embeddings:
        raise ValueError(f"GGUF: the llama architecture has no sliding window (this model's is {c.sliding_window})")
    meta = {
        "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.freq_base": float(c.rope_theta),
        "rope.dimension_count": c.head_dim, "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
        "vocab_size": c.vocab_size,
    }  # fmt: skip
    if c.rope_scaling is not None:
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(c.rope_scaling["factor"])})
    return meta


def _gpt2_meta(c) -> dict:
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        raise ValueError("GGUF: llama.cpp's gpt2 scales attention by 1/sqrt(head_dim) only; this model does not")
    return {
        "context_length": c.n_positions, "embedding_length": c.n_embd, "block_count": c.n_layer,
        "feed_forward_length": c.n_inner or 4 * c.n_embd, "attention.head_count": c.n_head,
        "attention.layer_norm_epsilon": float(c.layer_norm_epsilon), "vocab_size": c.vocab_size,
    }  # fmt: skip


_LLAMA = Arch(
    name="llama",
    tensors=(
        ("embed_tokens.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
        ("layers.{i}.attn.q_proj.*", "blk.{i}.attn_q.*"), ("layers.{i}.attn.k_proj.*", "blk.{i}.attn_k.*"),
        ("layers.{i}.attn.v_proj.*", "blk.{i}.attn_v.*"), ("layers.{i}.attn.o_proj.*", "blk.{i}.attn_output.*"),
        ("layers.{i}.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
        ("layers.{i}.mlp.gate_proj.*", "blk.{i}.ffn_gate.*"), ("layers.{i}.mlp.up_proj.*", "blk.{i}.ffn_up.*"),
        ("layers.{i}.mlp.down_proj.*", "blk.{i}.ffn_down.*"),
    ),
    permute={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
    metadata=_llama_meta,
)  # fmt: skip
_GPT2 = Arch(
    name="gpt2",
    tensors=(
        ("wte.weight", "token_embd.weight"), ("wpe.weight", "position_embd.weight"), ("ln_f.*", "output_norm.*"),
        ("lm_head.weight", "output.weight"),
        ("layers.{i}.attn_norm.*", "blk.{i}.attn_norm.*"), ("layers.{i}.attn.c_attn.*", "blk.{i}.attn_qkv.*"),
        ("layers.{i}.attn.c_proj.*", "blk.{i}.attn_output.*"), ("layers.{i}.mlp_norm.*", "blk.{i}.ffn_norm.*"),
        ("layers.{i}.mlp.c_fc.*", "blk.{i}.ffn_up.*"), ("layers.{i}.mlp.c_proj.*", "blk.{i}.ffn_down.*"),
    ),
    permute={},
    metadata=_gpt2_meta,
)  # fmt: skip
ARCHS = {"llama": _LLAMA, "mistral": _LLAMA, "gpt2": _GPT2}  # our model_type -> how it is written


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\*", r"(?P<rest>.+)") + "$")


def gguf_name(arch: Arch, name: str) -> str:
    """The GGUF name of one of our tensor names."""
    for ours, theirs in arch.tensors:
        m = _pattern(ours).match(name)
        if m:
            return theirs.replace("{i}", m.groupdict().get("i") or "").replace("*", m.groupdict().get("rest") or "")
    raise ValueError(f"GGUF {arch.name}: no GGUF name for tensor {name!r}")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (n_heads * D, ...) from HF's rotate-half order to llama.cpp's adjacent pairs (convert_hf_to_gguf's
    ``permute``): within each head, row j of the first half and row j of the second become rows 2j and 2j+1."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------ tensor types
def q8_0_blocks(w: torch.Tensor) -> np.ndarray:
    """(N, K) as q8_0: per 32 inputs an f16 scale and 32 int8 values; (N, K / 32 * 34) bytes."""
    qw = quantize_weight(w, bits=8, group_size=BLOCK, symmetric=True)
    N, G = qw.scale.shape
    d = qw.scale.to(torch.float16).numpy().view(np.uint8).reshape(N, G, 2)
    qs = qw.q.numpy().view(np.uint8).reshape(N, G, BLOCK)
    return np.concatenate([d, qs], axis=-1).reshape(N, G * 34)


def q4_0_blocks(w: torch.Tensor) -> np.ndarray:
    """(N, K) as q4_0: per 32 inputs an f16 scale and 16 bytes, value j in the low nibble of byte j and value j+16
    in its high nibble, each stored +8; (N, K / 32 * 18) bytes."""
    qw = quantize_weight(w, bits=4, group_size=BLOCK, symmetric=True)
    N, G = qw.scale.shape
    d = qw.scale.to(torch.float16).numpy().view(np.uint8).reshape(N, G, 2)
    u = (qw.q.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(N, G, BLOCK)
    qs = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(N, G * 18)


def tensor_type(shape: torch.Size, outtype: str):
    """The GGML type a tensor of ``shape`` is written as: vectors (norms, biases) and widths no block divides stay
    f32 / f16, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype in ("q8_0", "q4_0") and shape[-1] % BLOCK == 0:
        return Q.Q8_0 if outtype == "q8_0" else Q.Q4_0
    return Q.BF16 if outtype == "bf16" else Q.F16


def encode_tensor(w: torch.Tensor, outtype: str):
    """(numpy array, GGML type) of one tensor, typed by ``tensor_type``."""
    from gguf import GGMLQuantizationType as Q

    qtype = tensor_type(w.shape, outtype)
    w = w.detach().float().cpu()
    if qtype == Q.F32:
        return w.numpy(), qtype
    if qtype in (Q.Q8_0, Q.Q4_0):
        return (q8_0_blocks(w) if qtype == Q.Q8_0 else q4_0_blocks(w)), qtype
    if qtype == Q.BF16:
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), qtype  # bytes, as the q types
    return w.to(torch.float16).numpy(), qtype


def encoded_nbytes(shape: torch.Size, qtype) -> int:
    """Bytes ``encode_tensor`` gives a tensor of ``shape`` as ``qtype`` (known before encoding it)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return shape.numel() // block * size


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}  # fmt: skip


# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_fields(tok, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` fields of a byte-level BPE tokenizer; anything else is refused."""
    import json

    from gguf import TokenType

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF: needs a fast tokenizer (tokenizer.json); got {type(tok).__name__}")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or spec.get("normalizer") is not None:
        kind = f"{model.get('type')} model, {pre.get('type')} pre-tokenizer, normalizer {spec.get('normalizer')}"
        raise ValueError(f"GGUF: only byte-level BPE tokenizers are written (a BPE model with a ByteLevel "
                         f"pre-tokenizer and no normalizer); this tokenizer has a {kind}")  # fmt: skip
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise ValueError("GGUF: the ByteLevel pre-tokenizer must use GPT-2's split and add no prefix space")
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"GGUF: the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    fields = {
        "model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges,
        "add_bos": bool(tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] != plain[:1]),
        "add_eos": bool(tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] != plain[-1:]),
    }  # fmt: skip
    for key in ("bos", "eos", "unk", "pad"):
        fields[f"{key}_id"] = getattr(tok, f"{key}_token_id", None)
    return fields


# ------------------------------------------------------------------------------------------ Ollama
ROLES = ("system", "user", "assistant")


def turn_pieces(tokenizer, template: str) -> dict | None:
    """A Jinja chat template as the text it writes around each message, found by rendering sentinel
    conversations: ``head``, per role ``(before, after)`` its content, and ``prompt`` (the generation prompt).
    None where the renderings are not ``head + sum(before + content + after) + prompt`` (a template that injects
    dated system text, merges the system message into the first user turn, or changes the content)."""
    from finetune.data.templates import render

    mark = [f"\x00m{i}\x00" for i in range(4)]
    sys_, u1, a1, u2 = ({"role": r, "content": m} for r, m in zip(ROLES + ("user",), mark, strict=True))
    try:
        one = render(tokenizer, template, [u1], False)
        two = render(tokenizer, template, [u1, a1], False)
        three = render(tokenizer, template, [u1, a1, u2], False)
        with_system = render(tokenizer, template, [sys_, u1], False)
        asking = render(tokenizer, template, [u1], True)
    except Exception:
        return None
    if any(text.count(m) != 1 for text, ms in ((one, mark[1:2]), (two, mark[1:3]), (three, mark[1:4]),
                                                (with_system, mark[:2])) for m in ms):  # fmt: skip
        return None
    user_after = one.split(mark[1])[1]
    asst_after = two.split(mark[2])[1]
    asst_before = two.split(mark[1])[1].split(mark[2])[0].removeprefix(user_after)
    user_before = three.split(mark[2])[1].split(mark[3])[0].removeprefix(asst_after)
    head = one.split(mark[1])[0].removesuffix(user_before)
    sys_before = with_system.split(mark[0])[0].removeprefix(head)
    sys_after = with_system.split(mark[0])[1].split(mark[1])[0].removesuffix(user_before)
    pieces = {"head": head, "system": (sys_before, sys_after), "user": (user_before, user_after),
              "assistant": (asst_before, asst_after), "prompt": asking.removeprefix(one)}  # fmt: skip

    def again(messages, asking: bool = False) -> str:
        body = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages)
        return head + body + (pieces["prompt"] if asking else "")

    checks = [(one, [u1]), (two, [u1, a1]), (three, [u1, a1, u2]), (with_system, [sys_, u1])]
    if any(again(ms) != text for text, ms in checks) or again([u1], True) != asking:
        return None
    return pieces


def go_template(pieces: dict, bos: str | None = None) -> str:
    """Ollama's Go TEMPLATE writing what ``turn_pieces`` found, ending with the generation prompt. A ``bos`` the
    head starts with is left out: llama.cpp adds it from the GGUF's ``add_bos_token``."""
    head = pieces["head"].removeprefix(bos) if bos else pieces["head"]
    cases = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go_text(pieces[r][0])}'
                    f"{{{{ .Content }}}}{_go_text(pieces[r][1])}" for i, r in enumerate(ROLES))  # fmt: skip
    return f"{_go_text(head)}{{{{- range .Messages }}}}{cases}{{{{ end }}}}{{{{ end }}}}{_go_text(pieces['prompt'])}"


def _go_text(text: str) -> str:
    """Literal text inside a Go template (a ``{{`` in it is written as a Go string)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(chat_template: str | None, stops: list[str], gguf_file: str = "model.gguf", *, tokenizer=None,
              added_bos: str | None = None) -> str:  # fmt: skip
    """An Ollama Modelfile: FROM the GGUF, the TEMPLATE where the chat template decomposes into turns
    (``turn_pieces``, rendered with ``tokenizer``; else Ollama uses the template stored in the GGUF), and a stop
    parameter per end-of-turn / end-of-text token. ``added_bos``: the BOS token llama.cpp adds itself."""
    lines = [f"FROM ./{gguf_file}"]
    pieces = turn_pieces(tokenizer, chat_template) if chat_template and tokenizer is not None else None
    if pieces is not None:
        lines.append(f'TEMPLATE """{go_template(pieces, added_bos)}"""')
    elif chat_template:
        lines.append("# TEMPLATE: Ollama takes the chat template stored in the GGUF (tokenizer.chat_template)")
    lines += [f"PARAMETER stop {_go_string(s)}" for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"


def _go_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------------------ the file
def write_gguf(loaded, out_dir, *, outtype: str = "f16", overwrite: bool = False, protect=(),
               name: str | None = None) -> Path:  # fmt: skip
    """Writes ``loaded`` (an ``inference.Loaded``) as ``out_dir/model.gguf`` and ``out_dir/Modelfile``; atomic."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'finetune[gguf]'") from None
    from finetune.data.templates import tokenizer_chat_template
    from finetune.folders import atomic_folder

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {list(OUTTYPES)}, got {outtype!r}")
    from finetune.data.collate import bos_first

    model = loaded.model
    tok = bos_first(loaded.tokenizer) if loaded.document else loaded.tokenizer  # add_bos_token as the run trained
    c = model.config
    arch = ARCHS.get(getattr(c, "model_type", None))
    if arch is None:
        raise ValueError(f"GGUF: no llama.cpp architecture for model type {c.model_type!r}; writable: "
                         f"{sorted(ARCHS)}")  # fmt: skip
    if getattr(model, "quantization", None) is not None:
        raise ValueError("GGUF: export the full-precision model; --outtype q8_0/q4_0 quantizes it for the file")
    meta = arch.metadata(c)  # refuses what llama.cpp's architecture cannot express
    fields = tokenizer_fields(tok, c.vocab_size)
    template = loaded.chat_template or tokenizer_chat_template(tok)
    with atomic_folder(out_dir, overwrite=overwrite, protect=protect) as tmp:
        w = gguf.GGUFWriter(str(tmp / "model.gguf"), arch.name)
        w.add_name(name or Path(loaded.source).name)
        w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
        if outtype.startswith("q"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in meta.items():
            _add(w, f"{arch.name}.{key}", value)
        w.add_tokenizer_model(fields["model"])
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id),
                         ("unk_id", w.add_unk_token_id), ("pad_id", w.add_pad_token_id)):  # fmt: skip
            if fields[key] is not None:
                add(fields[key])
        w.add_add_bos_token(fields["add_bos"])
        w.add_add_eos_token(fields["add_eos"])
        if template:
            w.add_chat_template(template)
        # Streamed: the tensor table is written from shapes and types alone, then each tensor is encoded and
        # written in turn, so at most one encoded tensor exists besides the model.
        params = list(model.named_parameters())  # a tied head is listed once, as the embedding
        for our_name, p in params:
            qtype = tensor_type(p.shape, outtype)
            w.add_tensor_info(gguf_name(arch, our_name), list(p.shape), np.dtype(np.float32),
                              encoded_nbytes(p.shape, qtype), raw_dtype=qtype)  # fmt: skip
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for our_name, p in params:
            t = p.detach()
            kind = gguf_name(arch, our_name).split(".")[-2]
            if kind in arch.permute:
                t = permute_rotary(t, getattr(c, arch.permute[kind]))
            w.write_tensor_data(encode_tensor(t, outtype)[0])
        w.close()
        stops = [tok.convert_ids_to_tokens(i) for i in loaded.stop_ids]
        (tmp / "Modelfile").write_text(
            modelfile(template, stops, tokenizer=tok, added_bos=tok.bos_token if fields["add_bos"] else None)
        )
    return Path(out_dir)


def _add(writer, key: str, value) -> None:
    from gguf import GGUFValueType as T

    kind = T.BOOL if isinstance(value, bool) else T.UINT32 if isinstance(value, int) else T.FLOAT32 if isinstance(
        value, float) else T.STRING  # fmt: skip
    writer.add_key_value(key, value, kind)


def export_gguf(model_dir, out_dir, *, outtype: str = "f16", ckpt: str = "best", overwrite: bool = False) -> Path:
    """A run folder (its ``ckpt``, adapter merged) or a Hugging Face folder as GGUF + Modelfile."""
    from finetune import inference
    from finetune.folders import check_target

    check_target(out_dir, overwrite=overwrite, protect=[Path(model_dir)])  # before the (long) load
    loaded = inference.load(model_dir, ckpt=ckpt)
    return write_gguf(loaded, out_dir, outtype=outtype, overwrite=overwrite, protect=[Path(model_dir)])

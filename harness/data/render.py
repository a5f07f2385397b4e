"""Examples to token ids and labels: the chat template, which tokens carry the loss, and fitting
``train.seq_len``. The same function renders the training examples and the held-out ones, so every
arm of a pair, and the base model, sees the same tokens.

``data.chat_template``:
- ``auto`` (default): the tokenizer's chat template where it has one, else none;
- ``none``: raw text: prompt/completion joined as they are, other turns separated by a blank
  line, the tokenizer's BOS (if it adds one) first and its EOS after the reply;
- a path to a ``.jinja`` file: that template.

Multiple-choice rows are never templated: they keep MMLU's prompt, which is how lm-eval scores
them. With a template, each assistant turn is found by rendering the conversation up to it with
the generation prompt (``add_generation_prompt=True``): the reply is what the full rendering adds
after that prefix, up to the next turn (its end-of-turn token included).

``data.loss_on``: ``assistant`` (every assistant turn; for prompt/completion rows, the
completion), ``last`` (the final assistant turn), ``all`` (every token).
"""

from __future__ import annotations

from bisect import bisect_left
from pathlib import Path

from harness.config import LOSS_ON, OVERLONG
from harness.data.sources import DataError
from harness.records import stable_hash

RAW_SEPARATOR = {"mc": "", "completion": "", "instruction": "\n\n", "chat": "\n\n"}


def _template_file(choice: str) -> Path:
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template={choice!r}: give auto, none or a .jinja file (no such file)")
    return path


def chat_template(data_cfg: dict, tokenizer) -> tuple[str | None, str]:
    """(template text or None, what the record says: ``tokenizer``, a file path, or ``none``)."""
    choice = str(data_cfg.get("chat_template") or "auto")
    if choice == "none":
        return None, "none"
    if choice == "auto":
        template = getattr(tokenizer, "chat_template", None)
        return (template, "tokenizer") if template else (None, "none")
    path = _template_file(choice)
    return path.read_text(), str(path)


def check_template_file(data_cfg: dict) -> None:
    """A template file that does not exist is a usage error before any tokenizer is loaded."""
    choice = str(data_cfg.get("chat_template") or "auto")
    if choice not in ("auto", "none"):
        _template_file(choice)


def _raw_segments(example: dict) -> list[tuple[str, int | None]]:
    """(text, assistant turn number or None) of an example without a template."""
    sep = RAW_SEPARATOR[example["style"]]
    messages, segs, turn = example["messages"], [], 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            segs.append((m["content"], turn))
            turn += 1
            if i < len(messages) - 1 and sep:
                segs.append((sep, None))
        else:
            segs.append((m["content"] + sep, None))
    return segs


def _render(tokenizer, template: str, conversations: list[list[dict]], generation: bool) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=template,
                                         add_generation_prompt=generation)


def _templated(examples: list[dict], tokenizer, template: str) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Each example's rendering and its replies as character spans (start, end, assistant turn
    number), batched: the full conversations, their prefixes up to each reply with the generation
    prompt, and (for multi-turn rows) up to the end of each earlier reply."""
    convs = [ex["messages"] for ex in examples]
    try:
        full = _render(tokenizer, template, convs, False)
        turns = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in convs]
        starts = _render(tokenizer, template, [c[:i] for c, ts in zip(convs, turns) for i in ts], True)
        ends = _render(tokenizer, template, [c[: i + 1] for c, ts in zip(convs, turns) for i in ts
                                             if i < len(c) - 1], False)
    except Exception as exc:  # jinja errors, raise_exception() in a template
        bad = _first_failing(examples, tokenizer, template)
        raise DataError(f"{bad}: the chat template cannot render this row "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                        "set data.chat_template=none or give a template file") from None
    out, si, ei = [], iter(starts), iter(ends)
    for ex, text, ts in zip(examples, full, turns):
        spans, pos = [], 0
        for k, i in enumerate(ts):
            start = next(si)
            end = text if i == len(ex["messages"]) - 1 else next(ei)
            if not (text.startswith(start) and text.startswith(end) and pos <= len(start) <= len(end)):
                raise DataError(f"{ex.get('where', 'a row')}: the chat template does not render this conversation "
                                "turn by turn (a prefix renders differently); set data.chat_template=none or give "
                                "a template file")
            spans.append((len(start), len(end), k))
            pos = len(end)
        out.append((text, spans))
    return out


def _first_failing(examples: list[dict], tokenizer, template: str) -> str:
    for ex in examples:
        try:
            _render(tokenizer, template, [ex["messages"]], False)
            _render(tokenizer, template, [ex["messages"][:-1]], True)
        except Exception:  # noqa: BLE001 - the one to name
            return ex.get("where", "a row")
    return "a row"


def _split(examples: list[dict], template: str | None) -> tuple[list[int], list[int]]:
    """(indices rendered through the template, indices rendered raw)."""
    templated = [i for i, ex in enumerate(examples) if template and ex["style"] != "mc"]
    chosen = set(templated)
    return templated, [i for i in range(len(examples)) if i not in chosen]


def prompt_texts(examples: list[dict], tokenizer, data_cfg: dict) -> list[str]:
    """What a served model is asked: each example's text up to its last reply (with a template,
    up to and including the generation prompt), rendered as in training."""
    template, _ = chat_template(data_cfg, tokenizer)
    templated, raw = _split(examples, template)
    out: dict[int, str] = {}
    for i, (text, spans) in zip(templated, _templated([examples[i] for i in templated], tokenizer, template)):
        out[i] = text[: spans[-1][0]]
    for i in raw:
        segs = _raw_segments(examples[i])
        last = max(j for j, (_, turn) in enumerate(segs) if turn is not None)
        out[i] = "".join(text for text, _ in segs[:last])
    return [out[i] for i in range(len(examples))]


def _tokenized(examples: list[dict], tokenizer, template: str | None, loss_on: str) -> list[tuple[list, list, int]]:
    """(ids, labels, prompt length in tokens) of every example, unfitted.

    Raw examples: their pieces tokenized one by one and joined (the first with the tokenizer's
    specials, EOS after the last reply), as prompt + completion always were. Templated examples:
    the rendered text tokenized whole, as ``apply_chat_template(tokenize=True)`` does (the template
    has its own specials), each token labelled by where its first character falls."""
    templated, raw = _split(examples, template)
    out: dict[int, tuple[list, list, int]] = {}
    if templated and not getattr(tokenizer, "is_fast", False):  # no offsets: tokenize prompt and reply pieces
        for i, (text, spans) in zip(templated, _templated([examples[i] for i in templated], tokenizer, template)):
            cuts = [0, *[c for a, b, _ in spans for c in (a, b)], len(text)]
            turns = [None if j % 2 == 0 else spans[j // 2][2] for j in range(len(cuts) - 1)]
            ids, labels, prompt_len = [], [], None
            for (lo, hi), turn in zip(zip(cuts, cuts[1:]), turns):
                piece = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"] if hi > lo else []
                if turn is not None and prompt_len is None:
                    prompt_len = len(ids)
                target = loss_on == "all" or (turn is not None and (loss_on == "assistant" or turn == spans[-1][2]))
                ids += piece
                labels += piece if target else [-100] * len(piece)
            out[i] = (ids, labels, prompt_len)
        templated = []
    if templated:
        rendered = _templated([examples[i] for i in templated], tokenizer, template)
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for i, (_, spans), ids, offsets in zip(templated, rendered, enc["input_ids"], enc["offset_mapping"]):
            first_chars = [o[0] for o in offsets]
            last_k = spans[-1][2]
            labels = list(ids) if loss_on == "all" else [-100] * len(ids)
            bounds = [(bisect_left(first_chars, a), bisect_left(first_chars, b), k) for a, b, k in spans]
            if loss_on != "all":
                for lo, hi, k in bounds:
                    if loss_on == "assistant" or k == last_k:
                        labels[lo:hi] = ids[lo:hi]
            out[i] = (list(ids), labels, bounds[0][0])
    if raw:
        pieces = [_raw_segments(examples[i]) for i in raw]
        first_ids = iter(tokenizer([segs[0][0] for segs in pieces], add_special_tokens=True)["input_ids"])
        rest = [text for segs in pieces for text, _ in segs[1:]]
        rest_ids = iter(tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
        eos = tokenizer.eos_token_id
        for i, segs in zip(raw, pieces):
            last_turn = max(t for _, t in segs if t is not None)
            ids: list[int] = []
            labels: list[int] = []
            prompt_len = None
            for j, (_, turn) in enumerate(segs):
                piece = list(next(first_ids) if j == 0 else next(rest_ids))
                if turn == last_turn and eos is not None:
                    piece.append(eos)
                if turn is not None and prompt_len is None:
                    prompt_len = len(ids)
                target = loss_on == "all" or (turn is not None and (loss_on == "assistant" or turn == last_turn))
                ids += piece
                labels += piece if target else [-100] * len(piece)
            out[i] = (ids, labels, prompt_len)
    return [out[i] for i in range(len(examples))]


def check_fit(data_cfg: dict, seq_len: int) -> None:
    """data.min_prompt_tokens, data.overlong and data.loss_on, against train.seq_len (DataError, one line)."""
    overlong = data_cfg.get("overlong", "truncate")
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong={overlong!r} is unknown; valid: {', '.join(OVERLONG)}")
    if data_cfg.get("loss_on", "assistant") not in LOSS_ON:
        raise DataError(f"data.loss_on={data_cfg.get('loss_on')!r} is unknown; valid: {', '.join(LOSS_ON)}")
    keep = data_cfg.get("min_prompt_tokens", 16)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < int(seq_len):
        raise DataError(f"data.min_prompt_tokens={keep!r} is invalid; give an integer from 0 to train.seq_len - 1 "
                        f"({int(seq_len) - 1}), so that a completion token still fits")


def tokenize_examples(examples: list[dict], tokenizer, seq_len: int, data_cfg: dict | None = None
                      ) -> tuple[list[dict], dict]:
    """Token ids and labels (-100 where no loss) of each example, fitted to ``seq_len``.

    The prompt is what comes before the first assistant reply. An example longer than ``seq_len``
    (``data_cfg``: ``overlong``, ``min_prompt_tokens``): ``truncate`` keeps at least
    ``min_prompt_tokens`` of its prompt (the end, next to the reply; the whole prompt when shorter)
    and cuts the prompt's start, then the end of what follows, as far as needed; ``drop`` leaves it
    out (as is an example left with no token carrying the loss). Not padded here: the collator pads.
    Returns (features, counts): ``examples_kept``, ``examples_truncated``, ``examples_dropped``,
    ``loss_token_share`` (tokens with loss / real tokens), ``loss_on`` and ``chat_template``,
    over the examples given (before they are repeated to fill the token budget).
    """
    data_cfg = data_cfg or {}
    check_fit(data_cfg, seq_len)
    template, template_label = chat_template(data_cfg, tokenizer)
    loss_on = data_cfg.get("loss_on", "assistant")
    min_prompt, drop = int(data_cfg.get("min_prompt_tokens", 16)), data_cfg.get("overlong", "truncate") == "drop"
    out, truncated, dropped, with_loss, real = [], 0, 0, 0, 0
    for ex, (ids, labels, prompt_len) in zip(examples, _tokenized(examples, tokenizer, template, loss_on)):
        if len(ids) > seq_len:
            if drop:
                dropped += 1
                continue
            truncated += 1
            keep = min(prompt_len, max(min_prompt, seq_len - (len(ids) - prompt_len)))
            ids, labels = ids[prompt_len - keep:][:seq_len], labels[prompt_len - keep:][:seq_len]
        n_loss = sum(label != -100 for label in labels)
        if not n_loss:
            dropped += 1
            continue
        with_loss, real = with_loss + n_loss, real + len(ids)
        feature = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        if "id" in ex:  # a held-out example: its loss is paired across arms by id
            feature["id"] = ex["id"]
        out.append(feature)
    if examples and not out:
        raise DataError(f"no training example is left: all {len(examples)} are longer than train.seq_len={seq_len} "
                        "(data.overlong=drop) or keep no token with loss; raise train.seq_len or use "
                        "data.overlong=truncate")
    return out, {"examples_kept": len(out), "examples_truncated": truncated, "examples_dropped": dropped,
                 "loss_token_share": with_loss / real if real else None, "loss_on": loss_on,
                 "chat_template": template_label, "chat_template_hash": stable_hash(template) if template else None}


def fit_warning(counts: dict, seq_len: int, data_cfg: dict) -> str | None:
    """The console warning when examples were cut or left out (None when all fit whole)."""
    cut, left = counts["examples_truncated"], counts["examples_dropped"]
    if not cut and not left:
        return None
    n = counts["examples_kept"] + left
    parts = []
    if cut:
        parts.append(f"{cut} truncated (at least {int(data_cfg.get('min_prompt_tokens', 16))} prompt tokens kept, "
                     "the reply cut at its end)")
    if left:
        parts.append(f"{left} dropped (longer than train.seq_len with data.overlong=drop, or no token with loss "
                     "left after truncation)")
    return f"warning: {cut + left} of {n} training examples are longer than train.seq_len={seq_len}: " + "; ".join(parts)

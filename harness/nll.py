"""Held-out loss and forgetting: the mean negative log-likelihood per target token of held-out examples that are
not multiple choice (generative data: chat, instruction, prompt/completion rows).

Every held-out example is rendered and masked exactly as training renders it
(``harness.data.tokenize_examples``: same chat template, same ``data.loss_on``), so the loss is on
the tokens the arms were trained to produce, and the same for every arm and the base model. Per
example the harness keeps the summed NLL and its token count (the record's items), so that the
report pairs the arms example by example (``harness.stats``).

    heldout_loss = sum_i nll_i / sum_i n_i            (token-weighted, as a training loss is)
    se           = sqrt(m / (m - 1) * sum_i (nll_i - loss * n_i)^2) / sum_i n_i

the ratio estimator's standard error over the m examples (each example a cluster of tokens:
tokens of one example are not independent). ``heldout_ppl = exp(heldout_loss)``.

Forgetting (``eval.forgetting``), as PEFT's method_comparison measures it: the same NLL on a
general-text sample (every token scored, in chunks of ``chunk_tokens``), for the base model and
each arm; ``forgetting_loss_delta`` = the arm's minus the base model's (above 0: the arm got worse
at general text).
"""

from __future__ import annotations

import math
from pathlib import Path

TASK = "heldout_loss"
FORGETTING = "forgetting"
# the default general-text sample (public domain; its source: harness/texts/README.md)
DEFAULT_TEXT = Path(__file__).resolve().parent / "texts" / "jargon-file-4.4.7-ch1-12.txt"


def ratio_mean_se(sums: list[float], counts: list[int]) -> tuple[float | None, float | None]:
    """(sum(x) / sum(n), its ratio-estimator standard error over the m clusters)."""
    total, m = sum(counts), len(sums)
    if not m or not total:
        return None, None
    mean = sum(sums) / total
    if m < 2:
        return mean, None
    resid = sum((x - mean * n) ** 2 for x, n in zip(sums, counts))
    return mean, math.sqrt(m / (m - 1) * resid) / total


def nll_items(model, tokenizer, features: list[dict], batch_size: int, task: str = TASK) -> list[dict]:
    """Summed NLL and target-token count of each feature (``input_ids``, ``labels``, ``id``)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            width = max(len(f["input_ids"]) for f in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, f in enumerate(batch):  # right padding, masked out
                n = len(f["input_ids"])
                ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(f["input_ids"]),
                                                                torch.tensor(f["labels"]), 1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, f in enumerate(batch):  # one row at a time: a batch of fp32 logits can be large
                target = labels[row, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(logits[row, :-1].float(), target, ignore_index=-100,
                                                        reduction="sum")
                items.append({"task": task, "id": f["id"], "nll": float(nll), "n_tokens": int((target != -100).sum())})
            del logits
    return items


def loss_metrics(items: list[dict], prefix: str = "heldout") -> dict:
    """``<prefix>_loss``, ``_loss_se``, ``_ppl``, ``_n`` (examples) and ``_tokens`` of NLL items."""
    loss, se = ratio_mean_se([it["nll"] for it in items], [it["n_tokens"] for it in items])
    return {f"{prefix}_loss": loss, f"{prefix}_loss_se": se,
            f"{prefix}_ppl": math.exp(loss) if loss is not None else None,
            f"{prefix}_n": len(items), f"{prefix}_tokens": sum(it["n_tokens"] for it in items)}


def evaluate_heldout_loss(model, tokenizer, examples: list[dict], cfg: dict) -> tuple[dict, list[dict]]:
    """Held-out loss of ``model`` on ``examples`` (rendered as training renders them)."""
    from harness.data import tokenize_examples

    limit = cfg["eval"]["indomain"].get("limit")
    examples = examples[: int(limit)] if limit else examples
    features, _ = tokenize_examples(examples, tokenizer, cfg["train"]["seq_len"], cfg["data"])
    items = nll_items(model, tokenizer, features, cfg["eval"]["indomain"].get("batch_size", 16))
    return loss_metrics(items), items


def forgetting_text(forgetting_cfg: dict) -> Path:
    return Path(str(forgetting_cfg.get("path"))).expanduser() if forgetting_cfg.get("path") else DEFAULT_TEXT


def forgetting_features(tokenizer, forgetting_cfg: dict) -> list[dict]:
    """The sample's first ``max_tokens`` tokens in chunks of ``chunk_tokens``, every token a target."""
    size, chunk = int(forgetting_cfg["max_tokens"]), int(forgetting_cfg["chunk_tokens"])
    text = forgetting_text(forgetting_cfg).read_text(encoding="utf-8")[: size * 16]  # enough characters
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:size]
    return [{"input_ids": ids[i:i + chunk], "labels": ids[i:i + chunk], "id": f"chunk-{i // chunk}"}
            for i in range(0, len(ids) - 1, chunk) if len(ids[i:i + chunk]) > 1]


def evaluate_forgetting(model, tokenizer, cfg: dict) -> tuple[dict, list[dict]]:
    """NLL of ``model`` on the general-text sample: ``forgetting_loss`` and the per-chunk items."""
    features = forgetting_features(tokenizer, cfg["eval"]["forgetting"])
    items = nll_items(model, tokenizer, features, cfg["eval"]["indomain"].get("batch_size", 16), task=FORGETTING)
    return loss_metrics(items, prefix=FORGETTING), items

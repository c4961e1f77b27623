"""Log-likelihoods of given responses: supervised batches (prompt + target, loss on the
target), per-token negative log-likelihood, and summed log-probs of response sets (the
preference losses' and the pair evaluation's inputs)."""

from __future__ import annotations

import torch

from rlkit.rollout.logprobs import position_ids_from_mask


def supervised_batch(tokenizer, prompts: list[str], targets: list[str], device) -> dict[str, torch.Tensor]:
    """Prompt + target + EOS, right-padded; ``loss_mask`` covers only the target and EOS."""
    rows = []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids)))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows], device=device),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows], device=device),
        "loss_mask": torch.tensor([pad(mask, 0) for _, mask in rows], device=device),
    }


def token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood of each next token, (B, L-1), zero where not trained on."""
    logits = (
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return nll * batch["loss_mask"][:, 1:]


def encode_response_sets(tokenizer, prompts: list[str], response_sets: list[list[str]], device):
    """Each prompt followed by each of its responses (+ EOS), one right-padded row per
    (prompt, response slot): B * n rows for n = the largest set (at least 1); and the (B, n)
    mask of slots that hold a response (empty slots are padded with an empty response)."""
    n = max(1, *(len(responses) for responses in response_sets))
    batch = supervised_batch(
        tokenizer,
        [p for p in prompts for _ in range(n)],
        [rs[j] if j < len(rs) else "" for rs in response_sets for j in range(n)],
        device,
    )
    mask = torch.tensor([[float(j < len(rs)) for j in range(n)] for rs in response_sets], device=device)
    return batch, mask


def sequence_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' log-probs, number of response tokens), one per row."""
    return -token_nll(model, batch).sum(-1), batch["loss_mask"][:, 1:].sum(-1)


@torch.no_grad()
def score_response_sets(model, batch: dict[str, torch.Tensor], n: int, micro_batch: int) -> torch.Tensor:
    """(B, n) summed log-probs under ``model``, micro-batched."""
    parts = [
        sequence_log_probs(model, {k: v[i : i + micro_batch] for k, v in batch.items()})[0]
        for i in range(0, batch["input_ids"].shape[0], micro_batch)
    ]
    return torch.cat(parts).view(-1, n)


def pad_rows(values: list[list[float]], n: int, device) -> torch.Tensor:
    return torch.tensor([list(v) + [0.0] * (n - len(v)) for v in values], dtype=torch.float32, device=device)

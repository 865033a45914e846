"""Autoregressive sampling: one parallel prefill, then one token at a time from the cache.

Linear layers carry an O(1) recurrent state (B, H, d_k, d_v) from `lightning_attn(..., initial_state=...,
output_final_state=True)`, updated per token as S_t = e^{log λ + g_t} S_{t−1} + k_tᵀ v_t (g_t the data-dependent
gate of a "gated" mixer, computed from that token alone, else 0); softmax layers keep a KV cache; a short
convolution (short_conv = w) keeps its last w − 1 inputs (B, w − 1, C) for each of q, k and v
(common.ShortConvolution). The state after the prefill continues exactly, so the decoded logits equal those of one
parallel forward over the whole sequence.
Runs on one process.
"""
import torch

__all__ = ["sample_next", "generate"]


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """(B, V) logits -> (B,) token ids. temperature 0 = greedy; top_k keeps the k most likely tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, *, temperature=1.0, top_k=None, generator=None, vocab_limit=None):
    """prompt (B, T0) token ids -> (B, T0 + max_new_tokens). Positions are 0..T-1 (one document).

    vocab_limit: sample only ids below it (a tokenizer smaller than the model's padded vocabulary).
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T0) with T0 >= 1, got shape {tuple(prompt.shape)}")
    cache = model.new_cache()
    T0 = prompt.shape[1]
    hidden = model(prompt, torch.arange(T0, device=prompt.device), cache=cache)
    tokens = [prompt]
    for i in range(max_new_tokens):
        nxt = sample_next(model.logits(hidden[:, -1])[:, :vocab_limit], temperature, top_k, generator)
        tokens.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            hidden = model(nxt[:, None], torch.tensor([T0 + i], device=prompt.device), cache=cache)
    return torch.cat(tokens, dim=1)

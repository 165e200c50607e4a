"""Beam search against an oracle: transformers' `GPT2LMHeadModel.generate` on the same random GPT-2, exported.

Our `beam_search(num_beams=K, length_penalty=lp, max_new_tokens=L)` is transformers'
`generate(num_beams=K, length_penalty=lp, early_stopping=False, max_new_tokens=L, do_sample=False)`:
- both score a finished hypothesis sum log-prob / n**lp, n its new tokens with the eot, keep the top 2K
  candidates of each step, finish the eots among the top K only, continue the K best others, and stop an example
  once its best running beam, at its current length, cannot beat the worst of K finished hypotheses
  (transformers' early_stopping=False heuristic); out of steps, the running beams compete with the finished ones.
- early_stopping="never" is the same for lp <= 0 (it then also uses the current length); for lp > 0 it assumes
  the running beam reaches max_length and searches longer; early_stopping=True stops at K finished hypotheses.
  Neither of those is ours, so the grid checks False everywhere and "never" where lp <= 0.
- num_beams=1 makes transformers decode greedily (length_penalty unused): ours gives the same, as it must.

Both models run in float64, so their logits agree to ~1e-15 before each rounds them to float32 (both search in
float32): a difference would be one of search, not of rounding. The EOT row is biased (through a hidden unit
that is constant after ln_f) so that about half the searches end on EOT inside the budget; the test asserts both
kinds occur.
"""

import itertools

import pytest
import torch

from captioner.models import generate as decoding
from captioner.models.export import save_hf_gpt2
from captioner.models.gpt import GPT, GPTConfig
from captioner.tokenizer import EOT, N_VOCAB

BEAMS = (1, 2, 3, 4)
LENGTH_PENALTIES = (0.0, 0.6, 1.0, 2.0)
MAX_NEW_TOKENS = 8
EOT_BIAS = 7.0  # EOT then ends about half the searches inside the budget


def random_gpt_with_likely_eot() -> GPT:
    """A tiny random GPT whose candidates are close enough for beams to overtake each other and for the length
    penalty to change winners (embeddings ~N(0, 0.3), logits' std ~1.7), with a bias on EOT's logit: hidden
    unit 0 reads 1 after ln_f whatever the input, and only EOT's row of the tied embedding has a weight on it."""
    torch.manual_seed(0)
    lm = GPT(GPTConfig.named("tiny"))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
        wte = lm.transformer.wte.weight
        wte.mul_(3)
        lm.transformer.ln_f.weight[0] = 0.0
        lm.transformer.ln_f.bias[0] = 1.0
        wte[:, 0] = 0.0
        wte[EOT, 0] = EOT_BIAS
    return lm.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, transformers'), the second loaded from the directory `captioner-export` writes for the first."""
    from transformers import GPT2LMHeadModel

    lm = random_gpt_with_likely_eot()
    out = tmp_path_factory.mktemp("hf")
    save_hf_gpt2(lm, out)
    return lm.double(), GPT2LMHeadModel.from_pretrained(out).eval().double()


def prompts() -> list[torch.Tensor]:
    """Batches of equal-length prompts (transformers then needs no padding): single tokens, EOT among them, and
    EOT-led prompts of four tokens, as a caption prompt starts."""
    g = torch.Generator().manual_seed(2)
    single = torch.randint(0, N_VOCAB, (4, 1), generator=g)
    single[0] = EOT
    led = torch.cat([torch.full((4, 1), EOT), torch.randint(0, N_VOCAB, (4, 3), generator=g)], dim=1)
    return [single, led]


def early_stopping_like_ours(length_penalty: float) -> tuple:
    """transformers' early_stopping values that mean our stopping rule at this length penalty."""
    return (False, "never") if length_penalty <= 0 else (False,)


def transformers_beam_search(hf, prompt, num_beams, length_penalty, early_stopping) -> list[list[int]]:
    """transformers' best sequence per prompt: new ids only, cut before the first EOT as ours are."""
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=EOT,
    )  # (B, T0 + n), n <= MAX_NEW_TOKENS, a row shorter than n padded with EOT
    rows = [row[prompt.size(1) :] for row in out.tolist()]
    return [row[: row.index(EOT)] if EOT in row else row for row in rows]


def test_beam_search_matches_transformers_generate(models):
    lm, hf = models
    searches = ended_early = 0
    for num_beams, length_penalty in itertools.product(BEAMS, LENGTH_PENALTIES):
        for prompt in prompts():
            ours = decoding.beam_search(
                lm,
                prompt,
                max_new_tokens=MAX_NEW_TOKENS,
                eot=EOT,
                num_beams=num_beams,
                length_penalty=length_penalty,
            )
            for early_stopping in early_stopping_like_ours(length_penalty):
                theirs = transformers_beam_search(hf, prompt, num_beams, length_penalty, early_stopping)
                assert ours == theirs, (num_beams, length_penalty, early_stopping, prompt.tolist())
            searches += len(ours)
            ended_early += sum(len(row) < MAX_NEW_TOKENS for row in ours)
    print(
        f"{searches} searches: {ended_early} end on EOT inside the budget, {searches - ended_early} use all of it"
    )
    # both endings, each in a good share of the grid, or the comparison could miss one of them
    assert searches // 4 <= ended_early <= searches - searches // 4

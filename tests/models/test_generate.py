"""Decoding: greedy / beam / sampling agree where they must, the KV cache changes nothing, EOT and vocab rules."""

import gc
import weakref

import pytest
import torch

from captioner.models import generate as decoding
from captioner.models.captioner import Captioner
from captioner.models.compact_vocab import CompactVocabConfig, build_lm
from captioner.models.gpt import GPT, GPTConfig
from captioner.models.vision import VisionEncoder
from captioner.tokenizer import EOT, N_VOCAB
from tests.helpers import TINY_CLIP


@pytest.fixture
def captioner() -> Captioner:
    """A tiny captioner with open gates, so captions depend on the image."""
    torch.manual_seed(0)
    model = Captioner(GPT(GPTConfig.named("tiny")), VisionEncoder(32, clip_config=TINY_CLIP), cross_every=1)
    with torch.no_grad():
        for layer in model.lm.cross.values():
            layer.attn_gate.fill_(1.0)
            layer.ff_gate.fill_(1.0)
    return model.eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def lm_and_prompt(vocab_ids=None):
    torch.manual_seed(0)
    config = (
        GPTConfig.named("tiny")
        if vocab_ids is None
        else CompactVocabConfig.named("tiny", vocab_ids=vocab_ids)
    )
    lm = build_lm(config).eval()
    return lm, torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(2))


def test_captions_depend_on_the_image(captioner, pixels):
    captions = captioner.generate(pixels, max_new_tokens=8)
    assert len(captions) == 3 and all(len(c) == 8 for c in captions)
    assert len({tuple(c) for c in captions}) > 1  # otherwise the per-image tests below would prove little
    # beams that overtake each other exercise the cache reordering in the tests below
    assert captioner.generate(pixels, method="beam", max_new_tokens=8) != captions


def test_beam_of_one_is_greedy(captioner, pixels):
    greedy = captioner.generate(pixels, method="greedy", max_new_tokens=10)
    assert captioner.generate(pixels, method="beam", num_beams=1, max_new_tokens=10) == greedy
    lm, prompt = lm_and_prompt()
    assert decoding.beam_search(lm, prompt, max_new_tokens=10, eot=EOT, num_beams=1) == decoding.generate(
        lm, prompt, decoding.argmax, max_new_tokens=10, eot=EOT
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(method="greedy"),
        dict(method="beam", num_beams=3),
        dict(method="beam", num_beams=4, length_penalty=0.6),
        dict(method="sample", top_k=20, temperature=0.8),
        dict(method="sample", top_p=0.9),
    ],
)
def test_kv_cache_changes_nothing(captioner, pixels, options):
    def run(use_cache):
        generator = torch.Generator().manual_seed(3)
        return captioner.generate(
            pixels, max_new_tokens=12, generator=generator, use_cache=use_cache, **options
        )

    assert run(use_cache=True) == run(use_cache=False)


@pytest.mark.parametrize("vocab_ids", [None, (7, 11, 500, 3000, 42_000, EOT)])
def test_kv_cache_changes_nothing_for_the_plain_lm(vocab_ids):
    lm, prompt = lm_and_prompt(vocab_ids)
    for search in (decoding.generate, decoding.beam_search):
        cached = search(lm, prompt, max_new_tokens=9, eot=EOT)
        assert search(lm, prompt, max_new_tokens=9, eot=EOT, use_cache=False) == cached, search.__name__
        if vocab_ids:  # a model over a few ids never writes another one
            assert {t for seq in cached for t in seq} <= set(vocab_ids), search.__name__


def test_sampling_is_reproducible_with_a_seeded_generator(captioner, pixels):
    def run(seed):
        return captioner.generate(
            pixels, method="sample", max_new_tokens=10, generator=torch.Generator().manual_seed(seed)
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_of_one_is_greedy(captioner, pixels):
    greedy = captioner.generate(pixels, max_new_tokens=10)
    assert captioner.generate(pixels, method="sample", top_k=1, max_new_tokens=10) == greedy
    assert captioner.generate(pixels, method="sample", top_p=1e-6, max_new_tokens=10) == greedy


def test_batched_captions_equal_one_image_at_a_time(captioner, pixels):
    for options in (dict(method="greedy"), dict(method="beam", num_beams=3)):
        batched = captioner.generate(pixels, max_new_tokens=10, **options)
        single = [captioner.generate(pixels[i : i + 1], max_new_tokens=10, **options)[0] for i in range(3)]
        assert batched == single, options


def test_padding_rows_of_the_vocab_are_never_emitted():
    """Make a padded id (>= 50257) the most likely token everywhere; a real id is the runner-up."""
    torch.manual_seed(0)
    lm = GPT(GPTConfig.named("tiny")).eval()
    v = torch.randn(32)
    v = 10 * v / v.norm()
    with torch.no_grad():
        lm.transformer.ln_f.weight.zero_()  # every position's final state becomes ln_f.bias = v
        lm.transformer.ln_f.bias.copy_(v)
        lm.transformer.wte.weight[50300] = 2 * v  # tied: lm_head row too
        lm.transformer.wte.weight[123] = v
        assert lm(torch.zeros(1, 1, dtype=torch.long))[0][0, -1].argmax().item() == 50300
    prompt = torch.zeros(2, 1, dtype=torch.long)
    assert decoding.generate(lm, prompt, decoding.argmax, max_new_tokens=5, eot=EOT) == [[123] * 5] * 2
    assert decoding.beam_search(lm, prompt, max_new_tokens=5, eot=EOT, num_beams=3) == [[123] * 5] * 2
    sampled = decoding.generate(lm, prompt, decoding.sampler(temperature=5.0), max_new_tokens=50, eot=EOT)
    assert all(0 <= t < 50257 for row in sampled for t in row)
    out = decoding.decode_loop(lm, prompt, decoding.sampler(top_k=1), max_new_tokens=5)
    assert out.tolist() == [[123] * 5] * 2


def test_a_model_that_always_says_eot_gives_empty_captions(captioner, pixels):
    v = torch.randn(32)
    v = 10 * v / v.norm()
    with torch.no_grad():
        captioner.lm.transformer.ln_f.weight.zero_()
        captioner.lm.transformer.ln_f.bias.copy_(v)
        captioner.lm.transformer.wte.weight[EOT] = v
    for method in ("greedy", "beam", "sample"):
        assert captioner.generate(pixels, method=method, max_new_tokens=10) == [[], [], []]
    prompt = torch.full((3, 1), EOT)
    context = captioner.image_context(pixels)
    tokens = decoding.decode_loop(
        captioner.lm, prompt, decoding.argmax, max_new_tokens=10, eot=EOT, context=context
    )
    assert tokens.tolist() == [[EOT]] * 3  # decoding ends as soon as every row has finished


def test_each_row_stops_at_its_own_eot():
    lm, prompt = lm_and_prompt()
    free = decoding.generate(
        lm, prompt, decoding.argmax, max_new_tokens=12, eot=-1
    )  # -1 is never produced: no stopping
    stop = free[0][3]  # a token row 0 emits at step 3; other rows stop wherever they first emit it, if at all
    expected = [row[: row.index(stop)] if stop in row else row for row in free]
    assert decoding.generate(lm, prompt, decoding.argmax, max_new_tokens=12, eot=stop) == expected
    tokens = decoding.decode_loop(lm, prompt, decoding.argmax, max_new_tokens=12, eot=stop)
    for row, exp in zip(tokens.tolist(), expected):
        assert row[len(exp) :] == [stop] * (len(row) - len(exp))  # finished rows are padded with eot


def test_argument_errors(captioner, pixels):
    lm, prompt = lm_and_prompt()
    with pytest.raises(ValueError, match="needs 67 positions; the model's block_size is 64"):
        decoding.generate(lm, prompt, decoding.argmax, max_new_tokens=64, eot=EOT)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        decoding.sampler(temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        decoding.sampler(top_p=1.5)
    with pytest.raises(ValueError, match="unknown decoding method 'nucleus'"):
        captioner.generate(pixels, method="nucleus")


def test_the_decoding_loop_never_reads_the_device(captioner, pixels, monkeypatch):
    """Beam search and greedy keep their bookkeeping on the device: with the finished-check stubbed out (on CUDA it
    reads a flag copied asynchronously), nothing inside the loop turns a tensor into a Python value; only the
    results are read back at the end."""
    monkeypatch.setattr(decoding, "_Finished", lambda device: lambda finished: False)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    context = captioner.image_context(pixels)
    prompt = torch.full((3, 1), EOT)
    decoding.beam_search(captioner.lm, prompt, max_new_tokens=12, eot=EOT, num_beams=3, context=context)
    assert reads == ["tolist", "tolist"]  # lengths and ids of the best hypotheses
    reads.clear()
    decoding.generate(captioner.lm, prompt, max_new_tokens=12, eot=EOT, context=context)
    assert reads == ["tolist"]


def test_cuda_graph_needs_the_cache_on_a_cuda_device(captioner, pixels):
    with pytest.raises(ValueError, match="cuda_graph=True needs use_cache=True and a model on a CUDA device"):
        captioner.generate(pixels, method="beam", cuda_graph=True)


def test_the_cuda_graph_cache_lets_a_deleted_model_go():
    """Graphed decode steps are cached per LM (a weak key) and batch shape; a cached step must not keep its LM
    alive. A step is captured on its first replay, not when made, so the cache itself runs on the CPU."""
    lm, prompt = lm_and_prompt()
    step = decoding._graphed_step(lm, prompt, None, 1, 5, N_VOCAB)
    assert (
        decoding._graphed_step(lm, prompt, None, 1, 5, N_VOCAB) is step
    )  # same shape: the capture is reused
    other = decoding._graphed_step(lm, prompt[:, :2], None, 1, 5, N_VOCAB)
    assert list(decoding._GRAPHS[lm].values()) == [other]  # a new shape replaces the old step
    entries, freed = len(decoding._GRAPHS), weakref.ref(lm)
    del lm
    gc.collect()
    assert freed() is None
    assert len(decoding._GRAPHS) == entries - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decodes_as_the_cache_does_and_lets_the_model_go():
    lm, prompt = lm_and_prompt()
    lm, prompt = lm.cuda(), prompt.cuda()
    for search in (decoding.generate, decoding.beam_search):
        cached = search(lm, prompt, max_new_tokens=9, eot=EOT)
        for _ in range(2):  # captured, then replayed for a second batch of the same shape
            assert search(lm, prompt, max_new_tokens=9, eot=EOT, cuda_graph=True) == cached, search.__name__
    freed = weakref.ref(lm)
    del lm
    gc.collect()
    assert freed() is None  # a captured graph keeps the LM's kernels, not the LM

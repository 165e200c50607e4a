import pickle

from captioner.tokenizer import EOT, N_VOCAB, gpt2_encoding


def test_known_ids_and_vocab():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == N_VOCAB == 50257
    assert enc.eot_token == EOT == 50256


def test_round_trip_unicode_and_whitespace():
    enc = gpt2_encoding()
    for text in ["a red circle  left of\na blue square.", "naïve café 東京 🙂", "  leading", "it's we'll"]:
        assert enc.decode(enc.encode(text)) == text


def test_eot_is_special_only_when_allowed():
    enc = gpt2_encoding()
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT]
    assert enc.encode_ordinary("<|endoftext|>") != [EOT]
    assert enc.decode([EOT]) == "<|endoftext|>"


def test_picklable_for_dataloader_workers():
    enc = gpt2_encoding()
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.encode("Hello world") == [15496, 995]

"""The generation loop, on the torch runner, against oracles: the model's own argmax, solo runs, numpy math."""

import numpy as np
import pytest
import torch

from gptdeploy.errors import GptDeployError
from gptdeploy.app.generation import GenerationConfig, TextStream, choose_tokens, generate, stream
from gptdeploy.tokenizer import BPETokenizer, CharTokenizer
from gptdeploy.runtimes.torch_runner import TorchRunner

PROMPTS = ["Hello world", "The", "A longer prompt, so that the batch is ragged: eleven tokens"]
GREEDY = GenerationConfig(max_new_tokens=32, greedy=True)


@pytest.fixture(scope="module")
def runner(lively):
    return TorchRunner(lively.model)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer()


def greedy_by_full_forward(model, ids, n):
    """The oracle: argmax of a full forward pass over the whole sequence, no cache, no padding."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[-n:]


def test_greedy_equals_full_forward_argmax(runner, tok, lively):
    for prompt in PROMPTS:
        result = generate(runner, tok, [prompt], GREEDY)
        assert result.new_ids[0] == greedy_by_full_forward(lively.model, tok.encode(prompt), 32)
        assert result.finish_reasons == ["length"]
        assert len(set(result.new_ids[0])) > 10  # the model is lively: a real test, not one token repeated


def test_ragged_batch_rows_equal_solo_runs(runner, tok):
    batch = generate(runner, tok, PROMPTS, GREEDY)
    assert len({len(tok.encode(p)) for p in PROMPTS}) == 3
    for row, prompt in enumerate(PROMPTS):
        assert batch.new_ids[row] == generate(runner, tok, [prompt], GREEDY).new_ids[0]
        assert batch.prompt_ids[row] == tok.encode(prompt)


def test_sampling_with_a_seed_repeats_itself(runner, tok):
    config = GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first = generate(runner, tok, PROMPTS, config).new_ids
    assert generate(runner, tok, PROMPTS, config).new_ids == first
    other = GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=8)
    assert generate(runner, tok, PROMPTS, other).new_ids != first
    assert first != generate(runner, tok, PROMPTS, GREEDY).new_ids


def test_top_k_1_and_temperature_0_are_greedy(runner, tok):
    greedy = generate(runner, tok, PROMPTS, GREEDY).new_ids
    assert generate(runner, tok, PROMPTS, GenerationConfig(max_new_tokens=32, top_k=1, seed=3)).new_ids == greedy
    assert generate(runner, tok, PROMPTS, GenerationConfig(max_new_tokens=32, temperature=0)).new_ids == greedy


def test_stop_at_end_of_text_per_row(runner, tok):
    """Each row stops at its own first end-of-text (here an id the model emits, standing in for it)."""
    full = generate(runner, tok, PROMPTS, GREEDY).new_ids
    stop_id = full[0][5]
    stopping = BPETokenizer()
    stopping.eot_id = stop_id  # a tokenizer whose end-of-text is that id
    result = generate(runner, stopping, PROMPTS, GREEDY)
    for row, ids in enumerate(full):
        if stop_id in ids:
            cut = ids.index(stop_id) + 1
            assert result.new_ids[row] == ids[:cut] and result.finish_reasons[row] == "eot"
        else:
            assert result.new_ids[row] == ids and result.finish_reasons[row] == "length"
    assert result.finish_reasons[0] == "eot" and len(result.new_ids[0]) == full[0].index(stop_id) + 1
    no_stop = GenerationConfig(max_new_tokens=32, greedy=True, stop_at_eot=False)
    assert generate(runner, stopping, PROMPTS, no_stop).new_ids == full


def test_end_of_text_is_not_in_the_text(runner, tok):
    result = generate(runner, tok, ["Hi"], GREEDY)
    result.new_ids[0].append(tok.eot_id)
    assert "<|endoftext|>" not in result.texts(tok)[0]


def test_padded_vocabulary_ids_are_never_emitted(tok):
    """nanoGPT pads the vocabulary to 50304: ids 50257.. have logits but are no tokens."""
    from gptdeploy.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304))
    model.init_weights(0)
    with torch.no_grad():  # the final hidden state is ln_f's bias; the padding rows point along it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_(generator=torch.Generator().manual_seed(0))
        model.transformer.wte.weight[50257:] = model.transformer.ln_f.bias * 10
    runner = TorchRunner(model.eval())
    ids = np.array([tok.encode("Hello world")])
    logits, _ = runner.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], runner.new_cache(1))
    assert logits[0, -1].argmax() >= 50257  # the precondition: unmasked, a padding id would win
    for config in (GREEDY, GenerationConfig(max_new_tokens=32, seed=0)):
        result = generate(runner, tok, ["Hello world"], config)
        assert max(result.new_ids[0]) < 50257


def test_choose_tokens_samples_the_softmax():
    """Frequencies of 200,000 draws against softmax(logits / T), and the top-k / top-p supports."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]], dtype=np.float32)
    rng = np.random.default_rng(0)

    def frequencies(config, n=200_000):
        draws = choose_tokens(np.repeat(logits, n, axis=0), config, rng, vocab_limit=5)
        return np.bincount(draws, minlength=6) / n

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    # id 5 has the largest logit but lies beyond vocab_limit
    expected = np.append(softmax(logits[0, :5] / 0.7), 0.0)
    assert np.abs(frequencies(GenerationConfig(temperature=0.7)) - expected).max() < 0.005
    top2 = frequencies(GenerationConfig(top_k=2))
    assert np.abs(top2 - np.append(softmax(np.array([2.0, 1.0])), [0, 0, 0, 0])).max() < 0.005
    # probabilities 0.56, 0.21, 0.13, 0.08, 0.03 (ids 0..4): top_p 0.7 keeps ids 0, 1 (0.56 < 0.7 <= 0.77)
    nucleus = frequencies(GenerationConfig(top_p=0.7))
    assert np.abs(nucleus - np.append(softmax(np.array([2.0, 1.0])), [0, 0, 0, 0])).max() < 0.005
    assert set(np.flatnonzero(frequencies(GenerationConfig(top_p=0.8)))) == {0, 1, 2}
    assert choose_tokens(logits, GenerationConfig(greedy=True), rng, vocab_limit=5).tolist() == [0]


def test_text_stream_holds_back_split_characters(tok):
    text = "naïve café — 日本語 😀🎉 done"
    ids = tok.encode(text)

    def is_utf8(data):
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(is_utf8(tok.decode_bytes([i])) for i in ids)  # the precondition: some tokens split characters
    text_stream = TextStream(tok)
    pieces = [text_stream.push(i) for i in ids] + [text_stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_yields_the_generated_text(runner, tok):
    config = GenerationConfig(max_new_tokens=20, seed=5)
    pieces = list(stream(runner, tok, "Hello", config))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(runner, tok, ["Hello"], config).texts(tok)[0]


def test_on_token_streams_every_token_in_order(runner, tok):
    seen = []
    result = generate(runner, tok, PROMPTS, GREEDY, on_token=lambda row, token: seen.append((row, token)))
    for row in range(len(PROMPTS)):
        assert [t for r, t in seen if r == row] == result.new_ids[row]
    assert result.prefill_s > 0 and result.decode_s > 0 and result.decode_tokens_per_s > 0


def test_context_policy_refuses_with_the_numbers(runner, tok):
    block = runner.info.block_size  # 128
    prompt = [464] * 100
    assert len(generate(runner, tok, [prompt], GenerationConfig(max_new_tokens=block - 100, greedy=True))
               .new_ids[0]) == block - 100
    with pytest.raises(GptDeployError, match=r"prompt of 100 tokens \+ 29 new tokens = 129 .* 128 .* at most 28"):
        generate(runner, tok, [prompt], GenerationConfig(max_new_tokens=29))
    with pytest.raises(GptDeployError, match="prompt of 100 tokens"):  # the longest row of a batch counts
        generate(runner, tok, ["Hi", prompt], GenerationConfig(max_new_tokens=29))


def test_empty_prompt_starts_from_end_of_text(runner, tok):
    result = generate(runner, tok, [""], GenerationConfig(max_new_tokens=4, greedy=True))
    assert result.prompt_ids == [[tok.eot_id]]
    meta_tok = CharTokenizer({"a": 0, "b": 1}, {0: "a", 1: "b"})
    with pytest.raises(GptDeployError, match="no end-of-text"):
        generate(runner, meta_tok, [""], GREEDY)


@pytest.mark.parametrize(
    "prompts, config, fragment",
    [
        ([[15496, 50257]], GREEDY, "token id 50257 is out of range"),
        ([[-1]], GREEDY, "token id -1 is out of range"),
        ([], GREEDY, "no prompt"),
        (["Hi"], GenerationConfig(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (["Hi"], GenerationConfig(temperature=-1), "temperature"),
        (["Hi"], GenerationConfig(top_k=0), "top_k"),
        (["Hi"], GenerationConfig(top_p=1.5), "top_p"),
    ],
)
def test_bad_requests_are_refused(runner, tok, prompts, config, fragment):
    with pytest.raises(GptDeployError, match=fragment):
        generate(runner, tok, prompts, config)

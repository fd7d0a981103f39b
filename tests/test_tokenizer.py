import pickle

import pytest

from gptdeploy.errors import GptDeployError
from gptdeploy.tokenizer import BPETokenizer, CharTokenizer, read_tiktoken_ranks


def test_gpt2_vectors():
    tok = BPETokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    text = "ROMEO:\nBut, soft! what light through yonder window breaks? 😀"
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_can_be_kept_literal():
    tok = BPETokenizer()
    assert 50256 not in tok.encode("<|endoftext|>", allow_special=False)


def test_corrupt_rank_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(GptDeployError, match="corrupt"):
        read_tiktoken_ranks(bad, "0" * 64)


def test_char_tokenizer_from_meta(tmp_path, char_meta):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(char_meta))
    tok = CharTokenizer.from_meta(path)
    assert tok.vocab_size == len(char_meta["itos"]) and tok.eot_id is None
    assert tok.decode(tok.encode("To be, or not")) == "To be, or not"
    with pytest.raises(GptDeployError, match="not in the model's vocabulary"):
        tok.encode("naïve")


class Exploit:
    def __reduce__(self):
        return (print, ("code ran",))


def test_meta_pkl_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"stoi": {}, "itos": {}, "x": Exploit()}))
    with pytest.raises(GptDeployError, match="plain data"):
        CharTokenizer.from_meta(path)

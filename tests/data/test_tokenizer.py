"""Tokenizers: special ids come from the tokenizer (never a fixed 0), overrides, and a clear error otherwise."""
import json

import pytest

from lctrain.data.tokenizer import ByteTokenizer, get_tokenizer, tokenizer_fingerprint
from tests.data.corpus import make_docs, make_tokenizer


def test_eos_and_pad_ids_come_from_the_tokenizer(tmp_path):
    docs = make_docs(20)
    tok = get_tokenizer(str(make_tokenizer(tmp_path / "tokenizer.json", docs)))
    assert tok.eos_id == 1 and tok.pad_id == 2 and tok.bos_id is None  # "<|endoftext|>" and "<pad>", not id 0
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    ids = tok.encode(docs[0])
    assert tok.eos_id not in ids and len(ids) == len(docs[0].split())
    assert tok.vocab_size > max(ids)


def test_sidecar_config_and_overrides(tmp_path):
    path = make_tokenizer(tmp_path / "tokenizer.json", make_docs(20), specials=("[UNK]", "<s>", "</s>", "[SEP]"))
    tok = get_tokenizer(str(path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # Llama-2 style names; no pad token: EOS pads
    assert get_tokenizer(str(path), bos_token="none").bos_id is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[SEP]"}}))
    assert get_tokenizer(str(path)).eos_id == 3  # tokenizer_config.json names the EOS token
    assert get_tokenizer(str(path), eos_token="</s>").eos_id == 2


def test_unknown_eos_is_an_error(tmp_path):
    path = make_tokenizer(tmp_path / "tokenizer.json", make_docs(5), specials=("[UNK]", "[X]"))
    with pytest.raises(ValueError, match="end-of-document token.*--eos-token"):
        get_tokenizer(str(path))
    assert get_tokenizer(str(path), eos_token="[X]").eos_id == 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        get_tokenizer(str(path), eos_token="<nope>")


def test_byte_tokenizer_and_fingerprints(tmp_path):
    assert get_tokenizer("byte").encode("hé") == [104, 195, 169] and ByteTokenizer.eos_id == 0
    path = make_tokenizer(tmp_path / "tokenizer.json", make_docs(5))
    assert tokenizer_fingerprint(str(path)) == get_tokenizer(str(path)).fingerprint != tokenizer_fingerprint("byte")
    with pytest.raises(ValueError, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing.json"))

"""MQAR and passkey generators: structure, determinism, independence of the global RNG."""
import numpy as np
import pytest
import torch

from lctrain.data.config import DataConfig
from lctrain.data.mqar import MQARDataset, mqar_sample
from lctrain.data.passkey import PasskeyDataset, min_passkey_len
from lctrain.data.sampler import build_dataset


@pytest.mark.parametrize("seq_len,n", [(32, 4), (37, 8), (1000, 16)])
def test_mqar_structure(seq_len, n):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    tokens, qpos = mqar_sample(seq_len, n, 256, rng)
    assert tokens.shape == (seq_len + 1,) and qpos.shape == (n,)
    keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
    assert len(set(keys.tolist())) == n and keys.min() >= 1 and keys.max() < 128
    assert values.min() >= 128 and values.max() < 256
    answer = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(tokens[qpos].tolist()) == sorted(keys.tolist())
    for p in qpos:
        assert tokens[p + 1] == answer[tokens[p]]
    rest = np.ones(seq_len + 1, dtype=bool)
    rest[: 2 * n] = False
    rest[qpos] = rest[qpos + 1] = False
    assert (tokens[rest] == 0).all()


def test_mqar_dataset_masks_and_determinism():
    ds = MQARDataset(64, 8, seed=3)
    s = ds[5]
    mask = s["loss_mask"].bool()
    assert int(mask.sum()) == 8
    assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
    # the label at a queried position is the value written after the same key in the context
    ctx = s["input_ids"][:16].tolist()
    answer = dict(zip(ctx[0::2], ctx[1::2]))
    for k, v in zip(s["input_ids"][mask].tolist(), s["labels"][mask].tolist()):
        assert answer[k] == v
    torch.manual_seed(0)
    a = ds[5]
    torch.manual_seed(1)
    b = MQARDataset(64, 8, seed=3)[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ds[6]["input_ids"], a["input_ids"])
    assert not torch.equal(MQARDataset(64, 8, seed=3, split="eval")[5]["input_ids"], a["input_ids"])


def test_mqar_too_short():
    with pytest.raises(ValueError, match="too short"):
        build_dataset(DataConfig(source="mqar", seq_len=20, mqar_num_kv_pairs=8))


def test_passkey():
    ds = PasskeyDataset(min_passkey_len(5) + 40, digits=5, seed=1)
    for i in range(4):
        s = ds[i]
        text = bytes(s["input_ids"].tolist()).decode()
        answer = bytes(s["labels"][s["loss_mask"].bool()].tolist()).decode()
        assert len(answer) == 5 and answer.isdigit()
        assert f"The pass key is {answer}." in text
        assert text.endswith("The pass key is " + answer[:-1])
    with pytest.raises(ValueError, match="shorter"):
        PasskeyDataset(30)[0]

"""Training data: MQAR and passkey generators, prepared text corpora, the DP split by global sample index."""
from lctrain.data.config import DataConfig
from lctrain.data.mqar import MQARDataset, mqar_sample
from lctrain.data.passkey import PasskeyDataset, passkey_sample
from lctrain.data.sampler import build_dataset, collate, micro_batch_indices
from lctrain.data.text import TextDataset, prepare_text
from lctrain.data.tokenizer import ByteTokenizer, get_tokenizer

__all__ = ["ByteTokenizer", "DataConfig", "MQARDataset", "PasskeyDataset", "TextDataset", "build_dataset", "collate",
           "get_tokenizer", "micro_batch_indices", "mqar_sample", "passkey_sample", "prepare_text"]

"""Training data: MQAR and passkey generators, prepared text corpora packed into documents, the DP split by global
sample index."""
from lctrain.data.config import DataConfig
from lctrain.data.mqar import MQARDataset, mqar_sample
from lctrain.data.packing import pack_pieces
from lctrain.data.passkey import PasskeyDataset, passkey_sample
from lctrain.data.permutation import Permutation
from lctrain.data.sampler import build_dataset, collate, micro_batch_indices
from lctrain.data.text import IGNORE_INDEX, TextDataset, prepare_text
from lctrain.data.tokenizer import ByteTokenizer, get_tokenizer

__all__ = ["IGNORE_INDEX", "ByteTokenizer", "DataConfig", "MQARDataset", "PasskeyDataset", "Permutation", "TextDataset",
           "build_dataset", "collate", "get_tokenizer", "micro_batch_indices", "mqar_sample", "pack_pieces",
           "passkey_sample", "prepare_text"]

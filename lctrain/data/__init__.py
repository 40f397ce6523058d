"""Training data: MQAR and passkey generators, prepared text corpora packed into documents, the DP split by global
sample index. The names are imported on first use (lctrain._lazy): `lctrain data prepare` and the config
need no torch."""
from lctrain._lazy import lazy_exports

_EXPORTS = {"DataConfig": "lctrain.data.config", "MQARDataset": "lctrain.data.mqar", "mqar_sample": "lctrain.data.mqar",
            "pack_pieces": "lctrain.data.packing", "PasskeyDataset": "lctrain.data.passkey",
            "passkey_sample": "lctrain.data.passkey", "Permutation": "lctrain.data.permutation",
            "build_dataset": "lctrain.data.sampler", "collate": "lctrain.data.sampler",
            "micro_batch_indices": "lctrain.data.sampler", "IGNORE_INDEX": "lctrain.data.text",
            "TextDataset": "lctrain.data.text", "prepare_text": "lctrain.data.text",
            "ByteTokenizer": "lctrain.data.tokenizer", "get_tokenizer": "lctrain.data.tokenizer"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Sequence-parallel (context-parallel) attention: one module per method.

    from lctrain.sp import (ring_attention, allgather_attention, ulysses_attention,
                            lasp2_linear_attention, lasp1_linear_attention, lasp2_delta_attention,
                            halo_attention, shard_sequence, unshard_sequence, PackedDocuments)

Every method takes `cu_seqlens=` (packed documents) as the boundaries tensor; those whose annotation says so
(all but halo_attention so far) also take the batch's `PackedDocuments` (lctrain.sp.documents), built once per
batch on the host and shared by every layer.
"""
from lctrain.parallel.sharding import shard_sequence, unshard_sequence
from lctrain.sp.allgather import allgather_attention
from lctrain.sp.documents import PackedDocuments
from lctrain.sp.halo import halo_attention
from lctrain.sp.lasp1 import lasp1_linear_attention
from lctrain.sp.lasp1_delta import lasp1_delta_attention
from lctrain.sp.lasp2 import lasp2_linear_attention
from lctrain.sp.lasp2_delta import lasp2_delta_attention
from lctrain.sp.ring import ring_attention
from lctrain.sp.ulysses import ulysses_attention

__all__ = ["shard_sequence", "unshard_sequence", "ring_attention", "allgather_attention", "ulysses_attention",
           "lasp1_linear_attention", "lasp2_linear_attention", "lasp2_delta_attention",
           "lasp1_delta_attention", "halo_attention", "PackedDocuments"]

"""Process mesh (DP x CP x TP via Megatron-core), counted collectives, sequence sharding."""
from lctrain.parallel.comm import CollectiveTimeout, CommRecorder, comm_tag, record_comm
from lctrain.parallel.mesh import Mesh, MeshConfig, cp_group_or_default, destroy_mesh, get_mesh, init_mesh
from lctrain.parallel.sharding import position_ids, shard_positions, shard_sequence, unshard_sequence

__all__ = [
    "CollectiveTimeout", "CommRecorder", "comm_tag", "record_comm",
    "Mesh", "MeshConfig", "cp_group_or_default", "destroy_mesh", "get_mesh", "init_mesh",
    "position_ids", "shard_positions", "shard_sequence", "unshard_sequence",
]

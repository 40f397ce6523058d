"""One table of constants per device: published specifications, and the efficiencies the time model applies.

Every number carries its source. Peaks are the vendors' datasheet values (dense, no sparsity). Link
bandwidths are per GPU and per direction. Efficiencies are published measurements of the kernels lctrain
calls on that GPU; where no measurement of OUR kernels exists (no GPU run of lctrain yet) the table says
which published number stands in. No constant is fitted to the published training results that
docs/planner.md compares against. When the GPU benchmarks (`make gpu-check`, issue 11) write a measured
table, register it with :func:`register` under a new name ("h100-measured", ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hardware:
    """A GPU and its links; every field a spec or a measured efficiency (see `sources`)."""

    name: str
    memory_gb: float
    """Device memory (GB = 1e9 bytes)."""
    peak_bf16_flops: float
    """Dense BF16 tensor-core peak, FLOP/s."""
    hbm_bytes_per_s: float
    """HBM bandwidth, bytes/s."""
    intra_node_bytes_per_s: float
    """NVLink/NVSwitch bandwidth per GPU per direction, bytes/s."""
    inter_node_bytes_per_s: float
    """InfiniBand bandwidth per GPU (one NIC per GPU) per direction, bytes/s."""
    intra_node_latency_s: float
    """Latency of one step of a ring collective / one P2P message inside a node."""
    inter_node_latency_s: float
    """The same across nodes."""
    efficiency: dict[str, float]
    """Achieved / peak: matmul, attention, linear_attention (FLOPs), memory (HBM bytes), intra_link, inter_link
    (bus bandwidth of NCCL collectives / link rate). One table per device: the same factor for every SP method
    and every comparison (nothing per method or per published table)."""
    peak_flops: dict[str, float] = field(default_factory=dict)
    """Dense peak FLOP/s by dtype of the inputs: bf16, fp16 (tensor cores), tf32 (tensor cores, float32 inputs
    when TF32 is allowed), fp32 (CUDA cores), fp64 (tensor-core DGEMM)."""
    memory_reserve_gb: float = 0.0
    """Device memory the job cannot use for tensors: CUDA context, cuBLAS workspaces, NCCL buffers."""
    fragmentation: float = 0.0
    """Caching-allocator fragmentation, as a fraction of the activation peak (blocks cached but not reusable)."""
    sources: dict[str, str] = field(default_factory=dict)

    def peak_for(self, dtype: str) -> float:
        """Peak FLOP/s for matmul-like work on inputs of `dtype` ("bf16", "fp32", ...), by the TF32 policy."""
        if dtype == "fp32" and TF32_MATMUL:
            dtype = "tf32"
        return self.peak_flops.get(dtype, self.peak_bf16_flops)

    @property
    def usable_bytes(self) -> float:
        """Bytes available to tensors: the device less the reserve."""
        return (self.memory_gb - self.memory_reserve_gb) * 1e9


#: TF32 policy: lctrain never sets torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision, and
#: PyTorch's default (since 1.12) keeps float32 matmuls in full float32, so float32 bmm/mm run at the fp32
#: CUDA-core rate, not the TF32 tensor-core rate. (Triton kernels' tl.dot uses TF32 for float32 inputs by
#: default; lctrain's kernels take bf16 inputs in the planner's GPU model.)
TF32_MATMUL = False

_RESERVE = ("CUDA context ~0.5 GB, cuBLAS/cuDNN workspaces ~0.5 GB, NCCL communicator buffers ~1 GB for the "
            "TP, CP and DP groups (NCCL_BUFFSIZE 4 MiB x channels x peers): 2 GB; an estimate, not measured here")
_FRAG = ("PyTorch caching allocator: reserved minus allocated at the peak is typically 5-15% in LLM training "
         "(torch.cuda.memory_stats); 10% of the activation peak, an estimate until gpu-check measures it")
_NCCL_TESTS = ("nccl-tests all_reduce_perf bus bandwidth; NVIDIA reports ~90% of NVLink rate within a DGX "
               "and ~90% of the NIC rate across nodes for large messages (NCCL/DGX performance pages); "
               "used as 0.9 for both, not measured here")
_LAT = ("NCCL ring step latency: a few microseconds over NVLink, ~10 us over InfiniBand (nccl-tests small-message "
        "times); not measured here")

HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(
        name="NVIDIA H100 SXM5 80GB", memory_gb=80.0, peak_bf16_flops=989.4e12, hbm_bytes_per_s=3.35e12,
        intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9,
        intra_node_latency_s=5e-6, inter_node_latency_s=10e-6,
        efficiency={"matmul": 0.70, "attention": 0.34, "linear_attention": 0.34, "memory": 0.80,
                    "intra_link": 0.90, "inter_link": 0.90},
        peak_flops={"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12},
        memory_reserve_gb=2.0, fragmentation=0.10,
        sources={
            "peak/memory/hbm": "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989.4 TFLOPS BF16 dense, 80 GB HBM3, "
                               "3.35 TB/s)",
            "peak_flops": "H100 SXM5 datasheet, dense: BF16/FP16 989.4, TF32 494.7, FP32 66.9, FP64 tensor core 66.9 "
                          "TFLOPS",
            "memory_reserve": _RESERVE, "fragmentation": _FRAG,
            "intra_node": "NVLink 4: 900 GB/s bidirectional per GPU (datasheet) = 450 GB/s per direction",
            "inter_node": "DGX H100: one ConnectX-7 400 Gb/s InfiniBand NDR port per GPU = 50 GB/s",
            "matmul": "cuBLAS BF16 GEMM at LLM shapes reaches ~700 TFLOPS on H100 SXM (NVIDIA Transformer Engine / "
                      "cuBLAS benchmarks): 0.70",
            "attention": "FlashAttention-2 on H100 SXM5, head dim 128, fwd+bwd causal ~335 TFLOPS (FlashAttention-3 "
                         "paper, Dao et al. 2024, Fig. 'FA2' bars): 335/989 = 0.34",
            "linear_attention": "no published H100 number for lctrain's Triton lightning kernel: the FlashAttention-2 "
                                "efficiency stands in (both are tiled Triton/CUDA matmul kernels with d=128 blocks)",
            "memory": "elementwise kernels reach ~80% of HBM bandwidth (STREAM-like copy on H100)",
            "links": _NCCL_TESTS, "latency": _LAT,
        }),
    "h200": Hardware(
        name="NVIDIA H200 SXM 141GB", memory_gb=141.0, peak_bf16_flops=989.4e12, hbm_bytes_per_s=4.8e12,
        intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9,
        intra_node_latency_s=5e-6, inter_node_latency_s=10e-6,
        efficiency={"matmul": 0.70, "attention": 0.34, "linear_attention": 0.34, "memory": 0.80,
                    "intra_link": 0.90, "inter_link": 0.90},
        peak_flops={"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12},
        memory_reserve_gb=2.0, fragmentation=0.10,
        sources={
            "peak_flops": "as H100 SXM (same GH100 die and clocks)", "memory_reserve": _RESERVE,
            "fragmentation": _FRAG,
            "peak/memory/hbm": "NVIDIA H200 datasheet (SXM: 989 TFLOPS BF16 dense, 141 GB HBM3e, 4.8 TB/s)",
            "intra_node": "NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s per direction",
            "inter_node": "DGX H200: one ConnectX-7 400 Gb/s NDR port per GPU = 50 GB/s",
            "efficiencies": "as H100 (same Hopper SM and tensor cores; the larger HBM is in hbm_bytes_per_s)",
            "links": _NCCL_TESTS, "latency": _LAT,
        }),
    "a100-80g": Hardware(
        name="NVIDIA A100 SXM4 80GB", memory_gb=80.0, peak_bf16_flops=312e12, hbm_bytes_per_s=2.039e12,
        intra_node_bytes_per_s=300e9, inter_node_bytes_per_s=25e9,
        intra_node_latency_s=5e-6, inter_node_latency_s=10e-6,
        efficiency={"matmul": 0.80, "attention": 0.55, "linear_attention": 0.55, "memory": 0.80,
                    "intra_link": 0.90, "inter_link": 0.90},
        peak_flops={"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "fp64": 19.5e12},
        memory_reserve_gb=2.0, fragmentation=0.10,
        sources={
            "peak_flops": "A100 datasheet, dense: BF16/FP16 312, TF32 156, FP32 19.5, FP64 tensor core 19.5 TFLOPS",
            "memory_reserve": _RESERVE, "fragmentation": _FRAG,
            "peak/memory/hbm": "NVIDIA A100 datasheet (SXM4 80GB: 312 TFLOPS BF16 dense, HBM2e 2,039 GB/s)",
            "intra_node": "NVLink 3: 600 GB/s bidirectional per GPU = 300 GB/s per direction",
            "inter_node": "DGX A100: one ConnectX-6 200 Gb/s HDR port per GPU = 25 GB/s",
            "matmul": "cuBLAS BF16 GEMM reaches ~250 TFLOPS on A100 at LLM shapes (0.80)",
            "attention": "FlashAttention-2 paper (Dao 2023): fwd+bwd 50-70% of A100 peak, causal, head dim 128 "
                         "(~170-190 TFLOPS): 0.55",
            "linear_attention": "as attention (no published A100 number for lctrain's Triton lightning kernel)",
            "memory": "elementwise kernels reach ~80% of HBM bandwidth",
            "links": _NCCL_TESTS, "latency": _LAT,
        }),
}


def register(key: str, hw: Hardware) -> None:
    """Add a table (e.g. one measured by the GPU benchmarks) under `key`."""
    HARDWARE[key] = hw


def get_hardware(key: str) -> Hardware:
    """The table named `key`; ValueError naming the known ones otherwise."""
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {key!r}; known: {', '.join(sorted(HARDWARE))}")
    return HARDWARE[key]

"""The rehearsal's report: memory of the rank, per-layer saved bytes, collectives per step, findings, stand-ins."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    index: int
    mixer: str
    """"L" linear attention, "A" softmax, "D" gated delta rule, "G" GLA (the layer pattern's letter)."""
    sp: str
    """The layer's SP method (lasp2, allgather, ...)."""
    saved_bytes: int
    """Bytes the layer's forward leaves alive for backward (its output excluded), measured in the first step."""
    backends: list[str] = field(default_factory=list)
    """The local compute backends the layer's calls dispatched to (as on the target GPU)."""


@dataclass
class CollectiveReport:
    op: str
    group: str
    """tp | cp | dp | dp_cp | world | other (a group of another size or membership)."""
    bytes: int
    """Bytes this rank contributes per step (all calls together)."""
    calls: int


@dataclass
class Report:
    """What `lctrain rehearse` found for one rank of a job (JSON keys as in issue 20)."""

    config: str
    gpus: int
    gpus_per_node: int
    rank: int
    layout: dict[str, int]
    """{"tp", "cp", "dp", "grad_accum", "zero_stage"}."""
    hardware: str
    dtype: str
    steps: int
    peak_bytes: int
    """The rank's peak of live device storages over the whole rehearsal (states + activations + buffers)."""
    states_bytes: int
    """Parameters, gradients and optimizer states as this rank holds them (sharded per the ZeRO stage)."""
    activations_bytes: int
    """Peak of live activations and temporaries (storages that are not states nor collective buffers)."""
    comm_buffer_bytes: int
    """Peak of live collective output buffers (storages created inside lctrain.parallel.comm)."""
    layers: list[LayerReport]
    largest_allocations: list[dict[str, Any]]
    """The ten largest single allocations: {"bytes", "line", "category", "count"}."""
    collectives_per_step: list[CollectiveReport]
    """What one steady-state step issues (the last rehearsed step)."""
    collectives_by_phase: dict[str, list[CollectiveReport]]
    """The same for every other phase (setup, log, eval, save)."""
    stand_ins: list[str]
    findings: list[dict[str, str]]
    """Failures (issue 20, item 2): {"kind", "op", "line", "detail", "phase"}; kind is host_sync |
    cpu_tensor_in_device_op | cpu_collective | fp32_matmul, or error (the rehearsed code raised; the run stopped)."""
    notes: list[str] = field(default_factory=list)
    host_to_device: dict[str, int] = field(default_factory=dict)
    """Explicit host-to-device copies in one steady-state step: source line -> bytes (allowed; listed)."""
    syncs_allowed: list[dict[str, str]] = field(default_factory=list)
    """Host reads outside the steady state (setup, the first step, log points, eval, save)."""
    device_usable_bytes: int = 0
    """Bytes the `hardware` leaves to tensors (lctrain.plan.hardware: memory less the CUDA context/NCCL reserve)."""
    fits: bool = True
    """peak_bytes <= device_usable_bytes (the allocator's rounding and fragmentation come on top)."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        return json.dumps(d, indent=1)

    def text(self) -> str:
        gib = 2 ** 30
        lo = self.layout
        out = [f"rehearsal of {self.config}: rank {self.rank} of {self.gpus} GPUs ({self.gpus_per_node} per node, "
               f"{self.hardware}), tp={lo['tp']} cp={lo['cp']} dp={lo['dp']} grad_accum={lo['grad_accum']} "
               f"ZeRO-{lo['zero_stage']}, {self.dtype}, {self.steps} steps + eval + save ({self.seconds:.1f} s)",
               f"  peak        {self.peak_bytes / gib:10.3f} GiB  ({self.peak_bytes} bytes)",
               f"  states      {self.states_bytes / gib:10.3f} GiB",
               f"  activations {self.activations_bytes / gib:10.3f} GiB",
               f"  comm bufs   {self.comm_buffer_bytes / gib:10.3f} GiB",
               f"  {self.hardware} leaves {self.device_usable_bytes / gib:.1f} GiB to tensors: "
               + ("fits" if self.fits else "DOES NOT FIT"),
               "  layers (index mixer sp saved backends):"]
        out += [f"    {L.index:3d} {L.mixer} {L.sp:<10} {L.saved_bytes / gib:8.3f} GiB  {','.join(L.backends) or '-'}"
                for L in self.layers]
        out.append("  largest allocations:")
        out += [f"    {a['bytes'] / gib:8.3f} GiB x{a['count']:<4} {a['category']:<10} {a['line']}"
                for a in self.largest_allocations]
        out.append("  collectives per steady-state step (op group bytes calls):")
        out += [f"    {c.op:<18} {c.group:<6} {c.bytes:>14} {c.calls:>5}" for c in self.collectives_per_step]
        out.append("  stood in for:")
        out += [f"    - {s}" for s in self.stand_ins]
        out += [f"  note: {n}" for n in self.notes]
        if self.findings:
            out.append(f"FAILED: {len(self.findings)} finding(s):")
            out += [f"  {f['kind']}: {f['line']}: {f['detail']} [{f['phase']}]" for f in self.findings]
        else:
            out.append("OK: no host sync in the steady-state step, no CPU tensor in a device op or collective, "
                       "no fp32 matmul under bf16")
        return "\n".join(out)

"""`lctrain export`: a sharded checkpoint (saved under TP=2) -> Hugging Face Llama with the same logits in
transformers; a hybrid -> lctrain-named safetensors that `--init-from` loads back bit-exactly under another layout."""
import json
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
#: all-softmax Llama shape with GQA (4 query heads over 2 KV heads), untied output layer
LLAMA = ["model.layer_pattern=A", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=2"]


def _train(overrides: list[str], resume: str = "none") -> str:
    from lctrain.train.trainer import run

    return run(load_config(TINY, overrides), resume).checkpoint


def _lctrain_logits(overrides: list[str], ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of lctrain's own model (one process, fp32) with the checkpoint's fp32 masters."""
    from lctrain.checkpoint.store import load_tensors
    from lctrain.models import build_model
    from lctrain.models.rope import rope_cos_sin
    from lctrain.parallel.mesh import MeshConfig, init_mesh

    cfg = load_config(TINY, overrides)
    mesh = init_mesh(MeshConfig())
    model = build_model(cfg.model, mesh)
    got = load_tensors(ckpt, [f"model/{n}" for n, _ in model.named_parameters()])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(got[f"model/{n}"].view_as(p))
        pos = torch.arange(ids.shape[1])
        x = model.embed(ids)
        cos, sin = rope_cos_sin(pos, cfg.model.head_dim, cfg.model.rope_theta, x.dtype)
        for layer in model.layers:
            x = layer(x, cos, sin)
        return model.norm(x) @ (model.embed.weight if cfg.model.tie_embeddings else model.output.weight).T


def _transformers():
    """transformers (>= 5 imports Hugging Face's `kernels` package, which the repository's own top-level kernels/
    directory shadows while the repository root is on sys.path, as under pytest): import it without the root."""
    import importlib
    import sys

    saved = sys.path[:]
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "kernels" or k.startswith("kernels.")}
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    importlib.invalidate_caches()
    try:
        transformers = pytest.importorskip("transformers")
        importlib.import_module("transformers.integrations.hub_kernels")
        transformers.LlamaForCausalLM  # noqa: B018 - the lazy module imports the model's code now
        return transformers
    finally:
        sys.path[:] = saved
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "kernels" or k.startswith("kernels.")}
        sys.modules.update(ours or theirs)
        importlib.invalidate_caches()


def _safetensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / f))
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors


@pytest.mark.parametrize("tied", [False, True])
def test_hf_export_of_a_tp2_checkpoint_gives_the_same_logits_in_transformers(tmp_path, tied):
    transformers = _transformers()
    from lctrain.checkpoint.export import export

    overrides = [*LLAMA, f"model.tie_embeddings={str(tied).lower()}", f"run.out_dir={tmp_path / 'run'}",
                 "train.steps=1", "train.zero_stage=1"]
    (ckpt,) = set(run_distributed(_train, 2, [*overrides, "parallel.tp=2"]))
    out = tmp_path / "hf"
    # a 20 kB file limit: several files, every tensor once, the index names them all
    info = export(tmp_path / "run", out, fmt="hf", max_shard_bytes=20_000)
    assert info["checkpoint"] == ckpt and len(info["files"]) > 2
    tensors = _safetensors(out)
    assert ("lm_head.weight" in tensors) is not tied and len(tensors) == info["tensors"]
    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert model.config.tie_word_embeddings is tied
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        hf = model(ids).logits
    (ref,) = run_distributed(_lctrain_logits, 1, overrides, ckpt, ids)
    rel = ((hf - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()  # per token
    assert rel <= 1e-5, rel


def test_hf_refuses_a_hybrid_and_bad_options(tmp_path):
    from lctrain.checkpoint.export import export, hf_entries

    with pytest.raises(ValueError, match="all-softmax"):
        hf_entries({"num_layers": 4, "layer_pattern": "LLLA"}, {})
    with pytest.raises(ValueError, match="--dtype"):
        export(tmp_path, tmp_path / "out", dtype="fp8")
    from lctrain.checkpoint.export import main

    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


def _masters(ckpt: str) -> dict[str, torch.Tensor]:
    from lctrain.checkpoint.store import load_tensors, stored_tensors

    return load_tensors(ckpt, [k for k in stored_tensors(ckpt) if k.startswith("model/")])


def _init_from_and_save(overrides: list[str], export_dir: str, out: str) -> str:
    """Build the run's engine as the trainer does, initialise it from the export, save its state as a checkpoint."""
    from lctrain.checkpoint.export import load_export_into
    from lctrain.checkpoint.state import sharded_state
    from lctrain.checkpoint.store import save_checkpoint
    from lctrain.parallel.mesh import init_mesh
    from lctrain.train.trainer import build_run_engine, plan_run

    cfg = load_config(TINY, overrides)
    plan = plan_run(cfg, torch.distributed.get_world_size())
    mesh = init_mesh(cfg.parallel)
    torch.manual_seed(99)  # other initial weights than the exported run's: the load must overwrite every one
    _, engine = build_run_engine(cfg, mesh, plan, torch.device("cpu"))
    assert load_export_into(engine, mesh, export_dir) > 0
    return str(save_checkpoint(out, 0, sharded_state(engine, mesh, 0), {}, keep=1))


def test_hybrid_export_loads_back_bit_exactly_under_another_layout(tmp_path, capsys):
    """tiny.yaml (LLLA) saved at cp=2 ZeRO-1, exported in lctrain's names (bf16 too); `--init-from` into a tp=2 ZeRO-3
    engine (checkpoint.init_from) holds exactly the exported weights."""
    from lctrain.checkpoint.export import export
    from lctrain.train.cli import main as train_main

    (ckpt,) = set(run_distributed(_train, 2, [f"run.out_dir={tmp_path / 'a'}", "parallel.cp=2", "train.steps=2"]))
    from lctrain.cli import main as lctrain_main

    assert lctrain_main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "st")]) == 0  # the run's newest
    export(ckpt, tmp_path / "bf16", dtype="bf16")
    saved, exported = _masters(ckpt), _safetensors(tmp_path / "st")
    assert sorted(exported) == sorted(k[len("model/"):] for k in saved)
    for k, v in exported.items():
        assert torch.equal(v, saved[f"model/{k}"]), k
    for k, v in _safetensors(tmp_path / "bf16").items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, saved[f"model/{k}"].bfloat16()), k
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["lctrain_model"]["layer_pattern"] == "LLLA"
    (again,) = set(run_distributed(_init_from_and_save, 2, ["parallel.tp=2", "train.zero_stage=3"],
                                   str(tmp_path / "st"), str(tmp_path / "b")))
    loaded = _masters(again)
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    assert train_main([TINY, f"run.out_dir={tmp_path / 'c'}", "--init-from", str(tmp_path / "st"), "--dry-run"]) == 0
    assert f"init_from: {tmp_path / 'st'}" in capsys.readouterr().out

"""HF folder I/O: exact round trips (single file and sharded, dtype cast), the on-disk key layout, and
a malformed-folder error for each failure, checking that the message names the key and the file.

    pytest tests/models/test_hf_io.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirl_async.models.config import ModelConfig
from minirl_async.models.hf_io import expected_hf_shapes, iter_hf_state, load_hf, save_hf
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=40, hidden_size=24, intermediate_size=20, moe_intermediate_size=12,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Qwen3MoeForCausalLM, ModelConfig, Path]:
    cfg = tiny()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    save_hf(model, cfg, tmp_path)
    return model, cfg, tmp_path


def test_iter_hf_state_layout() -> None:
    cfg = tiny(tie_word_embeddings=True)
    model = Qwen3MoeForCausalLM(cfg)
    state = list(iter_hf_state(model))
    shapes = expected_hf_shapes(cfg)
    assert len(state) == len(shapes) and {n for n, _ in state} == set(shapes)
    assert all(tuple(t.shape) == shapes[n] for n, t in state)
    assert "lm_head.weight" not in dict(state)  # tied: not written, as HF does
    s = dict(state)
    gu, dn = model.model.layers[1].mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(s["model.layers.1.mlp.experts.2.gate_proj.weight"], gu[2, :12])
    assert torch.equal(s["model.layers.1.mlp.experts.2.up_proj.weight"], gu[2, 12:])
    assert torch.equal(s["model.layers.1.mlp.experts.3.down_proj.weight"], dn[3])


@pytest.mark.parametrize("shard_bytes", [2**30, 5_000])
def test_round_trip_exact(tmp_path: Path, shard_bytes: int) -> None:
    cfg = tiny(tie_word_embeddings=shard_bytes < 2**30)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    save_hf(model, cfg, tmp_path, max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard_bytes < 2**30:
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected_hf_shapes(cfg))
    else:
        assert files == ["model.safetensors"]
    loaded, cfg2 = load_hf(tmp_path)
    assert cfg2 == cfg
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == cfg.tie_word_embeddings
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    # re-saving into the same folder replaces the old shards instead of mixing with them
    save_hf(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert load_hf(tmp_path)[1] == cfg


def test_save_bf16(tmp_path: Path) -> None:
    cfg = tiny()
    model = Qwen3MoeForCausalLM(cfg)
    save_hf(model, cfg, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_hf(tmp_path, dtype=torch.bfloat16)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n


# ---- malformed folders ------------------------------------------------------------------------------------
def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_missing_config(saved, tmp_path: Path) -> None:
    _, _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing config\.json"):
        load_hf(folder)


def test_bad_json(saved) -> None:
    _, _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_hf(folder)


def test_unknown_model_type_and_architecture(saved) -> None:
    _, _, folder = saved
    _edit_config(folder, model_type="llama")
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'llama'"):
        load_hf(folder)
    _edit_config(folder, model_type="qwen3_moe", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=r"architectures \['LlamaForCausalLM'\] does not contain 'Qwen3MoeForCausalLM'"):
        load_hf(folder)


def test_missing_key(saved) -> None:
    _, _, folder = saved
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight'\]"):
        load_hf(folder)


def test_unexpected_key(saved) -> None:
    _, _, folder = saved
    _edit_tensors(folder, lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(12, 24)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected key model\.layers\.1\.mlp\.experts\.4\.up_proj"):
        load_hf(folder)


def test_shape_mismatch(saved) -> None:
    _, _, folder = saved
    _edit_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 24)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has shape "
                                         r"\(8, 24\), expected \(16, 24\)"):
        load_hf(folder)


def test_config_disagrees_with_weights(saved) -> None:
    _, _, folder = saved
    _edit_config(folder, num_experts=5)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate\.weight has shape \(4, 24\), expected \(5, 24\)"):
        load_hf(folder)


def test_no_weight_files(saved) -> None:
    _, _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\*\.safetensors file"):
        load_hf(folder)


def test_sharded_index_errors(tmp_path: Path) -> None:
    cfg = tiny()
    save_hf(Qwen3MoeForCausalLM(cfg), cfg, tmp_path, max_shard_bytes=5_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    wm["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"key model\.norm\.weight points to missing file model-00099-of-00099"):
        load_hf(tmp_path)
    other = next(f for k, f in wm.items() if f != wm["model.embed_tokens.weight"])
    wm["model.norm.weight"] = other  # an existing shard that does not hold the key
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{other}: key model\.norm\.weight is listed in model\.safetensors\.index"):
        load_hf(tmp_path)


def test_fp8_errors(saved) -> None:
    _, _, folder = saved
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(folder, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {name} is float8 but {name}_scale_inv"):
        load_hf(folder)
    _edit_tensors(folder, lambda t: t.update({name + "_scale_inv": torch.ones(3, 3)}))
    with pytest.raises(ValueError, match=rf"unexpected key {name}_scale_inv \(config\.json has no FP8"):
        load_hf(folder)
    _edit_config(folder, quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]})
    load_hf(folder)  # 20x24 in blocks of 8 is a 3x3 scale: consistent, so this folder now loads
    _edit_config(folder, quantization_config={"quant_method": "gptq"})
    with pytest.raises(ValueError, match=r"quant_method='gptq' is not supported"):
        load_hf(folder)
    _edit_config(folder, quantization_config={"quant_method": "fp8", "weight_block_size": [4, 4]})
    with pytest.raises(ValueError, match=rf"{name}_scale_inv has shape \(3, 3\), expected \(5, 6\) \(block 4\)"):
        load_hf(folder)


def test_corrupt_file_and_scale_of_a_1d_weight_name_the_file_and_key(saved) -> None:
    _, _, folder = saved
    _edit_config(folder, quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]})
    _edit_tensors(folder, lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(ValueError, match=r"unexpected key model\.norm\.weight_scale_inv .*only 2-D weights"):
        load_hf(folder)
    (shard,) = folder.glob("model*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])   # truncated
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file"):
        load_hf(folder)

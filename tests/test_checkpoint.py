"""LlamaCheckpoint: every supported checkpoint variant loads to the right spec and weights; every
broken one fails up front with a CheckpointError naming the file and the problem."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wqedge.checkpoint import CheckpointError, LlamaCheckpoint
from wqedge.spec import ModelSpec

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}


def same_spec(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal apart from the display name (the folder name)."""
    return replace(a, name="") == replace(b, name="")


def edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(file: Path, fn) -> None:
    t = load_file(file)
    fn(t)
    save_file(t, file, metadata={"format": "pt"})


# ---- variants ------------------------------------------------------------------------------------

def test_default_tiny_is_gqa_with_expected_spec(tiny_model_dir):
    ck = LlamaCheckpoint.open(tiny_model_dir)
    s = ck.spec
    assert isinstance(s, ModelSpec)
    assert (s.hidden_size, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.intermediate_size, s.vocab_size) == \
        (128, 2, 4, 2, 32, 352, 512)
    assert (s.rope_theta, s.rope_scaling, s.tie_word_embeddings, s.bos_token_id, s.eos_token_id) == \
        (10000.0, None, False, 1, 2)
    assert s.rms_norm_eps == 1e-5 and s.name == tiny_model_dir.name
    assert ck.dtype == "float16"
    assert len(ck.tensor_names()) == 3 + 9 * 2 and "lm_head.weight" in ck.tensor_names()
    k = next(lin for lin in s.linears() if lin.proj == "k_proj")
    assert ck.linear_weight(k).shape == (64, 128)          # kv_heads * head_dim rows


def test_linear_weight_equals_hf_model(tiny_model_dir):
    ck = LlamaCheckpoint.open(tiny_model_dir)
    model = ck.load_hf_model()
    params = dict(model.named_parameters())
    for lin in ck.spec.linears():
        w = ck.linear_weight(lin)
        assert w.dtype == torch.float32 and w.shape == (lin.out_features, lin.in_features)
        assert torch.equal(w, params[lin.hf_name].detach()), lin.hf_name
    assert torch.equal(ck.get("model.embed_tokens.weight").float(), params["model.embed_tokens.weight"].detach())


def test_get_returns_stored_dtype_and_reads_only_its_shard(tiny_model_factory, monkeypatch):
    import safetensors
    ck = LlamaCheckpoint.open(tiny_model_factory(shards=3))
    opened = []
    real = safetensors.safe_open

    def spy(file, *a, **kw):
        opened.append(Path(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    name = "model.layers.1.mlp.down_proj.weight"
    t = ck.get(name)
    assert t.dtype == torch.float16 and t.shape == (128, 352)
    assert opened == [ck.tensor_info(name).file]
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ck.get("nope")


def test_open_reads_no_weight_data(tiny_model_dir, monkeypatch):
    """open() must work from headers alone: any tensor read would go through safetensors."""
    import safetensors
    import safetensors.torch

    def boom(*a, **kw):
        raise AssertionError("weight data read during open()")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    ck = LlamaCheckpoint.open(tiny_model_dir)
    assert len(ck.fingerprint()) == 64


def test_tied_embeddings(tiny_model_factory):
    ck = LlamaCheckpoint.open(tiny_model_factory(tie_embeddings=True))
    assert ck.spec.tie_word_embeddings is True
    assert "lm_head.weight" not in ck.tensor_names()
    model = ck.load_hf_model()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    untied = LlamaCheckpoint.open(tiny_model_factory())
    assert ck.fingerprint() != untied.fingerprint()


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_both_rope_config_forms_give_same_spec(tiny_model_factory, scaling):
    d5 = tiny_model_factory(rope_form="tf5", rope_scaling=scaling, rope_theta=500000.0)
    d4 = tiny_model_factory(rope_form="tf4", rope_scaling=scaling, rope_theta=500000.0)
    c5, c4 = json.loads((d5 / "config.json").read_text()), json.loads((d4 / "config.json").read_text())
    assert "rope_parameters" in c5 and "rope_theta" not in c5
    assert "rope_theta" in c4 and "rope_parameters" not in c4
    a, b = LlamaCheckpoint.open(d5), LlamaCheckpoint.open(d4)
    assert same_spec(a.spec, b.spec) and a.fingerprint() == b.fingerprint()
    assert a.spec.rope_theta == 500000.0
    assert a.spec.rope_scaling == (dict(LLAMA3) if scaling else None)


def test_tf4_legacy_type_key_and_tf5_rope_theta_fallback(tiny_model_factory, copy_model):
    d = copy_model(tiny_model_factory(rope_form="tf4"), "legacy")
    edit_config(d, lambda c: c.update(rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3.items()
                                                                         if k != "rope_type"}}))
    assert LlamaCheckpoint.open(d).spec.rope_scaling == LLAMA3
    # transformers 5 config whose rope_parameters lack rope_theta: fall back to the top-level key
    e = copy_model(tiny_model_factory(), "tf5mixed")
    edit_config(e, lambda c: c.update(rope_parameters={"rope_type": "default"}, rope_theta=1234.0))
    assert LlamaCheckpoint.open(e).spec.rope_theta == 1234.0


def test_head_dim_absent_defaults_to_hidden_over_heads(tiny_model_dir, copy_model):
    d = copy_model(tiny_model_dir)
    edit_config(d, lambda c: c.pop("head_dim"))
    assert LlamaCheckpoint.open(d).spec.head_dim == 32


def test_eos_list_keeps_first_and_all(tiny_model_dir, copy_model):
    d = copy_model(tiny_model_dir)
    edit_config(d, lambda c: c.update(eos_token_id=[2, 0]))
    s = LlamaCheckpoint.open(d).spec
    assert s.eos_token_id == 2 and s.extra["eos_token_ids"] == [2, 0]


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_bf16_and_fp32_storage(tiny_model_factory, dtype, torch_dtype):
    ck = LlamaCheckpoint.open(tiny_model_factory(dtype=dtype))
    assert ck.dtype == dtype
    lin = ck.spec.linears()[5]
    raw = ck.get(lin.hf_name)
    assert raw.dtype == torch_dtype
    w = ck.linear_weight(lin)
    assert w.dtype == torch.float32 and torch.equal(w, raw.float())
    w.add_(1.0)                                   # callers may modify what they get: no aliasing
    assert torch.equal(ck.linear_weight(lin), raw.float())
    assert ck.fingerprint() != LlamaCheckpoint.open(tiny_model_factory()).fingerprint()


def test_sharded_equals_unsharded(tiny_model_factory):
    one, three = tiny_model_factory(seed=3), tiny_model_factory(seed=3, shards=3)
    assert len(list(three.glob("model-*-of-00003.safetensors"))) == 3
    assert (three / "model.safetensors.index.json").exists()
    a, b = LlamaCheckpoint.open(one), LlamaCheckpoint.open(three)
    assert a.tensor_names() == b.tensor_names()
    assert len({b.tensor_info(n).file for n in b.tensor_names()}) == 3
    assert a.fingerprint() == b.fingerprint() and same_spec(a.spec, b.spec)
    for n in a.tensor_names():
        assert torch.equal(a.get(n), b.get(n)), n


def test_fingerprint_ignores_folder_name_but_not_shape(tiny_model_dir, tiny_model_factory, copy_model):
    fp = LlamaCheckpoint.open(tiny_model_dir).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert LlamaCheckpoint.open(copy_model(tiny_model_dir, "renamed")).fingerprint() == fp
    assert LlamaCheckpoint.open(tiny_model_factory(intermediate=384)).fingerprint() != fp


def test_llama3_checkpoint_runs_in_hf(tiny_model_factory):
    """Both config forms of a llama3-scaled model load in transformers as the same model."""
    a = LlamaCheckpoint.open(tiny_model_factory(rope_form="tf5", rope_scaling=LLAMA3)).load_hf_model()
    b = LlamaCheckpoint.open(tiny_model_factory(rope_form="tf4", rope_scaling=LLAMA3)).load_hf_model()
    ids = torch.arange(0, 300).remainder(512)[None]
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits)


# ---- the trained fixture -------------------------------------------------------------------------

def test_fixture_llama_s(llama_s_dir):
    ck = LlamaCheckpoint.open(llama_s_dir)
    s = ck.spec
    assert (s.hidden_size, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.intermediate_size, s.vocab_size) == \
        (512, 8, 8, 4, 64, 1408, 8192)
    assert (s.rope_theta, s.rope_scaling, s.tie_word_embeddings, s.rms_norm_eps) == (10000.0, None, False, 1e-5)
    assert (s.bos_token_id, s.eos_token_id) == (1, 2)
    assert ck.dtype == "float16"
    assert len({ck.tensor_info(n).file for n in ck.tensor_names()}) == 5
    lin = s.linears()[-1]
    w = ck.linear_weight(lin)
    assert w.shape == (512, 1408) and w.dtype == torch.float32 and torch.isfinite(w).all() and w.std() > 0


# ---- errors --------------------------------------------------------------------------------------

def test_missing_folder_and_config(tmp_path, tiny_model_dir, copy_model):
    with pytest.raises(CheckpointError, match="does-not-exist.*does not exist"):
        LlamaCheckpoint.open(tmp_path / "does-not-exist")
    d = copy_model(tiny_model_dir)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        LlamaCheckpoint.open(d)


def test_missing_shard(tiny_model_factory, copy_model):
    d = copy_model(tiny_model_factory(shards=3))
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: lists shard 'model-00002-of-00003\.safetensors'"):
        LlamaCheckpoint.open(d)


def test_index_tensor_not_in_shard(tiny_model_factory, copy_model):
    d = copy_model(tiny_model_factory(shards=3))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors: tensor 'model\.norm\.weight' "
                                              r"is not in this shard"):
        LlamaCheckpoint.open(d)


def test_no_weights(tiny_model_dir, copy_model):
    d = copy_model(tiny_model_dir)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        LlamaCheckpoint.open(d)


@pytest.mark.parametrize("how,msg", [
    ("truncate", r"model\.safetensors: truncated"),
    ("tiny", r"model\.safetensors: truncated or corrupt"),
    ("garbage_header", r"model\.safetensors: corrupt safetensors file \(unreadable header"),
    ("huge_header_len", r"model\.safetensors: corrupt or truncated"),
])
def test_corrupt_safetensors(tiny_model_dir, copy_model, how, msg):
    d = copy_model(tiny_model_dir)
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "truncate":
        data = data[: len(data) - 1000]
    elif how == "tiny":
        data = data[:5]
    elif how == "garbage_header":
        data = data[:8] + b"\xff" * n + data[8 + n:]
    else:
        data = (2 ** 40).to_bytes(8, "little") + data[8:]
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=msg):
        LlamaCheckpoint.open(d)


@pytest.mark.parametrize("change,msg", [
    (lambda c: c.update(model_type="qwen2"), r"config\.json: model_type is 'qwen2'; supported: 'llama', 'mistral'"),
    (lambda c: c.update(architectures=["MistralForCausalLM"]),
     r"config\.json: architectures .*MistralForCausalLM.* do not include 'LlamaForCausalLM'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     r"config\.json: unsupported RoPE scaling type 'yarn' in 'rope_parameters'"),
    (lambda c: (c.pop("rope_parameters"), c.update(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})),
     r"config\.json: unsupported RoPE scaling type 'linear' in 'rope_scaling'"),
    (lambda c: c.update(rope_parameters={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     r"config\.json: llama3 RoPE scaling in 'rope_parameters' lacks 'low_freq_factor'"),
    (lambda c: c.update(attention_bias=True), r"config\.json: attention_bias is true"),
    (lambda c: c.update(hidden_act="gelu"), r"config\.json: hidden_act 'gelu'"),
    (lambda c: c.pop("hidden_size"), r"config\.json: required key 'hidden_size' is missing"),
    (lambda c: c.update(intermediate_size=384),
     r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[352, 128\], "
     r"config\.json implies \[384, 128\]"),
    (lambda c: c.update(num_hidden_layers=1), r"model\.safetensors: tensor 'model\.layers\.1\..*' belongs to layer 1"),
    (lambda c: c.update(num_hidden_layers=3),
     r"model\.safetensors: required tensor 'model\.layers\.2\.\S+' is missing"),
])
def test_bad_config(tiny_model_dir, copy_model, change, msg):
    d = copy_model(tiny_model_dir)
    edit_config(d, change)
    with pytest.raises(CheckpointError, match=msg):
        LlamaCheckpoint.open(d)


@pytest.mark.parametrize("change,msg", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"model\.safetensors: required tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"),
    (lambda t: t.pop("lm_head.weight"), r"required tensor 'lm_head\.weight' is missing"),
    (lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 128, dtype=torch.float16)}),
     r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[32, 128\], "
     r"config\.json implies \[64, 128\]"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128, dtype=torch.float16)}),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' is a bias"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(352, 128, dtype=torch.int8)}),
     r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is stored as I8"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(352, 128, dtype=torch.float32)}),
     r"model\.safetensors: decoder linears are stored in mixed dtypes \['F16', 'F32'\]"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}),
     r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"),
])
def test_bad_tensors(tiny_model_dir, copy_model, change, msg):
    d = copy_model(tiny_model_dir)
    edit_tensors(d / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=msg):
        LlamaCheckpoint.open(d)


def test_bad_tensor_in_shard_names_the_shard(tiny_model_factory, copy_model):
    d = copy_model(tiny_model_factory(shards=3))
    ck = LlamaCheckpoint.open(d)
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = ck.tensor_info(name).file.name
    edit_tensors(d / shard, lambda t: t.update({name: torch.zeros(64, 96, dtype=torch.float16)}))
    with pytest.raises(CheckpointError, match=re.escape(shard) + r": tensor '" + re.escape(name) + "' has shape"):
        LlamaCheckpoint.open(d)


def test_rotary_inv_freq_is_ignored(tiny_model_dir, copy_model):
    d = copy_model(tiny_model_dir)
    edit_tensors(d / "model.safetensors",
                 lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    assert LlamaCheckpoint.open(d).spec.n_layers == 2


def test_fingerprint_tells_apart_same_architecture_with_other_weights(tiny_model_dir, tiny_model_factory):
    # a plan made for one model (say a base model) must not be taken for another of the same shape (its fine-tune)
    assert LlamaCheckpoint.open(tiny_model_factory(seed=7)).fingerprint() != \
        LlamaCheckpoint.open(tiny_model_dir).fingerprint()


def test_planning_model_falls_back_to_bfloat16_when_float32_does_not_fit(tiny_model_dir):
    """Calibration holds the whole model in CPU memory: float32 while it fits in 40% of what is available,
    bfloat16 beyond (a 7B model: 14 GB instead of 28), so planning still fits a 24 GiB machine."""
    import torch

    from wqedge.calib import layerwise_stats
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    n = ckpt.n_params
    assert n == sum(ckpt.get(k).numel() for k in ckpt.tensor_names())
    assert ckpt.planning_dtype(available_bytes=10 * 4 * n) == torch.float32
    assert ckpt.planning_dtype(available_bytes=2 * 4 * n) == torch.bfloat16
    assert ckpt.planning_dtype() == torch.float32          # a tiny model always fits
    # statistics from a bfloat16-held model stay float64/float32 and close to the float32 ones
    toks = torch.randint(0, ckpt.spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    st32 = layerwise_stats(ckpt.load_hf_model(torch.float32), toks, device="cpu")
    st16 = layerwise_stats(ckpt.load_hf_model(torch.bfloat16), toks, device="cpu")
    name = next(iter(st32))
    assert st16[name].diag.dtype == torch.float64
    rel = float((st16[name].diag - st32[name].diag).norm() / st32[name].diag.norm())
    assert rel < 0.05, rel
    from wqedge.calib import gradient_stats
    gs = gradient_stats(ckpt.load_hf_model(torch.bfloat16), toks, device="cpu")
    assert all(bool(torch.isfinite(g.g2).all()) and float(g.g2.sum()) > 0 for g in gs.values())

"""``from_pretrained`` reads exactly the checkpoint's files and names every bad one (issue 11).

Checkpoints are written here from the bundled tiny model in Hugging Face DeepSeek-V3 format (``config.json``
+ safetensors with ``model.`` names), without ``transformers``: each test damages one thing and checks the
error names the file and what is wrong — or, for the silent cases of old, that loading refuses.
"""

import json
import logging

import pytest
import torch

from swa_rewrite.models import CheckpointMismatchError, MLAConfig, MLAModel, from_pretrained
from swa_rewrite.models.hf import CheckpointNotFoundError, config_from_pretrained

safetensors_torch = pytest.importorskip("safetensors.torch")

LAYERS = 3


def hf_config_dict(config: MLAConfig, **changes) -> dict:
    """``config.json`` of ``config`` (a dense tiny model) as transformers' DeepseekV3Config writes it."""
    cfg = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=config.vocab_size,
               hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
               num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
               num_key_value_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
               kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
               qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
               rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_interleave=True,
               max_position_embeddings=config.max_position_embeddings, hidden_act="silu",
               tie_word_embeddings=False, n_routed_experts=None, num_nextn_predict_layers=1, dtype="float32")
    cfg.update(changes)
    return cfg


def hf_tensors(model: MLAModel) -> dict[str, torch.Tensor]:
    """The model's state dict under Hugging Face names (``model.`` prefix, ``lm_head`` outside it)."""
    return {(k if k.startswith("lm_head") else "model." + k): v.contiguous()
            for k, v in model.state_dict().items()}


def write_checkpoint(path, model: MLAModel, *, shards: int = 1, **config_changes) -> dict[str, torch.Tensor]:
    """A checkpoint of ``model`` in ``path``: one ``model.safetensors``, or ``shards`` shard files and
    ``model.safetensors.index.json``. Returns the tensors written."""
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.config, **config_changes)))
    tensors = hf_tensors(model)
    if shards == 1:
        safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_torch.save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def tiny(layers=LAYERS, seed=0):
    return MLAModel(MLAConfig.named("tiny").replace(num_hidden_layers=layers), dtype=torch.float32, seed=seed)


def assert_same_weights(model, reference):
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("shards", [1, 3])
def test_written_checkpoint_round_trips(shards, tmp_path):
    model = tiny()
    write_checkpoint(tmp_path, model, shards=shards)
    assert_same_weights(from_pretrained(tmp_path), model)
    assert config_from_pretrained(tmp_path) == model.config


# ------------------------------------------------------------------------------------- which files are read
def test_a_second_unindexed_safetensors_file_is_rejected(tmp_path):
    """Two ``*.safetensors`` without an index: which one wins is undefined, so neither is guessed."""
    model = tiny()
    tensors = write_checkpoint(tmp_path, model)
    safetensors_torch.save_file({"model.norm.weight": torch.zeros_like(tensors["model.norm.weight"])},
                                tmp_path / "override.safetensors")
    with pytest.raises(ValueError, match=r"2 \*\.safetensors files \['model\.safetensors', 'override\.safetensors'\]"
                                         r".*expected exactly one"):
        from_pretrained(tmp_path)


def test_no_safetensors_file_is_named(tmp_path):
    write_checkpoint(tmp_path, tiny())
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no \*\.safetensors file"):
        from_pretrained(tmp_path)


def test_with_an_index_only_the_named_shards_are_read(tmp_path, caplog):
    model = tiny()
    tensors = write_checkpoint(tmp_path, model, shards=2)
    stray = {"model.norm.weight": torch.zeros_like(tensors["model.norm.weight"]),
             "model.layers.7.mlp.up_proj.weight": torch.zeros(3, 3)}
    safetensors_torch.save_file(stray, tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="swa_rewrite.models.hf"):
        assert_same_weights(from_pretrained(tmp_path), model)
    assert "ignoring ['model.safetensors']" in caplog.text


def test_an_index_naming_an_absent_shard_is_named(tmp_path):
    write_checkpoint(tmp_path, tiny(), shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"names shard\(s\) that are not in .*model-00002-of-00003"):
        from_pretrained(tmp_path)


def test_an_index_mapping_a_tensor_to_the_wrong_shard_is_named(tmp_path):
    write_checkpoint(tmp_path, tiny(), shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    wrong = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"maps 1 tensor\(s\) to shards that do not hold them: "
                                         rf"model\.norm\.weight \({wrong}\)"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a valid JSON model.safetensors.index.json"),
    ('["model-00001-of-00002.safetensors"]', "expected a JSON object with a 'weight_map'"),
    ('{"metadata": {}}', "expected a JSON object with a 'weight_map'"),
    ('{"weight_map": ["a"]}', "expected a JSON object with a 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', "expected a JSON object with a 'weight_map'"),
])
def test_a_malformed_index_is_named(content, match, tmp_path):
    write_checkpoint(tmp_path, tiny(), shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        from_pretrained(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


# ------------------------------------------------------------------------------------------ corrupt files
def _empty(data):
    return b""


def _truncated(data):
    return data[: len(data) // 2]


def _junk(data):
    return b"this is not a safetensors file" * 4


@pytest.mark.parametrize("damage", [_empty, _truncated, _junk])
@pytest.mark.parametrize("shards", [1, 2])
def test_a_corrupt_shard_is_named(damage, shards, tmp_path):
    write_checkpoint(tmp_path, tiny(), shards=shards)
    file = tmp_path / ("model.safetensors" if shards == 1 else "model-00002-of-00002.safetensors")
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match=rf"{file.name}: not a readable safetensors file"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("content,error,match", [
    ("{oops", ValueError, r"config\.json: not a valid JSON config\.json"),
    ("[1, 2, 3]", ValueError, r"config\.json: expected a JSON object of config keys, got a JSON list"),
    ('"deepseek_v3"', ValueError, r"config\.json: expected a JSON object of config keys, got a JSON str"),
    ("\udcff".encode("utf-8", "surrogateescape"), ValueError, r"config\.json: not a valid JSON"),
])
def test_a_config_that_is_not_a_json_object_is_named(content, error, match, tmp_path):
    write_checkpoint(tmp_path, tiny())
    file = tmp_path / "config.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (from_pretrained, config_from_pretrained):
        with pytest.raises(error, match=match):
            load(tmp_path)


def test_a_missing_config_or_folder_is_a_value_error_and_a_file_not_found_error(tmp_path):
    write_checkpoint(tmp_path, tiny())
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"no config\.json at .*config\.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a directory"):
        from_pretrained(tmp_path / "model.safetensors")


@pytest.mark.parametrize("changes,match", [
    (dict(vocab_size="256"), r"config vocab_size='256' must be an integer"),
    (dict(num_hidden_layers=3.0), r"config num_hidden_layers=3\.0 must be an integer"),
    (dict(num_nextn_predict_layers="one"), r"num_nextn_predict_layers='one': expected a non-negative integer"),
    (dict(quantization_config=dict(weight_block_size=[128])), r"weight_block_size=\[128\]: expected two positive"),
])
def test_config_values_of_the_wrong_type_are_named(changes, match, tmp_path):
    write_checkpoint(tmp_path, tiny(), **changes)
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ layers beyond the config
def test_a_config_with_fewer_layers_than_the_checkpoint_is_rejected(tmp_path):
    """transformers writes ``num_nextn_predict_layers: 1`` by default, so the checkpoint's last decoder layer
    sits where an MTP layer would: it has no MTP tensors, so it is not dropped."""
    write_checkpoint(tmp_path, tiny(LAYERS), num_hidden_layers=LAYERS - 1, num_nextn_predict_layers=1)
    with pytest.raises(CheckpointMismatchError, match=rf"more layers than config\.num_hidden_layers={LAYERS - 1}: "
                                                      rf"layer\(s\) \[{LAYERS - 1}\]"):
        from_pretrained(tmp_path)
    write_checkpoint(tmp_path, tiny(LAYERS), num_hidden_layers=LAYERS - 2, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointMismatchError, match=rf"layer\(s\) \[{LAYERS - 2}, {LAYERS - 1}\]"):
        from_pretrained(tmp_path)


def test_an_mtp_layer_told_by_its_tensors_is_skipped(tmp_path):
    """DeepSeek-V3's MTP layer ``model.layers.{L}`` carries a whole decoder layer plus its own tensors."""
    model = tiny(LAYERS)
    tensors = write_checkpoint(tmp_path, model, num_nextn_predict_layers=1)
    H = model.config.hidden_size
    mtp = {n.replace(f"layers.{LAYERS - 1}.", f"layers.{LAYERS}."): t.clone()
           for n, t in tensors.items() if f"layers.{LAYERS - 1}." in n}
    mtp.update({f"model.layers.{LAYERS}.enorm.weight": torch.ones(H),
                f"model.layers.{LAYERS}.hnorm.weight": torch.ones(H),
                f"model.layers.{LAYERS}.eh_proj.weight": torch.zeros(H, 2 * H),
                f"model.layers.{LAYERS}.shared_head.norm.weight": torch.ones(H)})
    safetensors_torch.save_file({**tensors, **mtp}, tmp_path / "model.safetensors")
    assert_same_weights(from_pretrained(tmp_path), model)


# ------------------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("name,want", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16), ("fp16", torch.float16),
    ("float32", torch.float32), ("fp32", torch.float32), ("torch.bfloat16", torch.bfloat16),
    ("BF16", torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_by_name(name, want, tmp_path):
    model = tiny()
    write_checkpoint(tmp_path, model)
    loaded = from_pretrained(tmp_path, dtype=name)
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(want))


@pytest.mark.parametrize("dtype,error,match", [
    ("bfloat17", ValueError, r"dtype='bfloat17' is not a known dtype name"),
    ("torch.int8", ValueError, r"dtype='torch.int8' is not a known dtype name"),
    (torch.int8, ValueError, r"dtype=torch\.int8 is not supported for model weights"),
    (torch.float8_e4m3fn, ValueError, r"dtype=torch\.float8_e4m3fn is not supported"),
    (16, TypeError, r"dtype must be a torch\.dtype or a dtype name .*got 16 \(int\)"),
])
def test_a_bad_dtype_is_named(dtype, error, match, tmp_path):
    write_checkpoint(tmp_path, tiny())
    with pytest.raises(error, match=match):
        from_pretrained(tmp_path, dtype=dtype)


def test_a_config_dtype_that_is_not_a_model_dtype_loads_in_float32_with_a_warning(tmp_path, caplog):
    write_checkpoint(tmp_path, tiny(), dtype="float8_e4m3fn")
    with caplog.at_level(logging.WARNING, logger="swa_rewrite.models.hf"):
        assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.float32
    assert "dtype 'float8_e4m3fn', which is not a model dtype" in caplog.text
    write_checkpoint(tmp_path, tiny(), dtype="bfloat16")
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16


def test_loading_shows_progress_over_every_weight(tmp_path, monkeypatch):
    """Loading runs through the project's progress bar (tqdm on a terminal), one step per model tensor."""
    import importlib

    hf = importlib.import_module("swa_rewrite.models.hf")
    seen = []

    def recording_progress(iterable, *, total=None, desc="", disable=False):
        seen.append((desc, total))
        return iterable

    monkeypatch.setattr(hf, "progress", recording_progress)
    model = tiny()
    write_checkpoint(tmp_path, model)
    assert_same_weights(from_pretrained(tmp_path), model)
    assert seen == [("loading weights", len(model.state_dict()))]
